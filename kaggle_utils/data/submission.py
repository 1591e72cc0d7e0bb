"""Writing and validating `submission.csv`: exact columns, the test file's ids, finite rows that sum to one.

Kaggle reports a bad submission with no log, so the writer repairs (and counts) what it can, atomically, and
the validator rejects before upload what Kaggle would reject.
Usage: `write_submission(ids, probs, "submission.csv", expected_ids=test["id"])`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.core.errors import SubmissionError, one_line
from kaggle_utils.core.fileio import atomic_write_bytes

SUBMISSION_COLUMNS: tuple[str, ...] = ("id", *LABEL_COLUMNS)
SUM_TOLERANCE = 1e-6
# Rows whose sum is off by more than this are counted as renormalised (softmax output is off by ~1e-16).
_RENORMALISED_REPORT_TOLERANCE = 1e-9
_SHOWN = 10


@dataclass
class SubmissionReport:
    """What was written or validated, and every repair made on the way (with example ids)."""

    path: str
    rows: int
    renormalised_rows: int = 0
    fallback_rows: int = 0
    fallback: str = ""
    fallback_ids: list = field(default_factory=list)
    # label submissions (e.g. WSDM's `winner`): rows whose two probabilities were exactly equal, and the rule
    # that decided them (see dialects.ab_winners)
    tied_rows: int = 0
    tie_rule: str = ""

    def summary(self) -> str:
        text = f"{self.path}: {self.rows} rows"
        if self.renormalised_rows:
            text += f", {self.renormalised_rows} rows renormalised to sum 1"
        if self.fallback_rows:
            text += (
                f", {self.fallback_rows} rows with non-finite, negative or all-zero probabilities "
                f"replaced by the {self.fallback} (ids {_join(self.fallback_ids)})"
            )
        if self.tied_rows:
            text += f", {self.tied_rows} rows with equal probabilities decided by rule: {self.tie_rule}"
        return text

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "rows": self.rows,
            "renormalised_rows": self.renormalised_rows,
            "fallback_rows": self.fallback_rows,
            "fallback": self.fallback,
            "fallback_ids": [str(value) for value in self.fallback_ids],
            "tied_rows": self.tied_rows,
            "tie_rule": self.tie_rule,
        }


def write_submission(
    ids: Sequence | pl.Series,
    probs: np.ndarray,
    path: str | Path,
    expected_ids: Iterable | pl.Series | None = None,
    fallback_prior: np.ndarray | None = None,
) -> SubmissionReport:
    """Write `id, winner_model_a, winner_model_b, winner_tie` atomically; returns what was repaired.

    Rows are renormalised; a row that cannot be (NaN/inf, negative, all zeros) becomes `fallback_prior`
    (else uniform). With `expected_ids` (the test file's ids), the id sets must match exactly.
    """
    path = Path(path)
    ids_series = check_ids(ids, path, len(LABEL_COLUMNS), probs, expected_ids)
    repaired = repair_probabilities(probs, path, fallback_prior)
    probs, unusable = repaired.probs, repaired.fallback_mask

    table = pl.DataFrame(
        {"id": ids_series, **{column: probs[:, i] for i, column in enumerate(LABEL_COLUMNS)}}
    )
    buffer = io.BytesIO()
    table.write_csv(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return SubmissionReport(
        path=str(path),
        rows=table.height,
        renormalised_rows=repaired.renormalised_rows,
        fallback_rows=int(unusable.sum()),
        fallback=repaired.fallback_name if unusable.any() else "",
        fallback_ids=ids_series.filter(pl.Series(unusable)).head(_SHOWN).to_list(),
    )


def check_ids(
    ids: Sequence | pl.Series,
    path: Path,
    n_columns: int,
    probs: np.ndarray,
    expected_ids: Iterable | pl.Series | None = None,
) -> pl.Series:
    """The ids as a Series named `id`, after the checks every writer makes before touching the file:
    `probs` is (rows, n_columns), at least one row, no null or duplicate id, and (with `expected_ids`) exactly
    the test file's id set. Raises SubmissionError naming the file."""
    ids_series = ids.alias("id") if isinstance(ids, pl.Series) else pl.Series("id", list(ids))
    shape = np.shape(probs)
    if len(shape) != 2 or tuple(shape) != (len(ids_series), n_columns):
        raise SubmissionError(
            f"{path}: probabilities must have shape ({len(ids_series)}, {n_columns}), got {tuple(shape)}"
        )
    if len(ids_series) == 0:
        raise SubmissionError(f"{path}: refusing to write a submission with no rows")
    if ids_series.null_count():
        raise SubmissionError(f"{path}: {ids_series.null_count()} ids are null")
    expected = _as_string_ids(expected_ids) if expected_ids is not None else None
    problems = id_column_problems(ids_series.cast(pl.String).str.strip_chars(), expected)
    if problems:
        raise SubmissionError(f"{path}: " + "; ".join(problems))
    return ids_series


@dataclass
class RepairedProbabilities:
    """(n, k) rows summing to one; which rows were replaced by the fallback and how many renormalised."""

    probs: np.ndarray
    fallback_mask: np.ndarray
    renormalised_rows: int
    fallback_name: str


def repair_probabilities(
    probs: np.ndarray, path: Path, fallback_prior: np.ndarray | None = None
) -> RepairedProbabilities:
    """Rows renormalised to sum to one; a row that cannot be (NaN/inf, negative, all zeros) replaced by
    `fallback_prior` (or uniform) and counted. Shared by every dialect's writer, so no writer drops a row."""
    probs = np.array(probs, dtype=np.float64, copy=True)
    n_columns = probs.shape[1]
    if fallback_prior is None:
        fallback = np.full(n_columns, 1.0 / n_columns)
        fallback_name = "uniform distribution"
    else:
        fallback = np.asarray(fallback_prior, dtype=np.float64)
        if (
            fallback.shape != (n_columns,)
            or not np.all(np.isfinite(fallback))
            or np.any(fallback < 0)
            or not fallback.sum() > 0
        ):
            raise SubmissionError(
                f"{path}: fallback prior must be {n_columns} finite non-negative numbers, "
                f"got {fallback_prior}"
            )
        fallback = fallback / fallback.sum()
        fallback_name = "class prior " + "/".join(f"{value:.4f}" for value in fallback)

    with np.errstate(invalid="ignore"):
        sums = probs.sum(axis=1)
        unusable = ~np.all(np.isfinite(probs), axis=1) | np.any(probs < 0, axis=1) | ~(sums > 0)
    probs[unusable] = fallback
    sums = probs.sum(axis=1)
    renormalised = (~unusable) & (np.abs(sums - 1.0) > _RENORMALISED_REPORT_TOLERANCE)
    probs /= sums[:, None]
    return RepairedProbabilities(probs, unusable, int(renormalised.sum()), fallback_name)


def read_test_ids(test_path: str | Path) -> pl.Series:
    """The test file's ids as strings (CSV or parquet), read directly so a data-parsing problem elsewhere in
    the file cannot hide which ids need a prediction."""
    test_path = Path(test_path)
    if not test_path.is_file():
        raise SubmissionError(f"test file not found: {test_path}")
    try:
        if test_path.suffix == ".parquet":
            table = pl.read_parquet(test_path, columns=["id"]).select(pl.col("id").cast(pl.String))
        else:
            table = pl.read_csv(test_path, columns=["id"], infer_schema=False, encoding="utf8-lossy")
    except Exception as error:  # polars raises ColumnNotFoundError, ComputeError, ... for bad files
        raise SubmissionError(
            f"test file {test_path}: cannot read its 'id' column ({one_line(error)})"
        ) from error
    return table["id"].str.strip_chars()


def validate_submission(path: str | Path, test_path: str | Path) -> SubmissionReport:
    """Raise SubmissionError naming the file and offending ids for anything Kaggle would reject or misread.

    Checked: the exact header, unique ids equal to the test file's, finite values in [0, 1], rows summing to
    one within 1e-6. All problems found are listed in one message.
    """
    table = read_submission_table(path, SUBMISSION_COLUMNS)
    path = Path(path)
    problems: list[str] = []
    ids = table["id"].str.strip_chars()
    problems += id_column_problems(ids, read_test_ids(test_path))

    values = table.select(
        [pl.col(column).str.strip_chars().cast(pl.Float64, strict=False) for column in LABEL_COLUMNS]
    )
    for column in LABEL_COLUMNS:
        unparsable = values[column].is_null()
        if unparsable.any():
            problems.append(
                f"column '{column}' has unparsable or empty values "
                f"{_join(table[column].filter(unparsable).to_list())} "
                f"(ids {_join(ids.filter(unparsable).to_list())})"
            )
    matrix = values.to_numpy().astype(np.float64)
    parsed = ~np.any(np.isnan(matrix) & _null_mask(values), axis=1)
    with np.errstate(invalid="ignore"):
        checks = {
            "NaN or infinite probabilities": ~np.all(np.isfinite(matrix), axis=1) & parsed,
            "negative probabilities": np.any(matrix < 0, axis=1),
            "probabilities above 1": np.any(matrix > 1, axis=1),
        }
        finite = np.all(np.isfinite(matrix), axis=1)
        checks[f"rows not summing to 1 (tolerance {SUM_TOLERANCE:g})"] = finite & (
            np.abs(matrix.sum(axis=1) - 1.0) > SUM_TOLERANCE
        )
    for what, mask in checks.items():
        if mask.any():
            problems.append(
                f"{int(mask.sum())} rows with {what} (ids {_join(ids.filter(pl.Series(mask)).to_list())})"
            )

    if problems:
        raise SubmissionError(f"{path}: " + "; ".join(problems))
    return SubmissionReport(path=str(path), rows=table.height)


def read_submission_table(path: str | Path, columns: Sequence[str]) -> pl.DataFrame:
    """The submission file as strings, after the checks every dialect shares: it exists, parses as CSV, its
    header is exactly `columns` (what is missing, extra or out of order said), and it has rows."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"submission file not found: {path}")
    try:
        table = pl.read_csv(path, infer_schema=False, encoding="utf8")
    except Exception as error:  # polars: ComputeError / NoDataError / ShapeError for malformed CSV
        raise SubmissionError(f"{path}: not a readable CSV ({one_line(error)})") from error
    header = list(table.columns)
    if header != list(columns):
        missing = [column for column in columns if column not in header]
        extra = [column for column in header if column not in columns]
        details = []
        if missing:
            details.append(f"missing columns {missing}")
        if extra:
            details.append(f"extra columns {extra}")
        if not missing and not extra:
            details.append("columns in the wrong order")
        raise SubmissionError(
            f"{path}: header must be exactly {list(columns)}, got {header} ({'; '.join(details)})"
        )
    if table.height == 0:
        raise SubmissionError(f"{path}: no rows")
    return table


def id_column_problems(ids: pl.Series, expected: pl.Series | None) -> list[str]:
    """Every problem of a submission's `id` column, each with the file's line numbers: empty ids, duplicates,
    and against the test file's ids (unless `expected` is None) test ids missing (in test-file order) and ids
    the test file lacks. Shared by every dialect's writer and validator."""
    problems = []
    if ids.null_count():
        problems.append(f"field 'id' empty at lines {_join(_lines(ids.is_null()))}")
    present = ids.drop_nulls()
    duplicated = present.filter(present.is_duplicated()).unique(maintain_order=True).to_list()
    if duplicated:
        where = [f"{value} (lines {', '.join(map(str, _lines(ids == value)))})" for value in duplicated]
        problems.append(f"field 'id': {len(duplicated)} duplicate ids: {_join(where)}")
    if expected is None:
        return problems
    have, want = set(present.to_list()), set(expected.to_list())
    missing = [value for value in expected.to_list() if value not in have]
    if missing:
        problems.append(f"field 'id': {len(missing)} test ids missing ({_join(missing)})")
    extra_mask = ids.is_not_null() & ~ids.is_in(list(want))
    if extra_mask.any():
        extra = [
            f"{value} (line {line})"
            for value, line in zip(ids.filter(extra_mask).to_list(), _lines(extra_mask), strict=True)
        ]
        problems.append(f"field 'id': {int(extra_mask.sum())} ids not in the test file ({_join(extra)})")
    return problems


def _as_string_ids(ids: Iterable | pl.Series) -> pl.Series:
    series = ids if isinstance(ids, pl.Series) else pl.Series("id", list(ids))
    return series.cast(pl.String).str.strip_chars()


def _null_mask(values: pl.DataFrame) -> np.ndarray:
    return np.column_stack([values[column].is_null().to_numpy() for column in values.columns])


def _lines(mask: pl.Series) -> list[int]:
    """1-based file line numbers (the header is line 1) of the rows where `mask` is true."""
    return [index + 2 for index in np.flatnonzero(mask.fill_null(False).to_numpy())]


def _join(values: Sequence) -> str:
    shown = ", ".join(str(value) for value in list(values)[:_SHOWN])
    return shown + (", ..." if len(values) > _SHOWN else "")
