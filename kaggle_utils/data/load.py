"""Competition files -> one typed polars frame of turns, plus a report of everything repaired or dropped.

Cells are parsed by `data.cells`, every change is counted in a `DataReport` (`data.repairs`); problems a
user must fix (missing columns, bad ids or labels, unreadable files, no rows) raise `DataError`.
Usage: `loaded = load_competition("train.csv"); print(loaded.report.to_text())`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from kaggle_utils.core.config import DataConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import DataError, one_line
from kaggle_utils.data.cells import parse_json_column, wrap_plain_column
from kaggle_utils.data.dialects import dialect_names, get_dialect
from kaggle_utils.data.labels import MAX_EXAMPLES
from kaggle_utils.data.repairs import (
    BOTH_RESPONSES_EMPTY,
    EMPTY_PROMPT,
    IDENTICAL_NON_TIE,
    INVALID_UTF8,
    TURN_COUNT_MISMATCH,
    UNPARSEABLE_KEPT,
    DataReport,
)

TEXT_COLUMNS: tuple[str, str, str] = ("prompt", "response_a", "response_b")
MODEL_COLUMNS: tuple[str, str] = ("model_a", "model_b")
Split = Literal["train", "test", "auto"]


@dataclass
class LoadedData:
    """The parsed frame (contract in docs/ARCHITECTURE.md) and the report of how it was obtained."""

    frame: pl.DataFrame
    report: DataReport


def load_competition(
    path: str | Path,
    cfg: DataConfig | None = None,
    split: Split = "auto",
    *,
    progress: bool | None = None,
) -> LoadedData:
    """Read a competition file into the frame of docs/ARCHITECTURE.md and a `DataReport`.

    `split="auto"` means train when label columns are present. Unrecoverable train rows are dropped (or raise
    with `cfg.strict`); test rows are never dropped. `progress=None` shows a bar for large files.
    """
    cfg = cfg or DataConfig()
    if cfg.format not in dialect_names():
        raise DataError(
            f"{path}: unknown data format {cfg.format!r} (expected one of: {', '.join(dialect_names())})"
        )
    dialect = get_dialect(cfg.format)
    path = Path(path)
    report = DataReport(file=str(path), split=split, format=cfg.format)
    raw = _read_table(path, report)
    present = [c for c in dialect.label_columns if c in raw.columns]
    if split == "auto":
        split = "train" if present else "test"
    if split not in ("train", "test"):
        raise DataError(f"{path}: split must be 'train', 'test' or 'auto', got {split!r}")
    report.split = split
    report.rows_read = raw.height
    required = ["id", *TEXT_COLUMNS] + (list(dialect.label_columns) if split == "train" or present else [])
    optional = list(dialect.optional_columns)
    _check_columns(raw, required, optional, path, cfg.format, report)

    id_series = _parse_ids(raw["id"], path, report)
    ids = id_series.to_list()
    labels = dialect.parse_labels(raw, ids, path) if present else None
    if report.warnings and any(w.startswith("invalid UTF-8") for w in report.warnings):
        _count_replacement_chars(raw, ids, report)
    show = progress if progress is not None else raw.height >= 20_000
    texts, failures = _parse_text_columns(raw, ids, dialect.text_layout == "json_lists", path, show, report)
    keep = _handle_failures(failures, texts, ids, split, cfg.strict, path, report)
    _align_turns(texts, ids, keep, report)

    columns: dict[str, pl.Series] = {"id": id_series}
    for column in TEXT_COLUMNS:
        columns[column] = _list_series(column, texts[column])
    columns["label"] = pl.Series(
        "label", labels if labels is not None else [None] * raw.height, dtype=pl.Int8
    )
    for column in optional:
        if column in raw.columns:
            columns[column] = raw[column].cast(pl.String)
    frame = pl.DataFrame(columns)
    if keep is not None:
        frame = frame.filter(pl.Series(keep))
    report.rows_kept = frame.height
    _require_rows(frame, path, split, report)
    _observe(frame, report)
    return LoadedData(frame=frame, report=report)


def _check_columns(
    raw: pl.DataFrame,
    required: list[str],
    optional: list[str],
    path: Path,
    data_format: str,
    report: DataReport,
) -> None:
    """Raise `DataError` for a missing required column; warn about columns that will be ignored."""
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} for the {report.split} split "
            f"(format {data_format}; columns found: {', '.join(raw.columns) or 'none'})"
        )
    ignored = [c for c in raw.columns if c not in required and c not in optional]
    if ignored:
        report.warnings.append(f"ignored column(s): {', '.join(ignored)}")


def _parse_text_columns(
    raw: pl.DataFrame, ids: list[Any], json_lists: bool, path: Path, show: bool, report: DataReport
) -> tuple[dict[str, list[list[str] | None]], dict[int, list[str]]]:
    """Turns per text column, and per row index the messages of the fields nothing could recover."""
    texts: dict[str, list[list[str] | None]] = {}
    failures: dict[int, list[str]] = {}
    with progress_bar(total=raw.height * 3, desc=f"parsing {path.name}", unit="cell", enabled=show) as bar:
        for column in TEXT_COLUMNS:
            series = raw[column]
            if not isinstance(series.dtype, (pl.String, pl.List)):
                series = series.cast(pl.String)  # e.g. a numeric parquet column: its text is the turn
            if json_lists and series.dtype == pl.String:
                parsed, errors = parse_json_column(series.to_list(), ids, column, report, bar)
            else:
                parsed, errors = wrap_plain_column(series.to_list(), ids, report)
                bar.update(raw.height)
            texts[column] = parsed
            for index, message in errors.items():
                failures.setdefault(index, []).append(f"{column}: {message}")
    return texts, failures


def _require_rows(frame: pl.DataFrame, path: Path, split: str, report: DataReport) -> None:
    """No rows left means nothing to train on or no ids to predict: raise rather than pass silently."""
    if frame.height:
        return
    if report.rows_read == 0:
        raise DataError(f"{path}: no data rows (only a header); the {split} split needs at least one row")
    reasons = ", ".join(f"{reason}: {len(ids)}" for reason, ids in report.dropped.items())
    raise DataError(f"{path}: all {report.rows_read} data rows were dropped ({reasons}); nothing is left")


def _list_series(name: str, rows: list[list[str]]) -> pl.Series:
    """List(String) column from Python lists, built flat and grouped (much faster than nested lists)."""
    lengths = np.fromiter((len(turns) for turns in rows), dtype=np.int64, count=len(rows))
    flat = pl.Series(name, [turn for turns in rows for turn in turns], dtype=pl.String)
    grouped = (
        pl.DataFrame({"row": np.repeat(np.arange(len(rows), dtype=np.int64), lengths), name: flat})
        .group_by("row", maintain_order=True)
        .agg(pl.col(name))
    )
    return grouped[name]


def _read_table(path: Path, report: DataReport) -> pl.DataFrame:
    """CSV (all columns as strings, file order kept) or parquet; unreadable files become one DataError."""
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory, not a competition file (give the CSV/parquet file inside it)"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pl.read_parquet(path)
        try:
            return pl.read_csv(path, infer_schema=False)
        except pl.exceptions.ComputeError as error:
            if "utf-8" not in str(error).lower():
                raise
            frame = pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")
            report.warnings.append("invalid UTF-8 in the file: undecodable bytes were replaced by U+FFFD")
            return frame
    except pl.exceptions.NoDataError as error:
        raise DataError(f"{path}: cannot read: the file is empty ({error})") from error
    except (pl.exceptions.PolarsError, OSError) as error:
        raise DataError(f"{path}: cannot read as {_kind(path)}: {one_line(error)}") from error


def _kind(path: Path) -> str:
    return "parquet" if path.suffix.lower() in (".parquet", ".pq") else "CSV"


def _count_replacement_chars(raw: pl.DataFrame, ids: list[Any], report: DataReport) -> None:
    for column in TEXT_COLUMNS:
        if raw[column].dtype != pl.String:
            continue
        hits = raw[column].str.contains("\ufffd", literal=True).fill_null(False)
        for index in hits.arg_true().to_list():
            report.add_repair(INVALID_UTF8, ids[index])


def _parse_ids(series: pl.Series, path: Path, report: DataReport) -> pl.Series:
    """Ids as in the file: integers when all are (LMSYS), strings otherwise. No nulls, no duplicates."""
    if series.null_count():
        rows = series.is_null().arg_true().head(MAX_EXAMPLES).to_list()
        raise DataError(
            f"{path}: column 'id' is empty in {series.null_count()} row(s) "
            f"(data rows {[r + 1 for r in rows]})"
        )
    if series.dtype == pl.String:
        stripped = series.str.strip_chars()
        blank = stripped == ""
        if blank.any():
            rows = blank.arg_true().head(MAX_EXAMPLES).to_list()
            raise DataError(
                f"{path}: column 'id' is an empty string in {int(blank.sum())} row(s) "
                f"(data rows {[r + 1 for r in rows]}); every row needs an id (a submission echoes it back)"
            )
        as_int = stripped.cast(pl.Int64, strict=False)
        # integers only when that loses nothing ("007" or "1e3" stay strings: submissions echo ids back)
        if as_int.null_count() == 0 and (as_int.cast(pl.String) == stripped).all():
            series = as_int
        else:
            report.warnings.append("column 'id' is not all plain integers: ids kept as strings")
    duplicated = series.filter(series.is_duplicated()).unique(maintain_order=True)
    if duplicated.len():
        shown = duplicated.head(MAX_EXAMPLES).to_list()
        raise DataError(
            f"{path}: column 'id' has {duplicated.len()} duplicated id(s): {shown}"
            + (" ..." if duplicated.len() > len(shown) else "")
        )
    return series.rename("id")


def _handle_failures(
    failures: dict[int, list[str]],
    texts: dict[str, list[list[str] | None]],
    ids: list[Any],
    split: str,
    strict: bool,
    path: Path,
    report: DataReport,
) -> list[bool] | None:
    """Unrecoverable fields: drop the train row (or raise when strict); keep the test row with [""]."""
    if not failures:
        return None
    if strict and split == "train":
        detail = "; ".join(f"id {ids[i]}: {'; '.join(m)}" for i, m in list(failures.items())[:MAX_EXAMPLES])
        raise DataError(f"{path}: {len(failures)} row(s) cannot be parsed (strict=True): {detail}")
    keep = None if split == "test" else [True] * len(ids)
    for shown, (index, messages) in enumerate(failures.items()):
        for column in TEXT_COLUMNS:
            if texts[column][index] is None:
                # test: the row's value; train: a placeholder, the row is filtered out
                texts[column][index] = [""]
                if keep is None:
                    report.add_repair(UNPARSEABLE_KEPT, ids[index])
        if keep is not None:
            keep[index] = False
            columns = sorted({m.split(":", 1)[0] for m in messages}, key=TEXT_COLUMNS.index)
            report.add_drop("unparseable " + "+".join(columns), ids[index])
        if shown < MAX_EXAMPLES:  # details for the first rows; all of them are in the counts and `dropped`
            action = "kept with empty text" if keep is None else "dropped"
            report.warnings.append(f"id {ids[index]} {action}: " + "; ".join(messages))
    if len(failures) > MAX_EXAMPLES:
        report.warnings.append(
            f"{len(failures)} rows had unparseable fields in total (details for the first only)"
        )
    return keep


def _align_turns(
    texts: dict[str, list[list[str] | None]], ids: list[Any], keep: list[bool] | None, report: DataReport
) -> None:
    """Pad the shorter sides with "" so prompt/response_a/response_b have one entry per turn."""
    prompts, side_a, side_b = (texts[c] for c in TEXT_COLUMNS)
    for index in range(len(ids)):
        if keep is not None and not keep[index]:
            continue
        n_prompt, n_a, n_b = len(prompts[index]), len(side_a[index]), len(side_b[index])
        if n_prompt == n_a == n_b:
            continue
        width = max(n_prompt, n_a, n_b)
        for turns in (prompts[index], side_a[index], side_b[index]):
            turns.extend([""] * (width - len(turns)))
        report.add_repair(TURN_COUNT_MISMATCH, ids[index])


def _observe(frame: pl.DataFrame, report: DataReport) -> None:
    """Count label noise and degenerate rows without changing them."""
    all_empty = {c: pl.col(c).list.join("").str.len_bytes() == 0 for c in TEXT_COLUMNS}
    checks = {
        IDENTICAL_NON_TIE: (pl.col("response_a") == pl.col("response_b"))
        & pl.col("label").is_in([0, 1]).fill_null(False),
        BOTH_RESPONSES_EMPTY: all_empty["response_a"] & all_empty["response_b"],
        EMPTY_PROMPT: all_empty["prompt"],
    }
    flags = frame.select(**checks)
    for kind in checks:
        report.add_observation(kind, frame["id"].filter(flags[kind]).to_list())
