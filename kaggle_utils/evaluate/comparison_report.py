"""The typed comparison report: report.json read by attribute, written back unchanged in shape.

`ComparisonReport.from_dict(json.loads(text))`, then e.g. `report.run("ft-then-quant").folds[0].artifact_dir`,
`report.shipped_artifact`; `report.to_dict()` is report.json's form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kaggle_utils.core.errors import UsageError
from kaggle_utils.evaluate.ship import ShippedRun


@dataclass
class FoldRecord:
    """One fold of one run (`report.json` runs[i].per_fold[j])."""

    fold: int
    log_loss_16bit: float
    log_loss_quantized: float
    artifact_dir: str | None
    best_step: int | None = None
    log_loss_common_reference: float | None = None
    qid_vs_common: float | None = None
    metric_quantized: float | None = None
    history: list[dict] = field(default_factory=list)
    class_prior: list[float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    other: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoldRecord:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class RunRecord:
    """One (variant, seed): CV over its folds' OOF rows and the folds (`report.json` runs[i])."""

    variant: str
    ordering: str
    seed: int
    rows: int
    cv_log_loss_16bit: float
    cv_log_loss_quantized: float
    folds: list[FoldRecord]
    prior_log_loss: float | None = None
    qid_vs_common: float | None = None
    cv_log_loss_common_reference: float | None = None
    gap_vs_own_reference: float | None = None
    other: dict[str, Any] = field(default_factory=dict, repr=False)
    # not in report.json: the paired noise estimate's per-row losses and the ship decision's rows
    row_losses_quantized: np.ndarray | None = field(default=None, repr=False)
    shipped: ShippedRun | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        folds = [FoldRecord.from_dict(f) for f in data.pop("per_fold", [])]
        record = _from_dict(cls, {k: v for k, v in data.items() if not k.startswith("_")}, folds=folds)
        record.row_losses_quantized = data.get("_row_losses_quantized")
        record.shipped = data.get("_shipped")
        return record

    def to_dict(self) -> dict[str, Any]:
        data = _to_dict(self, skip=("folds", "row_losses_quantized", "shipped"))
        return {**data, "per_fold": [f.to_dict() for f in self.folds]}


@dataclass
class ComparisonReport:
    """The whole comparison (`report.json`): decision, common reference, variant summaries, runs, setup,
    environment, definitions, and the ship decision."""

    decision: dict[str, Any]
    runs: list[RunRecord]
    variants: list[dict[str, Any]]
    setup: dict[str, Any]
    common_reference: dict[str, Any] = field(default_factory=dict)
    ship: dict[str, Any] | None = None
    skipped_variants: dict[str, str] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonReport:
        data = dict(data)
        runs = [RunRecord.from_dict(run) for run in data.pop("runs", [])]
        return _from_dict(cls, data, runs=runs)

    def to_dict(self) -> dict[str, Any]:
        data = _to_dict(self, skip=("runs",))
        data["runs"] = [run.to_dict() for run in self.runs]
        return _ordered(data)

    def run(self, variant: str, seed: int | None = None) -> RunRecord:
        """The run of `variant` (and `seed`; None: the first seed run)."""
        for run in self.runs:
            if run.variant == variant and (seed is None or run.seed == seed):
                return run
        raise UsageError(
            f"no run of variant {variant!r}"
            + (f" seed {seed}" if seed is not None else "")
            + f" in this report (runs: {[(r.variant, r.seed) for r in self.runs]})"
        )

    @property
    def winner(self) -> str:
        return str(self.decision["winner"])

    @property
    def statement(self) -> str:
        return str(self.decision["statement"])

    @property
    def shipped_artifact(self) -> str | None:
        """What `predict --artifact` takes: the ship decision's choice (an artifact or an ensemble folder)."""
        return None if not self.ship else str(self.ship["artifact"])

    def summary(self, variant: str) -> dict[str, Any]:
        """A variant's summary: metric -> {"mean", "std"} over seeds (None where not measured)."""
        for summary in self.variants:
            if summary["variant"] == variant:
                return summary
        raise UsageError(f"no variant {variant!r} in this report")


# The order of report.json's top-level keys (as written before the typed report existed).
_TOP_LEVEL_ORDER = (
    "question",
    "dialect",
    "decision",
    "common_reference",
    "variants",
    "runs",
    "setup",
    "environment",
    "total_time_s",
    "definitions",
    "skipped_variants",
    "ship",
)


def _ordered(data: dict[str, Any]) -> dict[str, Any]:
    ordered = {key: data[key] for key in _TOP_LEVEL_ORDER if key in data}
    return {**ordered, **{k: v for k, v in data.items() if k not in ordered}}


def _from_dict(cls, data: dict[str, Any], **given: Any):
    """A record from its JSON form: named keys become fields, others are kept in `other`; optional fields the
    JSON lacked are remembered, so `to_dict` writes back exactly what was read."""
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in data.items() if k in names and k != "other"}
    other = {k: v for k, v in data.items() if k not in names}
    try:
        record = cls(**known, **given, other=other)
    except TypeError as error:
        raise UsageError(f"not a comparison report record ({cls.__name__}): {error}") from error
    record._absent = tuple(name for name in names - set(data) - set(given) if name != "other")
    return record


def _to_dict(record: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record's fields (less those its JSON lacked) and the keys it carried unnamed."""
    absent = set(getattr(record, "_absent", ()))
    data = {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(record)
        if f.name not in skip and f.name != "other" and f.name not in absent
    }
    return {**data, **record.other}
