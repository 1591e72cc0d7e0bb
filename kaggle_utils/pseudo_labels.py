"""Pseudo-labels: unlabelled conversations labelled by a teacher, kept by confidence, trained on beside train.

Flow: `make_pseudo_labels(teacher, unlabelled, ...)` (the test file, or external conversations in the
competition format, parsed by data.load_competition) keeps the rows the teacher is confident about and gives
each its teacher probabilities as a soft target (``soft_labels``) and their argmax as the hard ``label``;
`dedupe_against(pseudo, train)` drops rows whose normalised prompt (folds.prompt_group_id, the normalisation
the folds group by) occurs in the training data: the external "33k" set overlapped both train and test, and a
pseudo row carrying a training prompt would leak that prompt's fold into the others. `save_pseudo_labels`
writes the result; ``--set train.pseudo_path=...`` makes `train_fold` add it to each fold's training part
through `join_pseudo`, which again drops (and counts) every pseudo row sharing a prompt group with that fold's
held-out rows, so a validation prompt is never trained on, whatever file was passed.

Pseudo rows have no fold (`PSEUDO_FOLD`, -1 where one is written) and are never held out or scored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.config import DataConfig
from kaggle_utils.data import load_competition
from kaggle_utils.errors import DataError, UsageError
from kaggle_utils.fileio import atomic_write_parquet
from kaggle_utils.folds import group_ids
from kaggle_utils.losses import SOFT_LABELS
from kaggle_utils.metrics import PROB_COLUMNS
from kaggle_utils.teacher import teacher_targets

PSEUDO_FOLD = -1
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "prompt", "response_a", "response_b", "label", SOFT_LABELS)
_SHOWN = 5


@dataclass
class PseudoReport:
    """Counts of one pseudo-labelling pass (what was offered, kept by the rule, dropped as a duplicate)."""

    offered: int = 0
    kept_by_confidence: int = 0
    threshold: float | None = None  # the rule: max probability >= threshold ...
    top_fraction: float | None = None  # ... or the most confident fraction of the rows
    min_confidence_kept: float | None = None
    dropped_train_prompt: int = 0  # dedupe_against: normalised prompt found in the training data
    dropped_duplicate_prompt: int = 0  # dedupe_against: a prompt seen earlier among the pseudo rows
    # When the "unlabelled" file has labels (external conversations often do): how many kept rows have one, and
    # the share whose teacher argmax agrees with it (the pseudo-labels' accuracy; the labels are not used).
    kept_with_file_label: int = 0
    agreement_with_file_label: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def make_pseudo_labels(teacher: str | Path | pl.DataFrame, unlabelled: pl.DataFrame, *,
                       threshold: float | None = None, top_fraction: float | None = None,
                       teacher_name: str | None = None) -> tuple[pl.DataFrame, PseudoReport]:
    """Rows of `unlabelled` the teacher is confident about, with ``label`` (argmax, Int8) and ``soft_labels``
    (the teacher's probabilities). Exactly one rule: ``threshold`` (keep max probability >= it) or
    ``top_fraction`` (keep the ceil(fraction * rows) most confident, ties in frame order). The teacher is an
    OOF-format parquet or table (teacher.py checks it; every unlabelled id must be in it)."""
    if (threshold is None) == (top_fraction is None):
        raise UsageError("make_pseudo_labels: give exactly one of threshold= or top_fraction=")
    if threshold is not None and not 1 / len(PROB_COLUMNS) <= threshold <= 1:
        raise UsageError(f"pseudo-label threshold must be in [1/3, 1] (a max probability), got {threshold}")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise UsageError(f"pseudo-label top_fraction must be in (0, 1], got {top_fraction}")
    if unlabelled.is_empty():
        raise DataError("make_pseudo_labels: the unlabelled frame has no rows")
    probs, _ = teacher_targets(unlabelled, teacher, teacher_name, rows="unlabelled")
    confidence = probs.max(axis=1)
    if threshold is not None:
        keep = np.flatnonzero(confidence >= threshold)
    else:
        order = np.argsort(-confidence, kind="stable")
        keep = np.sort(order[: math.ceil(top_fraction * len(order))])
    kept = unlabelled[keep.tolist()].with_columns(
        pl.Series("label", probs[keep].argmax(axis=1), dtype=pl.Int8),
        pl.Series(SOFT_LABELS, probs[keep].tolist(), dtype=pl.List(pl.Float64)),
    )
    report = PseudoReport(offered=unlabelled.height, kept_by_confidence=kept.height, threshold=threshold,
                          top_fraction=top_fraction,
                          min_confidence_kept=float(confidence[keep].min()) if len(keep) else None)
    return kept, report


def dedupe_against(pseudo: pl.DataFrame, train: pl.DataFrame, report: PseudoReport | None = None
                   ) -> tuple[pl.DataFrame, PseudoReport]:
    """`pseudo` without rows whose normalised prompt occurs in `train`, and without repeats of a prompt among
    the pseudo rows themselves (the first kept); both counted in the report (a new one if none is given)."""
    report = report if report is not None else PseudoReport(offered=pseudo.height, kept_by_confidence=pseudo.height)
    groups = group_ids(pseudo)
    in_train = groups.is_in(group_ids(train).unique().to_list()).to_numpy()
    repeated = ~groups.is_first_distinct().to_numpy() & ~in_train
    report.dropped_train_prompt += int(in_train.sum())
    report.dropped_duplicate_prompt += int(repeated.sum())
    return pseudo.filter(pl.Series(~(in_train | repeated))), report


def label_agreement(pseudo: pl.DataFrame, unlabelled: pl.DataFrame, report: PseudoReport) -> PseudoReport:
    """Fill the report's `kept_with_file_label` / `agreement_with_file_label`: how often the kept rows' pseudo
    label equals the label the unlabelled file carried (None when it carried none)."""
    if "label" not in unlabelled.columns:
        return report
    file_labels = pseudo.select("id").join(unlabelled.select("id", pl.col("label").alias("file_label")), on="id",
                                           how="left", maintain_order="left")["file_label"]
    labelled = file_labels.is_not_null().to_numpy()
    report.kept_with_file_label = int(labelled.sum())
    if labelled.any():
        agree = pseudo["label"].to_numpy()[labelled] == file_labels.to_numpy()[labelled]
        report.agreement_with_file_label = float(agree.mean())
    return report


def pseudo_labels_from_files(teacher: str | Path, unlabelled_path: str | Path, train_path: str | Path, *,
                             data_cfg: DataConfig | None = None, threshold: float | None = None,
                             top_fraction: float | None = None, teacher_name: str | None = None
                             ) -> tuple[pl.DataFrame, PseudoReport]:
    """The `pseudo-label` command's work: parse `unlabelled_path` (the test file or external conversations in
    the competition format; labels it has are replaced by the teacher's), keep the confident rows, drop those
    whose normalised prompt is in `train_path` or repeats (counted), and refuse ids that are training ids (one
    id would name two rows; `join_pseudo` would refuse them hours later)."""
    unlabelled = load_competition(unlabelled_path, data_cfg, split="test").frame
    train = load_competition(train_path, data_cfg, split="train").frame
    pseudo, report = make_pseudo_labels(teacher, unlabelled, threshold=threshold, top_fraction=top_fraction,
                                        teacher_name=teacher_name)
    pseudo, report = dedupe_against(pseudo, train, report)
    label_agreement(pseudo, unlabelled, report)
    clash = pseudo.filter(pl.col("id").cast(pl.String).is_in(train["id"].cast(pl.String).implode()))["id"]
    if len(clash):
        raise DataError(f"{unlabelled_path}: {len(clash)} kept rows have ids that {train_path} also uses "
                        f"(first: {clash.head(_SHOWN).to_list()}); give the unlabelled rows their own ids")
    return pseudo, report


def save_pseudo_labels(pseudo: pl.DataFrame, path: str | Path) -> Path:
    """Write pseudo rows (checked as `load_pseudo_labels` checks them) atomically."""
    _check(pseudo, str(path))
    return atomic_write_parquet(pseudo, path)


def load_pseudo_labels(path: str | Path) -> pl.DataFrame:
    """Read and check a pseudo-label file: the frame columns, a hard label and a soft target per row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pseudo-label file not found: {path}")
    pseudo = pl.read_parquet(path)
    _check(pseudo, str(path))
    return pseudo


def join_pseudo(train_part: pl.DataFrame, held_out: list[pl.DataFrame], pseudo: pl.DataFrame
                ) -> tuple[pl.DataFrame, dict]:
    """`train_part` followed by the pseudo rows that share no prompt group with any `held_out` frame (the
    fold's validation rows, an inner holdout); the dropped ones counted. Pseudo rows are shaped like
    `train_part` (columns it has that they lack, e.g. model names of test rows, are null). Refuses pseudo
    ids that are training or held-out ids: one id would name two rows."""
    _check(pseudo, "pseudo-labels")
    reserved = pl.concat([frame["id"].cast(pl.String) for frame in (train_part, *held_out)])
    clash = pseudo.filter(pl.col("id").cast(pl.String).is_in(reserved.unique().to_list()))["id"]
    if len(clash):
        raise DataError(f"pseudo-labels: {len(clash)} ids are also training-data ids "
                        f"(first: {clash.head(_SHOWN).to_list()}); pseudo rows need their own ids")
    if SOFT_LABELS not in train_part.columns:
        raise UsageError(f"join_pseudo: the training part needs a {SOFT_LABELS!r} column for the pseudo rows' "
                         "targets to sit beside (train_fold gives it the teacher's or the one-hot labels)")
    held_groups = pl.concat([group_ids(frame) for frame in held_out]).unique().to_list() if held_out else []
    leaking = group_ids(pseudo).is_in(held_groups)
    kept = pseudo.filter(~leaking)
    shaped = kept.select([
        pl.col(name).cast(dtype) if name in kept.columns else pl.lit(None, dtype=dtype).alias(name)
        for name, dtype in train_part.schema.items() if name != SOFT_LABELS
    ] + [pl.col(SOFT_LABELS).cast(pl.List(pl.Float64))])
    joined = pl.concat([train_part.with_columns(pl.col(SOFT_LABELS).cast(pl.List(pl.Float64))), shaped],
                       how="vertical")
    return joined, {"pseudo_rows": pseudo.height, "pseudo_added": kept.height,
                    "pseudo_dropped_held_out_group": int(leaking.sum())}


def _check(pseudo: pl.DataFrame, source: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in pseudo.columns]
    if missing:
        raise DataError(f"{source}: pseudo-label rows lack columns {missing}")
    for column in ("id", "label", SOFT_LABELS):
        if pseudo[column].null_count():
            row = int(np.flatnonzero(pseudo[column].is_null().to_numpy())[0])
            raise DataError(f"{source}, row {row} (id {pseudo['id'][row]}): null {column}")
    duplicated = pseudo.filter(pl.col("id").is_duplicated())["id"]
    if len(duplicated):
        raise DataError(f"{source}: {len(duplicated)} rows share an id (first: {duplicated.head(_SHOWN).to_list()})")
    targets = pseudo[SOFT_LABELS].to_list()
    for row, vector in enumerate(targets):
        values = np.asarray(vector, dtype=np.float64)
        if values.shape != (len(PROB_COLUMNS),) or not np.isfinite(values).all() or (values < 0).any() \
                or abs(values.sum() - 1) > 1e-3:
            raise DataError(f"{source}, row {row} (id {pseudo['id'][row]}): {SOFT_LABELS} must be "
                            f"{len(PROB_COLUMNS)} finite probabilities >= 0 summing to 1, got {vector!r}")
    labels = pseudo["label"].to_numpy()
    if ((labels < 0) | (labels >= len(PROB_COLUMNS))).any():
        row = int(np.flatnonzero((labels < 0) | (labels >= len(PROB_COLUMNS)))[0])
        raise DataError(f"{source}, row {row} (id {pseudo['id'][row]}): label {labels[row]} is not 0, 1 or 2")
