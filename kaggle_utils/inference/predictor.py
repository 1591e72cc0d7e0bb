"""Offline prediction that always leaves a valid submission inside Kaggle's time limit: `predict` (artifact +
test file -> submission, in named steps) and `run_submission` (the submission notebook's one call: find the
inputs, predict, validate). Which file a run writes, and when it fails: docs/DESIGN_NOTES.md.

    report = run_submission("/kaggle/input", fail_on_fallback=False)
    print(report.summary())
    raise_if_fallback(report)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS, DataConfig, InferenceConfig
from kaggle_utils.core.environment import (
    default_submission_path,
    is_competition_rerun,
    on_kaggle,
    use_offline_hub,
)
from kaggle_utils.core.errors import SubmissionError, UsageError
from kaggle_utils.data.dialects import dialect_names
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.submission import read_test_ids
from kaggle_utils.evaluate.ensembles import BlendedRows
from kaggle_utils.inference.device_forward import ForwardFn, describe_error
from kaggle_utils.inference.ensemble import PATH_ALL_MEMBERS, PATH_SOME_MEMBERS, fill_blend, run_ensemble
from kaggle_utils.inference.inputs import find_inputs, find_test_file
from kaggle_utils.inference.preflight import (
    check_data_format,
    check_outputs,
    detect_runtime_or_error,
    inference_config,
    predict_inputs,
    read_manifest_or_record,
    resolve_dialect,
    time_budget_s,
    validate_inference_config,
)
from kaggle_utils.inference.replicas import run_models
from kaggle_utils.inference.report import (
    MANIFEST_KEYS,
    InferenceError,
    InferenceReport,
    fallback_path_for,
    raise_if_fallback,
    report_path_for,
    write_report,
)
from kaggle_utils.inference.views import (
    PATH_FALLBACK,
    PATH_ORIGINAL,
    PATH_SWAPPED,
    PATH_TTA,
    ViewPredictions,
    fallback_predictions,
    model_probabilities,
)

logger = logging.getLogger(__name__)


class _ErrorLog:
    """`predict`'s recorder: every error goes in the report and the log; the first is kept, to re-raise
    with `raise_after_write`. Call it as `record(where, error)`."""

    def __init__(self, report: InferenceReport) -> None:
        self.report = report
        self.first: BaseException | None = None

    def __call__(self, where: str, error: BaseException) -> None:
        self.first = self.first or error
        self.report.errors.append({"where": where, **describe_error(error)})
        logger.error("%s failed: %r (rows go to the fallback)", where, error)


def predict(
    artifact_dir: str | Path | None,
    test_path: str | Path,
    out_path: str | Path,
    cfg: InferenceConfig | None = None,
    *,
    fallback_path: str | Path | None = None,
    data_cfg: DataConfig | None = None,
    started_at: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    runtime: Any = None,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None = None,
    dialect: str | None = None,
    fallback_over_previous: bool = False,
    input_error: BaseException | None = None,
) -> InferenceReport:
    """Write a valid submission for `test_path` with the artifact's model and return the report. UsageError,
    before anything is written, for refused settings, devices, dialect, test ids or outputs; afterwards errors
    are recorded, rows no model served get the fallback (`raise_if_fallback` fails on them), and only
    `cfg.raise_after_write` re-raises, after writing. Which file is written where: docs/DESIGN_NOTES.md.
    `input_error` (or no `artifact_dir`): no model runs. `started_at` (epoch s): time already spent.
    `clock`, `runtime`, `wrap_forward(forward, device_name)`: seams for tests and benchmarks."""
    cfg = cfg or InferenceConfig()
    chosen, out_path, runtime, runtime_error = _resolve_inputs(
        artifact_dir, test_path, out_path, cfg, fallback_path, data_cfg, runtime, dialect
    )
    began = clock()
    budget = time_budget_s(cfg, started_at)
    report = _start_report(artifact_dir, test_path, out_path, cfg, chosen.name, budget)
    record = _ErrorLog(report)
    if input_error is not None:
        record("the inputs and settings", input_error)
    ids, frame = _read_test_rows(test_path, data_cfg or chosen.data_config(), report, record)
    report.timings_s["read_test"] = clock() - began
    manifest = read_manifest_or_record(artifact_dir, record) if artifact_dir is not None else {}
    report.manifest = {key: manifest.get(key) for key in MANIFEST_KEYS if key in manifest}
    fallback, early = _write_fallback_first(
        chosen, ids, frame, manifest, test_path, out_path, fallback_path, report
    )
    views = ViewPredictions(  # no row served, until a model runs
        np.full((1, len(ids), len(LABEL_COLUMNS)), np.nan), np.zeros((1, len(ids)), dtype=bool)
    )
    blended: BlendedRows | None = None
    if input_error is not None or artifact_dir is None:
        pass  # recorded above: nothing to run
    elif runtime_error is not None:
        record("detecting the runtime", runtime_error)
    elif frame is not None:
        deadline = began + budget
        try:
            if manifest.get("kind") == "ensemble":
                args = (artifact_dir, manifest, frame, cfg, deadline, clock, runtime, wrap_forward, report)
                blended = run_ensemble(*args)
            else:
                views = run_models(artifact_dir, frame, cfg, deadline, clock, runtime, wrap_forward, report)
        except Exception as error:
            record("model inference", error)
    final = _combine_and_fill(views, blended, manifest, fallback, report)
    _write_predictions(chosen, ids, final, out_path, early, fallback_over_previous, report)
    report.timings_s["total"] = clock() - began
    report.errors.extend(report.schedule.get("errors", []))
    write_report(report, record)
    (logger.warning if report.fallback_rows else logger.info)(report.summary())
    if cfg.raise_after_write and (record.first is not None or report.errors):
        raise InferenceError(
            f"inference had errors (the submission was written from the fallback where needed): "
            f"{report.summary()}"
        ) from record.first
    return report


def _resolve_inputs(
    artifact_dir: str | Path | None,
    test_path: str | Path,
    out_path: str | Path,
    cfg: InferenceConfig,
    fallback_path: str | Path | None,
    data_cfg: DataConfig | None,
    runtime: Any,
    dialect: str | None,
) -> tuple[Any, Path, Any, Exception | None]:
    """Everything refused before a file is written (settings, dialect, outputs that are inputs, a missing
    device). Returns (dialect, output path, runtime, the error of a runtime probe that crashed)."""
    validate_inference_config(cfg)
    use_offline_hub()  # nothing here downloads; bitsandbytes' import would otherwise ask the Hub for a kernel
    chosen = resolve_dialect(artifact_dir, dialect, test_path)
    check_data_format(data_cfg, chosen, dialect_given=bool(dialect))
    out_path = Path(out_path)
    check_outputs(out_path, predict_inputs(artifact_dir, test_path, fallback_path))
    if runtime is not None:
        return chosen, out_path, runtime, None
    runtime, runtime_error = detect_runtime_or_error(cfg)
    return chosen, out_path, runtime, runtime_error


def _start_report(
    artifact_dir: str | Path | None,
    test_path: str | Path,
    out_path: Path,
    cfg: InferenceConfig,
    dialect_name: str,
    budget_s: float,
) -> InferenceReport:
    """The run's report before anything is read: what was asked, and which run (Kaggle, rerun) this is."""
    report = InferenceReport(
        submission_path=str(out_path),
        test_path=str(test_path),
        artifact_dir=str(artifact_dir) if artifact_dir is not None else "",
        tta_requested=cfg.tta_swap,
        deadline_s=budget_s,
        dialect=dialect_name,
    )
    report.kaggle = {"on_kaggle": on_kaggle(), "competition_rerun": is_competition_rerun()}
    return report


def _read_test_rows(
    test_path: str | Path, data_cfg: DataConfig, report: InferenceReport, record: _ErrorLog
) -> tuple[Any, Any]:
    """The ids every row needs, read directly (UsageError when unreadable), then the parsed rows; a parse
    failure is recorded and gives frame None (every row falls back)."""
    ids = read_test_ids(test_path)
    report.rows = len(ids)
    try:
        loaded = load_competition(test_path, data_cfg, split="test")
        frame = loaded.frame
        report.data_report = loaded.report.to_dict()
        frame_ids = frame["id"].cast(pl.String).str.strip_chars().to_list()
        if frame_ids != ids.to_list():
            raise UsageError(
                f"{test_path}: parsed rows do not match the file's ids in order ({len(frame_ids)} "
                f"parsed, {len(ids)} ids)"
            )
    except Exception as error:
        record("reading test rows", error)
        return ids, None
    return ids, frame


def _write_fallback_first(
    chosen: Any,
    ids: Any,
    frame: Any,
    manifest: dict,
    test_path: str | Path,
    out_path: Path,
    fallback_path: str | Path | None,
    report: InferenceReport,
) -> tuple[np.ndarray, Path]:
    """The fallback for every row, written as a valid submission before any model work: at `out_path`, or
    beside it when `out_path` holds a valid submission for this test file (kept until the new one is done).
    Returns (fallback probabilities, where they were written)."""
    fallback, report.fallback_source, fallback_errors = fallback_predictions(
        frame, len(ids), fallback_path, manifest
    )
    report.errors.extend(fallback_errors)
    early = out_path
    if out_path.is_file():
        try:
            chosen.validate(out_path, test_path)
            early = fallback_path_for(out_path)
        except SubmissionError:
            pass  # not a valid file for this test set: the fallback replaces it at once
    chosen.write(ids, fallback, early, expected_ids=ids)
    report.fallback_file = str(early)
    return fallback, early


def _combine_and_fill(
    views: ViewPredictions,
    blended: BlendedRows | None,
    manifest: dict,
    fallback: np.ndarray,
    report: InferenceReport,
) -> np.ndarray:
    """The final probabilities: the views combined (or an ensemble's blend), the fallback where no model
    served the row; rows per path and rows a model served go in `report`."""
    if blended is not None:
        final, paths = fill_blend(blended, fallback)
        path_names: tuple[str, ...] = (PATH_ALL_MEMBERS, PATH_SOME_MEMBERS, PATH_FALLBACK)
    else:
        final, paths = model_probabilities(views, manifest)
        unserved = paths == PATH_FALLBACK
        final[unserved] = fallback[unserved]
        path_names = (PATH_TTA, PATH_ORIGINAL, PATH_SWAPPED, PATH_FALLBACK)
        report.model_rows = int((~unserved).sum())
    report.rows_by_path = {name: int((paths == name).sum()) for name in path_names}
    return final


def _write_predictions(
    chosen: Any,
    ids: Any,
    final: np.ndarray,
    out_path: Path,
    early: Path,
    fallback_over_previous: bool,
    report: InferenceReport,
) -> None:
    """Write the final file at `out_path`, unless no row came from a model and a valid previous file is kept
    there (then beside it); the early fallback beside `out_path` and its stale report are then removed."""
    report.previous_kept = (
        early != out_path
        and report.rows > 0
        and report.model_rows == 0
        and not fallback_over_previous
        and not is_competition_rerun()
    )
    submission = chosen.write(ids, final, report.written_path, expected_ids=ids)
    report.submission = submission.to_dict()
    if early != out_path and not report.previous_kept:
        for stale in (early, report_path_for(early)):  # the fallback beside, and a report an earlier run left
            with contextlib.suppress(OSError):
                stale.unlink()


def run_submission(
    input_root: str | Path | None = None,
    *,
    artifact_dir: str | Path | None = None,
    test_path: str | Path | None = None,
    out_path: str | Path | None = None,
    cfg: InferenceConfig | Mapping[str, Any] | None = None,
    fallback_path: str | Path | None = None,
    artifact_hint: str | None = None,
    test_hint: str | None = None,
    started_at: float | None = None,
    fail_on_fallback: bool = True,
    dialect: str | None = None,
    fallback_over_previous: bool = False,
) -> InferenceReport:
    """The submission notebook's one call: find what is not given under `input_root` (`inputs.find_inputs`;
    hints are whole path names), predict to `out_path` (default: `environment.default_submission_path`) and
    validate the file. `cfg` may be a mapping of InferenceConfig fields. A failure before the model runs still
    writes an all-fallback file when the test file is known, then raises naming it (not in the competition
    rerun). `fail_on_fallback`: `raise_if_fallback` afterwards (the notebook passes False and calls it)."""
    use_offline_hub()
    out_path = Path(out_path) if out_path is not None else default_submission_path()
    problem: UsageError | None = None
    try:
        cfg = inference_config(cfg)
    except UsageError as error:
        problem, cfg = error, None
    if artifact_dir is None or test_path is None:
        artifact_dir, test_path, fallback_path, not_found = _find_missing_inputs(
            input_root, artifact_dir, test_path, fallback_path, artifact_hint, test_hint
        )
        problem = problem or not_found
    if problem is None:
        try:
            report = predict(
                artifact_dir,
                test_path,
                out_path,
                cfg,
                fallback_path=fallback_path,
                started_at=started_at,
                dialect=dialect,
                fallback_over_previous=fallback_over_previous,
            )
        except UsageError as error:  # refused before anything was written (or the file could not be written)
            problem = error
    if problem is not None:
        args = (artifact_dir, test_path, out_path, fallback_path, started_at, dialect, fallback_over_previous)
        return _write_fallback_then_raise(problem, *args)
    resolve_dialect(artifact_dir, report.dialect, test_path).validate(report.written_path, test_path)
    if fail_on_fallback:
        raise_if_fallback(report)
    return report


def _find_missing_inputs(
    input_root: str | Path | None,
    artifact_dir: str | Path | None,
    test_path: str | Path | None,
    fallback_path: str | Path | None,
    artifact_hint: str | None,
    test_hint: str | None,
) -> tuple[Any, Any, Any, UsageError | None]:
    """(artifact, test file, fallback baseline, None) found under `input_root`; when that fails, what was
    given (the test file searched alone: without it no file can be written) and the error."""
    try:
        found = find_inputs(
            input_root,
            artifact_hint=artifact_hint,
            test_hint=test_hint,
            artifact_dir=artifact_dir,
            test_path=test_path,
        )
    except UsageError as error:
        if test_path is None:
            test_path = find_test_file(input_root, test_hint)
        return artifact_dir, test_path, fallback_path, error
    logger.info("found: %s", found.describe())
    return found.artifact_dir, found.test_path, fallback_path or found.baseline_path, None


def _write_fallback_then_raise(
    problem: UsageError,
    artifact_dir: str | Path | None,
    test_path: str | Path | None,
    out_path: Path,
    fallback_path: str | Path | None,
    started_at: float | None,
    dialect: str | None,
    fallback_over_previous: bool,
) -> InferenceReport:
    """`problem` stopped the run before any model: write and validate an all-fallback file, then raise
    `problem` naming it; in the competition rerun log it and return the report. If even that file is
    refused, `problem` is raised at once."""
    try:
        report = predict(
            artifact_dir,
            test_path,
            out_path,
            InferenceConfig(device="cpu", progress=False),
            fallback_path=fallback_path,
            started_at=started_at,
            dialect=dialect if dialect in dialect_names() else None,
            fallback_over_previous=fallback_over_previous,
            input_error=problem,
        )
    except UsageError as error:  # e.g. the output itself refused: nothing can be written
        raise problem from error
    resolve_dialect(artifact_dir, report.dialect, test_path).validate(report.written_path, test_path)
    written = report.written_path
    message = f"{problem}; a fallback submission ({report.fallback_source}) was written to {written}"
    if is_competition_rerun():
        logger.error("competition rerun, so not failing: %s", message)
        return report
    raise type(problem)(message) from problem
