"""A teacher's probabilities -> per-row soft targets aligned to a training frame (distillation, losses.py).

The teacher file is the OOF store's layout (metrics.py: ``name, id, fold, p_a, p_b, p_tie, label``), so one
of our own runs can teach: a larger backbone's oof.parquet, or a fold ensemble's; a ``.csv`` path is read as
an LMSYS submission (`predict`'s output). Only ``id`` and the three probability columns are required (``name``
when the file holds several models). Out-of-fold predictions are what a teacher should give: each row's
prediction came from a model that did not train on it.

Checks, each an error naming the file, the row and the id, or a counted repair in `TeacherReport`:
  * a training row whose id the teacher lacks: error with the count and the first ids (a silent fallback to
    the hard label would make "distilled" runs partly undistilled without anyone noticing; a mismatch means
    the teacher was made on other data or other dedup, which the user must resolve);
  * duplicate ids: merged and counted when every copy has the same probabilities (within 1e-6), else error;
  * a row whose probabilities do not sum to 1 within 1e-3: renormalised and counted when within 0.05 (float32
    storage, rounding), else error;
  * null, negative or non-finite probabilities: error.
Ids are matched as text, so an integer id column and a string one pair up (the competition's ids are integers,
some exports write them as strings).

The fold a student is scored on must be one its teacher never saw: a plain K-fold teacher's OOF prediction for
a training row comes from a model that trained on the student's held-out fold, so that fold's labels reach the
student and its CV is optimistic. `teacher_targets(..., held_out=HeldOutFold.from_folds(folds, fold))` (what
`train_fold` passes) therefore refuses, with one line naming the file and the fold:
  * a teacher whose file records no excluded folds (a submission CSV; an OOF file written without a record);
  * a teacher whose record (metrics.exclusion_record, written by `baseline --oof` and compare-orderings'
    oof.parquet) does not list the held-out fold ("it saw fold F's labels");
  * a record whose fold F holds other rows than the student's fold F (another folds file);
  * a file with predictions for ids of a fold its record says was left out.
A nested teacher passes: `baseline --exclude-folds F --oof FILE`, or the teacher's run with
``--set "train.exclude_folds=[F]"`` on the student's folds file. ``train.teacher_allow_leak: true`` uses a
teacher anyway (the levers study measures the leak that way); the train summary's `fold_check` says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.metrics import PROB_COLUMNS, fold_ids_sha256, read_oof_records

SUM_TOLERANCE = 1e-3  # rows off by less are used as they are
RENORMALISE_LIMIT = 0.05  # rows off by up to this are renormalised (counted); beyond it, an error
DUPLICATE_TOLERANCE = 1e-6
_SHOWN = 5


@dataclass
class TeacherReport:
    """Where the soft targets came from and what was repaired: recorded in the train summary."""

    path: str
    name: str | None
    teacher_rows: int  # rows of the file (of `name`) before repairs
    matched_rows: int  # training rows given a soft target
    duplicates_merged: int  # surplus copies of ids whose copies all agreed
    renormalised: int  # rows whose sum was off by more than SUM_TOLERANCE but at most RENORMALISE_LIMIT
    excluded_folds: list[int] | None = (
        None  # the folds the teacher's run left out, per its record (None: none)
    )
    fold_check: str | None = None  # with a held-out fold: "excluded fold F", or why a leak was allowed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeldOutFold:
    """The fold a student is scored on: its number and every id the folds table puts in it."""

    fold: int
    ids: tuple[str, ...]

    @classmethod
    def from_folds(cls, folds: pl.DataFrame, fold: int) -> HeldOutFold:
        """Fold `fold` of a folds table (id, fold), e.g. the one `train_fold` holds out."""
        return cls(int(fold), tuple(str(v) for v in folds.filter(pl.col("fold") == fold)["id"].to_list()))

    @property
    def ids_sha256(self) -> str:
        return fold_ids_sha256(self.ids)


def nested_teacher_hint(fold: int) -> str:
    """How to make a teacher that never saw `fold` (the end of every refusal here and in pseudo_labels.py)."""
    return (
        "make a nested teacher on the student's folds file "
        f"(`baseline --exclude-folds {fold} --oof FILE`, or `--set train.exclude_folds=[{fold}]` on the "
        "teacher's run) or set train.teacher_allow_leak=true to use it anyway"
    )


def check_excluded(
    what: str,
    excluded: dict | None,
    held_out: HeldOutFold,
    allow_leak: bool,
    seen_ids: pl.Series | None = None,
    fix: str | None = None,
) -> str:
    """ "excluded fold F" when `excluded` (a record's ``excluded_folds``: {"F": {"rows", "ids_sha256"}}; None:
    no record) shows the held-out fold was left out, as the same rows, and `seen_ids` (ids the file predicts)
    holds none of them. Otherwise a DataError naming `what`, the fold and `fix` (default: make a nested
    teacher), or with `allow_leak` the text "allowed by train.teacher_allow_leak: <why>"."""
    fold = held_out.fold
    entry = None if excluded is None else excluded.get(str(fold))
    if excluded is None:
        problem = f"{what} records no excluded folds, so nothing shows it never saw fold {fold}'s labels"
    elif entry is None:
        listed = sorted(int(f) for f in excluded)
        problem = f"{what} saw fold {fold}'s labels (its run excluded {listed if listed else 'no fold'})"
    elif entry.get("ids_sha256") != held_out.ids_sha256:
        problem = (
            f"{what} left out a fold {fold} of {entry.get('rows')} rows that is not this run's fold "
            f"{fold} ({len(held_out.ids)} rows): made on another folds file"
        )
    else:
        problem = None
        if seen_ids is not None:
            inside = seen_ids.filter(seen_ids.is_in(list(held_out.ids)))
            if len(inside):
                problem = (
                    f"{what} predicts {len(inside)} ids of fold {fold} (first: "
                    f"{inside.head(_SHOWN).to_list()}) though its record says that fold was left out"
                )
    if problem is None:
        return f"excluded fold {fold}"
    if allow_leak:
        return f"allowed by train.teacher_allow_leak: {problem}"
    raise DataError(f"{problem}; {fix or nested_teacher_hint(fold)}")


def load_teacher(
    source: str | Path | pl.DataFrame, name: str | None = None
) -> tuple[pl.DataFrame, TeacherReport]:
    """The teacher's rows as (``id`` as text, ``p_a``, ``p_b``, ``p_tie``), checked and repaired as the module
    says; the report has the counts (`matched_rows` is filled in by `teacher_targets`) and the folds the
    teacher's record says its run left out. `source` is the parquet's path or an OOF-format table already in
    memory (then named "teacher table" in messages; a table has no record)."""
    table, report, _ = load_teacher_with_record(source, name)
    return table, report


def load_teacher_with_record(
    source: str | Path | pl.DataFrame, name: str | None = None
) -> tuple[pl.DataFrame, TeacherReport, dict | None]:
    """`load_teacher` plus the teacher's exclusion record (metrics.exclusion_record) for the chosen name: None
    for a CSV, a table in memory, or an OOF file written without one."""
    record = None
    if isinstance(source, pl.DataFrame):
        table, path = source, Path("teacher table")
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"teacher file not found: {path}")
        if path.suffix.lower() == ".csv":
            table = teacher_from_submission(path)
        else:
            table = _read_table(path, pl.read_parquet, "parquet")
    missing = [column for column in ("id", *PROB_COLUMNS) if column not in table.columns]
    if missing:
        raise DataError(f"{path}: teacher file lacks columns {missing} (needs id, {', '.join(PROB_COLUMNS)})")
    table = _select_name(table, path, name)
    if not isinstance(source, pl.DataFrame) and path.suffix.lower() != ".csv" and "name" in table.columns:
        names = table["name"].unique().to_list()
        record = read_oof_records(path).get(str(names[0])) if len(names) == 1 else None
    rows = table.height
    table = table.select(pl.col("id").cast(pl.String), *[pl.col(c).cast(pl.Float64) for c in PROB_COLUMNS])
    _check_values(table, path)
    table, merged = _merge_duplicates(table, path)
    table, renormalised = _check_sums(table, path)
    excluded = None if record is None else sorted(int(f) for f in record.get("excluded_folds", {}))
    return table, TeacherReport(str(path), name, rows, 0, merged, renormalised, excluded), record


def teacher_from_submission(path: str | Path) -> pl.DataFrame:
    """A teacher table (id, p_a, p_b, p_tie) from an LMSYS submission.csv, i.e. `predict`'s output on the test
    file, on external conversations or on training rows. A ``.csv`` teacher path is read this way. A CSV
    records no excluded folds: it labels pseudo rows (`pseudo-label --teacher F=FILE` declares the fold its
    model never saw), and distils training rows only with ``train.teacher_allow_leak``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"submission file not found: {path}")
    table = _read_table(path, pl.read_csv, "CSV")
    missing = [column for column in ("id", *LABEL_COLUMNS) if column not in table.columns]
    if missing:
        raise DataError(f"{path}: not an LMSYS submission (lacks columns {missing})")
    return table.select("id", *[pl.col(c).alias(p) for c, p in zip(LABEL_COLUMNS, PROB_COLUMNS, strict=True)])


def _read_table(path: Path, reader, kind: str) -> pl.DataFrame:
    try:
        return reader(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise DataError(f"{path}: not a readable {kind} file ({type(error).__name__}: {error})") from None


def teacher_targets(
    frame: pl.DataFrame,
    path: str | Path | pl.DataFrame,
    name: str | None = None,
    rows: str = "training",
    held_out: HeldOutFold | None = None,
    allow_leak: bool = False,
) -> tuple[np.ndarray, TeacherReport]:
    """(rows, 3) teacher probabilities in `frame`'s row order, and the report. Every frame id must be in the
    teacher (else DataError with the count and the first ids). With `held_out` (the student's scored fold;
    `train_fold` always gives it) the teacher must have left that fold out (`check_excluded`; `allow_leak`:
    ``train.teacher_allow_leak``); the outcome is the report's `fold_check`."""
    table, report, record = load_teacher_with_record(path, name)
    path = report.path
    ids = frame["id"].cast(pl.String)
    joined = pl.DataFrame({"id": ids}).join(table, on="id", how="left", maintain_order="left")
    lacking = joined.filter(pl.col(PROB_COLUMNS[0]).is_null())["id"]
    if len(lacking):
        raise DataError(
            f"{path}: the teacher lacks {len(lacking)} of {frame.height} {rows} ids "
            f"(first: {lacking.head(_SHOWN).to_list()}); make the teacher on the same rows"
        )
    report.matched_rows = frame.height
    if held_out is not None:
        excluded = None if record is None else record.get("excluded_folds", {})
        report.fold_check = check_excluded(
            f"{path}: the teacher", excluded, held_out, allow_leak, table["id"]
        )
    return joined.select(PROB_COLUMNS).to_numpy().astype(np.float64), report


def _select_name(table: pl.DataFrame, path: Path, name: str | None) -> pl.DataFrame:
    if "name" not in table.columns:
        if name is not None:
            raise DataError(f"{path}: no 'name' column, so train.teacher_name={name!r} cannot be picked")
        return table
    names = sorted(str(n) for n in table["name"].unique().to_list())
    if name is None:
        if len(names) > 1:
            raise UsageError(
                f"{path}: the teacher file holds {len(names)} models {names}; "
                f"set train.teacher_name to one of them"
            )
        return table
    if name not in names:
        raise DataError(f"{path}: no teacher rows named {name!r} (names: {names})")
    return table.filter(pl.col("name") == name)


def _check_values(table: pl.DataFrame, path: Path) -> None:
    if table["id"].null_count():
        row = int(np.flatnonzero(table["id"].is_null().to_numpy())[0])
        raise DataError(f"{path}, row {row}: null id")
    probs = table.select(PROB_COLUMNS).to_numpy()
    bad = ~np.isfinite(probs) | (probs < 0)  # NaN (nulls read as NaN) fails isfinite
    if bad.any():
        row, column = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"{path}, row {row} (id {table['id'][row]}): {PROB_COLUMNS[column]} is "
            f"{table[PROB_COLUMNS[column]][row]!r}; teacher probabilities must be finite and >= 0 "
            f"({int(bad.any(axis=1).sum())} such rows)"
        )


def _merge_duplicates(table: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, int]:
    duplicated = table.filter(pl.col("id").is_duplicated())
    if duplicated.is_empty():
        return table, 0
    spread = duplicated.group_by("id").agg(
        [(pl.col(c).max() - pl.col(c).min()).alias(c) for c in PROB_COLUMNS]
    )
    disagree = spread.filter(pl.any_horizontal([pl.col(c) > DUPLICATE_TOLERANCE for c in PROB_COLUMNS]))
    if disagree.height:
        first = disagree["id"][0]
        rows = np.flatnonzero((table["id"] == first).to_numpy()).tolist()
        raise DataError(
            f"{path}, rows {rows} (id {first}): {disagree.height} ids appear more than once with "
            f"different probabilities (first: {disagree['id'].head(_SHOWN).to_list()})"
        )
    unique = table.unique(subset="id", keep="first", maintain_order=True)
    return unique, table.height - unique.height


def _check_sums(table: pl.DataFrame, path: Path) -> tuple[pl.DataFrame, int]:
    probs = table.select(PROB_COLUMNS).to_numpy()
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0)
    beyond = np.flatnonzero(off > RENORMALISE_LIMIT)
    if len(beyond):
        row = int(beyond[0])
        raise DataError(
            f"{path}, row {row} (id {table['id'][row]}): probabilities sum to {sums[row]:.6g}, "
            f"not 1 (more than {RENORMALISE_LIMIT} off; {len(beyond)} such rows)"
        )
    repair = off > SUM_TOLERANCE
    if not repair.any():
        return table, 0
    probs[repair] /= sums[repair, None]
    fixed = table.with_columns(*[pl.Series(c, probs[:, i]) for i, c in enumerate(PROB_COLUMNS)])
    return fixed, int(repair.sum())
