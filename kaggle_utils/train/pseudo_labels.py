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

The teacher must not have seen the fold a student is scored on: dropping shared prompts is not enough when
a teacher trained on every fold labels the rows that fold's student trains on. So each fold gets its own
teacher: `pseudo-label --teacher F=FILE` (repeated, one per fold; FILE e.g. `predict` of the fold-F artifact
or of a run with ``train.exclude_folds=[F]``, a model trained without fold F; `--folds` names the folds file)
or a teacher whose file records its excluded folds (teacher.py). Each teacher's kept rows are written once per
fold it stands for, with that fold in the ``for_fold`` column (`FOR_FOLD`), and the file's parquet metadata
(`PSEUDO_RECORD_KEY`) lists the teachers: path, folds ({"F": {"rows", "ids_sha256"}},
metrics.exclusion_record's form), and whether the file recorded them or the user declared them. A single
teacher with no fold (a plain submission CSV) still works: its rows carry no ``for_fold`` and stand for any
fold, unverified. `pseudo_for_fold` (what `train_fold` uses) gives fold F's student only rows whose teacher
left out that very fold F, and refuses otherwise with one line (old files, an unverified teacher, a teacher
for other folds or on other folds) unless ``train.teacher_allow_leak`` is true.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.core.config import DataConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.fileio import atomic_write_parquet
from kaggle_utils.core.metrics import PROB_COLUMNS, read_parquet_record, write_parquet_record
from kaggle_utils.data.folds import group_ids, load_folds
from kaggle_utils.data.load import load_competition
from kaggle_utils.train.losses import SOFT_LABELS
from kaggle_utils.train.teacher import HeldOutFold, check_excluded, load_teacher_with_record, teacher_targets

PSEUDO_FOLD = -1
FOR_FOLD = "for_fold"  # the held-out fold whose training part a row is for (a per-fold teacher labelled it)
PSEUDO_RECORD_KEY = "kaggle_utils.pseudo_teachers"  # parquet metadata: {"teachers": [...]}
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
    # When the "unlabelled" file has labels (external conversations often do): how many kept rows have one,
    # and the share whose teacher argmax agrees with it (the pseudo-labels' accuracy; the labels are not
    # used).
    kept_with_file_label: int = 0
    agreement_with_file_label: float | None = None
    # One entry per teacher (the file's record): path, source ("teacher file", "declared" or "unverified"),
    # folds ({"F": {"rows", "ids_sha256"}}; None: unverified), excluded (what its record said), kept rows.
    teachers: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def make_pseudo_labels(
    teacher: str | Path | pl.DataFrame,
    unlabelled: pl.DataFrame,
    *,
    threshold: float | None = None,
    top_fraction: float | None = None,
    teacher_name: str | None = None,
) -> tuple[pl.DataFrame, PseudoReport]:
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
    report = PseudoReport(
        offered=unlabelled.height,
        kept_by_confidence=kept.height,
        threshold=threshold,
        top_fraction=top_fraction,
        min_confidence_kept=float(confidence[keep].min()) if len(keep) else None,
    )
    return kept, report


def dedupe_against(
    pseudo: pl.DataFrame, train: pl.DataFrame, report: PseudoReport | None = None
) -> tuple[pl.DataFrame, PseudoReport]:
    """`pseudo` without rows whose normalised prompt occurs in `train`, and without repeats of a prompt among
    the pseudo rows themselves (the first kept); both counted in the report (a new one if none is given)."""
    report = (
        report
        if report is not None
        else PseudoReport(offered=pseudo.height, kept_by_confidence=pseudo.height)
    )
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
    file_labels = pseudo.select("id").join(
        unlabelled.select("id", pl.col("label").alias("file_label")),
        on="id",
        how="left",
        maintain_order="left",
    )["file_label"]
    labelled = file_labels.is_not_null().to_numpy()
    report.kept_with_file_label = int(labelled.sum())
    if labelled.any():
        agree = pseudo["label"].to_numpy()[labelled] == file_labels.to_numpy()[labelled]
        report.agreement_with_file_label = float(agree.mean())
    return report


def parse_teacher_option(value: str) -> tuple[int | None, str]:
    """``FOLD=FILE`` -> (FOLD, FILE); ``FILE`` -> (None, FILE): the form of `pseudo-label --teacher`."""
    match = re.fullmatch(r"(\d+)=(.+)", value)
    return (int(match.group(1)), match.group(2)) if match else (None, value)


def resolve_teacher(
    path: str | Path,
    fold: int | None = None,
    folds: pl.DataFrame | None = None,
    teacher_name: str | None = None,
    folds_path: str | Path | None = None,
) -> dict:
    """One teacher's entry of the pseudo file's record: the folds it stands for and how that is known.

    `fold` given (``--teacher F=FILE``): the user declares FILE's model never trained on fold F; needs `folds`
    (the folds table F is numbered in), and a teacher whose file records its excluded folds must list F as
    the same rows (else DataError). No `fold`: the folds the file's record lists (checked against `folds` when
    given), or, with none, an unverified teacher (rows for any fold; training refuses them unless
    ``train.teacher_allow_leak``)."""
    _, _, record = load_teacher_with_record(path, teacher_name)
    excluded = None if record is None else record.get("excluded_folds", {})
    entry = {"path": str(path), "source": "unverified", "folds": None, "excluded": excluded, "kept": 0}
    if fold is None and not excluded:
        return entry
    wanted = [fold] if fold is not None else sorted(int(f) for f in excluded)
    if folds is None:
        if fold is not None:
            raise UsageError(
                f"pseudo-label: --teacher {fold}={path} names fold {fold}; give --folds (the folds "
                "file the students' folds come from)"
            )
        entry.update(source="teacher file", folds={str(f): excluded[str(f)] for f in wanted})
        return entry
    present = sorted(int(f) for f in folds["fold"].unique().to_list())
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise UsageError(
            f"pseudo-label: {path}: folds {unknown} are not in {folds_path or 'the folds'} (it has {present})"
        )
    held = {f: HeldOutFold.from_folds(folds, f) for f in wanted}
    if excluded is not None:
        for f in wanted:
            check_excluded(
                f"{path}: the teacher",
                excluded,
                held[f],
                allow_leak=False,
                fix=f"give fold {f} a teacher trained without it",
            )
        entry.update(source="teacher file", folds={str(f): excluded[str(f)] for f in wanted})
    else:
        entry.update(
            source="declared",
            folds={str(f): {"rows": len(held[f].ids), "ids_sha256": held[f].ids_sha256} for f in wanted},
        )
    return entry


def pseudo_labels_from_files(
    teacher: str | Path | Sequence[tuple[int | None, str | Path]],
    unlabelled_path: str | Path,
    train_path: str | Path,
    *,
    data_cfg: DataConfig | None = None,
    threshold: float | None = None,
    top_fraction: float | None = None,
    teacher_name: str | None = None,
    folds_path: str | Path | None = None,
) -> tuple[pl.DataFrame, PseudoReport]:
    """The `pseudo-label` command's work: parse `unlabelled_path` (the test file or external conversations in
    the competition format; labels it has are replaced by the teacher's), keep the confident rows, drop those
    whose normalised prompt is in `train_path` or repeats (counted), and refuse ids that are training ids (one
    id would name two rows; `join_pseudo` would refuse them hours later).

    `teacher`: one file, or (fold or None, file) pairs, one teacher per fold (`resolve_teacher`; `folds_path`
    the folds file the folds are numbered in). Each teacher's rows are kept by the rule on their own and
    written once per fold they stand for (``for_fold``); the report's `teachers` is the file's record and its
    counts add up over the teachers. A teacher with no fold must be the only one; two teachers for one fold
    are refused."""
    pairs = [(None, teacher)] if isinstance(teacher, (str, Path)) else list(teacher)
    if not pairs:
        raise UsageError("pseudo-label: give at least one --teacher")
    folds = load_folds(folds_path) if folds_path is not None else None
    entries = [resolve_teacher(path, fold, folds, teacher_name, folds_path) for fold, path in pairs]
    unverified = [entry["path"] for entry in entries if entry["folds"] is None]
    if unverified and len(entries) > 1:
        raise UsageError(
            f"pseudo-label: with several teachers each must stand for its folds; {unverified[0]} "
            "names none (give it as --teacher FOLD=FILE)"
        )
    claimed: dict[str, str] = {}
    for entry in entries:
        for fold in entry["folds"] or {}:
            if fold in claimed:
                raise UsageError(
                    f"pseudo-label: fold {fold} has two teachers, {claimed[fold]} and {entry['path']}"
                )
            claimed[fold] = entry["path"]
    unlabelled = load_competition(unlabelled_path, data_cfg, split="test").frame
    train = load_competition(train_path, data_cfg, split="train").frame
    report = PseudoReport(threshold=threshold, top_fraction=top_fraction, teachers=entries)
    pieces = []
    for entry in entries:
        kept, counts = make_pseudo_labels(
            entry["path"],
            unlabelled,
            threshold=threshold,
            top_fraction=top_fraction,
            teacher_name=teacher_name,
        )
        kept, counts = dedupe_against(kept, train, counts)
        entry["kept"] = kept.height
        _add_counts(report, counts)
        if entry["folds"] is None:
            pieces.append(kept)
        else:
            pieces += [
                kept.with_columns(pl.lit(int(fold), dtype=pl.Int32).alias(FOR_FOLD))
                for fold in entry["folds"]
            ]
    pseudo = pl.concat(pieces, how="vertical")
    label_agreement(pseudo, unlabelled, report)
    clash = pseudo.filter(pl.col("id").cast(pl.String).is_in(train["id"].cast(pl.String).implode()))["id"]
    if len(clash):
        raise DataError(
            f"{unlabelled_path}: {len(clash)} kept rows have ids that {train_path} also uses "
            f"(first: {clash.head(_SHOWN).to_list()}); give the unlabelled rows their own ids"
        )
    return pseudo, report


def _add_counts(total: PseudoReport, part: PseudoReport) -> None:
    """Add one teacher's counts to the command's report."""
    total.offered += part.offered
    total.kept_by_confidence += part.kept_by_confidence
    total.dropped_train_prompt += part.dropped_train_prompt
    total.dropped_duplicate_prompt += part.dropped_duplicate_prompt
    if part.min_confidence_kept is not None:
        total.min_confidence_kept = (
            part.min_confidence_kept
            if total.min_confidence_kept is None
            else min(total.min_confidence_kept, part.min_confidence_kept)
        )


def save_pseudo_labels(pseudo: pl.DataFrame, path: str | Path, teachers: list[dict] | None = None) -> Path:
    """Write pseudo rows (checked as `load_pseudo_labels` checks them) atomically, with `teachers` (the
    report's record: which teacher stands for which fold) in the file's metadata when given."""
    _check(pseudo, str(path))
    if teachers is None:
        return atomic_write_parquet(pseudo, path)
    return write_parquet_record(pseudo, path, PSEUDO_RECORD_KEY, {"teachers": teachers})


def load_pseudo_labels(path: str | Path) -> pl.DataFrame:
    """Read and check a pseudo-label file: the frame columns, a hard label and a soft target per row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pseudo-label file not found: {path}")
    pseudo = pl.read_parquet(path)
    _check(pseudo, str(path))
    return pseudo


def pseudo_for_fold(
    path: str | Path, held_out: HeldOutFold, allow_leak: bool = False
) -> tuple[pl.DataFrame, str]:
    """The rows of the pseudo-label file at `path` for the student scored on `held_out`, and the fold check's
    outcome (teacher.check_excluded): rows ``for_fold`` F whose teacher left out that very fold F. A file
    without per-fold rows (one unverified teacher, or written before records) is refused unless `allow_leak`
    (``train.teacher_allow_leak``), and then all its rows are used; a file with no rows for F is refused."""
    pseudo = load_pseudo_labels(path)
    record = read_parquet_record(path, PSEUDO_RECORD_KEY)
    teachers = record.get("teachers", []) if isinstance(record, dict) else []
    fold = held_out.fold
    relabel = (
        f"label fold {fold}'s rows with a teacher trained without it (`pseudo-label --teacher {fold}=FILE "
        f"--folds FOLDS`, FILE from `predict` with fold {fold}'s artifact)"
    )
    fix = f"{relabel} or set train.teacher_allow_leak=true to use them anyway"
    if FOR_FOLD not in pseudo.columns:
        teacher = teachers[0] if teachers else {}
        what = f"{path}: the pseudo-labels' teacher {teacher.get('path', '(not recorded)')}"
        return pseudo, check_excluded(what, teacher.get("excluded"), held_out, allow_leak, fix=fix)
    entry = next((t for t in teachers if str(fold) in (t.get("folds") or {})), None)
    rows = pseudo.filter(pl.col(FOR_FOLD) == fold).drop(FOR_FOLD)
    if entry is None or rows.is_empty():
        covered = sorted({int(f) for f in pseudo[FOR_FOLD].unique().to_list()})
        raise DataError(
            f"{path}: no pseudo-labels for fold {fold} (its rows are for folds {covered}, labelled by "
            f"teachers that saw fold {fold}); {relabel}"
        )
    what = f"{path}: fold {fold}'s pseudo-labels' teacher {entry.get('path')}"
    return rows, check_excluded(what, entry["folds"], held_out, allow_leak, fix=fix)


def join_pseudo(
    train_part: pl.DataFrame, held_out: list[pl.DataFrame], pseudo: pl.DataFrame
) -> tuple[pl.DataFrame, dict]:
    """`train_part` followed by the pseudo rows that share no prompt group with any `held_out` frame (the
    fold's validation rows, an inner holdout); the dropped ones counted. Pseudo rows are shaped like
    `train_part` (columns it has that they lack, e.g. model names of test rows, are null). Refuses pseudo
    ids that are training or held-out ids: one id would name two rows."""
    _check(pseudo, "pseudo-labels")
    reserved = pl.concat([frame["id"].cast(pl.String) for frame in (train_part, *held_out)])
    clash = pseudo.filter(pl.col("id").cast(pl.String).is_in(reserved.unique().to_list()))["id"]
    if len(clash):
        raise DataError(
            f"pseudo-labels: {len(clash)} ids are also training-data ids "
            f"(first: {clash.head(_SHOWN).to_list()}); pseudo rows need their own ids"
        )
    if SOFT_LABELS not in train_part.columns:
        raise UsageError(
            f"join_pseudo: the training part needs a {SOFT_LABELS!r} column for the pseudo rows' "
            "targets to sit beside (train_fold gives it the teacher's or the one-hot labels)"
        )
    held_groups = pl.concat([group_ids(frame) for frame in held_out]).unique().to_list() if held_out else []
    leaking = group_ids(pseudo).is_in(held_groups)
    kept = pseudo.filter(~leaking)
    shaped = kept.select(
        [
            pl.col(name).cast(dtype) if name in kept.columns else pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in train_part.schema.items()
            if name != SOFT_LABELS
        ]
        + [pl.col(SOFT_LABELS).cast(pl.List(pl.Float64))]
    )
    joined = pl.concat(
        [train_part.with_columns(pl.col(SOFT_LABELS).cast(pl.List(pl.Float64))), shaped], how="vertical"
    )
    return joined, {
        "pseudo_rows": pseudo.height,
        "pseudo_added": kept.height,
        "pseudo_dropped_held_out_group": int(leaking.sum()),
    }


def _check(pseudo: pl.DataFrame, source: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in pseudo.columns]
    if missing:
        raise DataError(f"{source}: pseudo-label rows lack columns {missing}")
    for column in ("id", "label", SOFT_LABELS):
        if pseudo[column].null_count():
            row = int(np.flatnonzero(pseudo[column].is_null().to_numpy())[0])
            raise DataError(f"{source}, row {row} (id {pseudo['id'][row]}): null {column}")
    key = ["id"]
    if FOR_FOLD in pseudo.columns:
        key.append(FOR_FOLD)
        if pseudo[FOR_FOLD].null_count():
            row = int(np.flatnonzero(pseudo[FOR_FOLD].is_null().to_numpy())[0])
            raise DataError(f"{source}, row {row} (id {pseudo['id'][row]}): null {FOR_FOLD}")
    duplicated = pseudo.filter(pl.struct(key).is_duplicated())["id"]
    if len(duplicated):
        where = " for one fold" if len(key) > 1 else ""
        raise DataError(
            f"{source}: {len(duplicated)} rows share an id{where} "
            f"(first: {duplicated.head(_SHOWN).to_list()})"
        )
    targets = pseudo[SOFT_LABELS].to_list()
    for row, vector in enumerate(targets):
        values = np.asarray(vector, dtype=np.float64)
        if (
            values.shape != (len(PROB_COLUMNS),)
            or not np.isfinite(values).all()
            or (values < 0).any()
            or abs(values.sum() - 1) > 1e-3
        ):
            raise DataError(
                f"{source}, row {row} (id {pseudo['id'][row]}): {SOFT_LABELS} must be "
                f"{len(PROB_COLUMNS)} finite probabilities >= 0 summing to 1, got {vector!r}"
            )
    labels = pseudo["label"].to_numpy()
    if ((labels < 0) | (labels >= len(PROB_COLUMNS))).any():
        row = int(np.flatnonzero((labels < 0) | (labels >= len(PROB_COLUMNS)))[0])
        raise DataError(f"{source}, row {row} (id {pseudo['id'][row]}): label {labels[row]} is not 0, 1 or 2")
