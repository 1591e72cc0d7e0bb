"""What a `predict` run leaves beside its submission: the `InferenceReport` (rows per path, schedule, errors)
written as `<stem>.inference.json`, and `raise_if_fallback`, the one rule for when a written file still
fails the run (see docs/DESIGN_NOTES.md, "inference: which file a run leaves")."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kaggle_utils.core.environment import is_competition_rerun
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.inference.views import PATH_FALLBACK

logger = logging.getLogger(__name__)

# The manifest fields the report repeats (which model, which post-processing, which dialect).
MANIFEST_KEYS = (
    "kind",
    "members",
    "calibration",
    "tta_space",
    "ordering",
    "variant",
    "base_model",
    "quant_scheme",
    "dtype",
    "max_length",
    "template_version",
    "cv_scores",
    "package_version",
    "created_at",
    "class_prior",
    "dialect",
)


class InferenceError(RuntimeError):
    """A run that fails after its file was written (`raise_if_fallback`, `raise_after_write`), or scoring that
    left rows unpredicted (`score_rows`)."""


@dataclass
class InferenceReport:
    """Everything a silent Kaggle rerun cannot tell you; written as JSON beside the submission."""

    submission_path: str
    test_path: str
    artifact_dir: str
    dialect: str = ""  # the competition dialect the file was written in (dialects.py)
    rows: int = 0
    rows_by_path: dict[str, int] = field(default_factory=dict)
    fallback_source: str = ""
    tta_requested: bool = True
    runtime: dict = field(default_factory=dict)
    kaggle: dict = field(default_factory=dict)  # on_kaggle, competition_rerun (which run wrote this report)
    manifest: dict = field(default_factory=dict)
    data_report: dict = field(default_factory=dict)
    encoding: str = ""  # truncation summary of the original view
    schedule: dict = field(default_factory=dict)
    submission: dict = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    deadline_s: float | None = None  # seconds from predict()'s start left for the whole run
    fallback_file: str = ""  # where the early fallback submission was written (the output, or beside it)
    members: list[dict] = field(default_factory=list)  # an ensemble's members: weight, rows served, schedule
    # Rows a model predicted (an ensemble's: rows a model member served; an ensemble of baseline / prior
    # members only: rows any member served). None: the run's file goes beside a valid previous submission.
    model_rows: int = 0
    previous_kept: bool = False  # a valid previous submission stayed at `submission_path` (see `predict`)
    report_written: bool = False
    dtype_preflight: dict | None = None  # float16 compute only: devices.check_dtype_range on the first rows
    errors: list[dict] = field(default_factory=list)

    @property
    def nonfinite_rows(self) -> int:
        """Row views the model returned NaN/inf for (the schedule's count): the run fails (exit 1) on any."""
        return int(self.schedule.get("nonfinite_rows", 0))

    @property
    def written_path(self) -> Path:
        """The file this run's predictions are in: `submission_path`, or beside it if the old was kept."""
        return Path(self.fallback_file if self.previous_kept else self.submission_path)

    @property
    def report_path(self) -> Path:
        """Where this report is written: beside `written_path`."""
        return report_path_for(self.written_path)

    @property
    def fallback_rows(self) -> int:
        """Rows no model pass served (the baseline / class prior / uniform predicted them)."""
        return int(self.rows_by_path.get(PATH_FALLBACK, 0))

    def summary(self) -> str:
        """One line; it starts with the fallback count when any row fell back, the thing to see first."""
        paths = ", ".join(f"{name} {count}" for name, count in self.rows_by_path.items() if count)
        text = f"{self.written_path}: {self.rows} rows ({paths}); fallback = {self.fallback_source}"
        if self.previous_kept:
            text += f"; the valid previous {self.submission_path} kept"
        if self.fallback_rows:
            text = f"FALLBACK {self.fallback_rows} of {self.rows} rows; " + text
        if self.nonfinite_rows:
            text += f"; NON-FINITE {self.nonfinite_rows} row views"
        if self.schedule.get("tta_dropped"):
            text += f"; TTA dropped for {self.schedule['tta_rows_dropped']} row passes"
        if self.schedule.get("workers_lost"):
            text += (
                f"; {self.schedule['workers_lost']} worker process(es) lost, "
                f"{self.schedule['rows_requeued']} row passes re-queued"
            )
        if self.schedule.get("stopped"):
            text += f"; stopped: {self.schedule['stopped']}"
        if self.members:
            text += "; members: " + ", ".join(
                f"{m['name']} {m['rows_served']}/{self.rows}" for m in self.members
            )
        if self.errors:
            first = self.errors[0]
            text += f"; {len(self.errors)} error(s), first: {first.get('type')}: {first.get('message')}"
        return text

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return asdict(self)


def report_path_for(submission_path: str | Path) -> Path:
    """Where a submission's report goes: `<stem>.inference.json` beside it."""
    path = Path(submission_path)
    return path.with_name(path.stem + ".inference.json")


def fallback_path_for(submission_path: str | Path) -> Path:
    """Where the early fallback goes while a valid previous submission is kept at the output path."""
    path = Path(submission_path)
    return path.with_name(path.stem + ".fallback" + (path.suffix or ".csv"))


def raise_if_fallback(report: InferenceReport) -> None:
    """Raise InferenceError, after the file was written, when any row fell back, the model returned a
    non-finite row, or a weighted ensemble member served no row; in Kaggle's hidden competition rerun only
    log it (the written file is the submission and the notebook must finish)."""
    silent = [
        member
        for member in report.members
        if member.get("weight") and not member.get("rows_served") and report.rows
    ]
    if not report.fallback_rows and not silent and not report.nonfinite_rows:
        return
    message = _failure_message(report, silent)
    if report.previous_kept:
        message += (
            f"; the valid previous submission {report.submission_path} was kept; this run's file is "
            f"{report.written_path} (--write-fallback-over-previous writes it at the output instead): "
            f"{report.summary()}"
        )
    else:
        message += f"; the submission was written: {report.summary()}"
    if is_competition_rerun():
        logger.warning("competition rerun, so not failing: %s", message)
        return
    raise InferenceError(message)


def _failure_message(report: InferenceReport, silent: list[dict]) -> str:
    """Why the run failed: fallback rows, non-finite rows, or the first weighted member that served none."""
    nonfinite = (
        f"the model returned non-finite probabilities (NaN/inf, e.g. float16 overflow) for "
        f"{report.nonfinite_rows} row views of {report.rows} rows"
    )
    if report.nonfinite_rows and not report.fallback_rows:
        message = f"{nonfinite}; their other view served them"
    elif report.fallback_rows:
        message = (
            f"{report.fallback_rows} of {report.rows} rows were predicted by the fallback "
            f"({report.fallback_source}), not the model"
        ) + (f"; {nonfinite}" if report.nonfinite_rows else "")
    else:
        member = silent[0]
        first = next(
            (
                error
                for error in report.errors
                if error.get("where") == f"ensemble member {member['name']}"
                or error.get("member") == member["name"]
            ),
            {},
        )
        message = (
            f"ensemble member {member['name']} served none of the {report.rows} rows "
            f"({first.get('type', 'no error recorded')}: {first.get('message', '')}); the other members "
            f"predicted them"
        )
    return message


def write_report(report: InferenceReport, record: Callable[[str, BaseException], None]) -> None:
    """The JSON report beside the submission. The submission is already complete, so a failure here is
    recorded, not raised, and a report left by an earlier run is removed (it would describe another file)."""
    path = report.report_path
    report.report_written = True  # what the file says; reset when it could not be written
    try:
        atomic_write_bytes(path, json.dumps(report.to_dict(), indent=2, default=str).encode("utf-8"))
    except Exception as error:
        report.report_written = False
        record(f"writing the report {path}", error)
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                path.unlink()
