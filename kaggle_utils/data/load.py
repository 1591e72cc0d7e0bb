"""Competition files -> one typed polars frame of turns, plus a report of everything repaired or dropped.

The LMSYS files store each conversation side as a JSON list of strings, one per turn, and the real files
contain every way of getting that wrong: `[null]`, `[]`, lone UTF-16 surrogates that `json` accepts but UTF-8
encoding (every tokenizer) rejects, Python-literal lists, truncated lists, and sides whose turn counts
disagree. Public notebooks died on these ("Notebook Threw Exception", no log) or silently mangled them. Here
each cell is parsed with `json.loads` (fast path; polars' `str.json_decode` is not used because it turns lone
surrogates into U+0000), falls back to a tolerant scanner when that fails, and every change is counted by kind
with example ids in a `DataReport`. Rows that cannot be recovered are dropped from train (listed by id) and
never from test, where each id needs a prediction. Structural problems a user must fix (missing columns,
empty or duplicate ids, labels that are not one-hot, unreadable files, a directory, no data rows) raise
`DataError` naming the file, the column and the ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from kaggle_utils.core.config import DataConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import DataError, one_line
from kaggle_utils.data.dialects import dialect_names, get_dialect
from kaggle_utils.data.labels import MAX_EXAMPLES, parse_one_hot_labels, parse_winner_labels  # noqa: F401  (re-exported)

TEXT_COLUMNS: tuple[str, str, str] = ("prompt", "response_a", "response_b")
MODEL_COLUMNS: tuple[str, str] = ("model_a", "model_b")

# Repair kinds: a field (cell) was changed so that it fits the contract. Counts are per field, except
# TURN_COUNT_MISMATCH (per row) and INVALID_UTF8 (per field containing U+FFFD after a lossy read).
NULL_CELL = "null_cell"  # missing cell or a JSON `null` instead of a list -> [""]
NULL_TURN = "null_turn"  # `null` inside the list -> ""
EMPTY_LIST = "empty_list"  # [] -> [""]
NON_STRING_TURN = "non_string_turn"  # a number / object inside the list -> its JSON text
LONE_SURROGATE = "lone_surrogate"  # unpaired UTF-16 surrogate -> U+FFFD
NUL_CHARACTER = "nul_character"  # U+0000 removed
FALLBACK_PARSED = "fallback_parsed"  # json.loads failed; the tolerant scanner recovered the turns
BARE_STRING = "bare_string"  # a string instead of a list -> one turn
TURN_COUNT_MISMATCH = "turn_count_mismatch"  # shorter sides padded with "" so turns align
UNPARSEABLE_KEPT = "unparseable_kept_empty"  # test split: unrecoverable field -> [""] (the row is kept)
INVALID_UTF8 = "invalid_utf8"  # file not valid UTF-8: bad bytes became U+FFFD

# Observations: counted, not changed (label noise and degenerate rows a model should know about).
IDENTICAL_NON_TIE = "identical_responses_non_tie"
BOTH_RESPONSES_EMPTY = "both_responses_empty"
EMPTY_PROMPT = "empty_prompt"

Split = Literal["train", "test", "auto"]

_BAD_CHARS = re.compile("[\ud800-\udfff\x00]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A raw cell can only produce a surrogate or U+0000 through a \u escape (polars hands us valid UTF-8).
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89abcdefABCDEF]|0000)")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_SIMPLE_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "/": "/",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_WHITESPACE = " \t\r\n"


# --------------------------------------------------------------------------------------------------- report
@dataclass
class DataReport:
    """What loading did to a file: rows in and out, repairs by kind, observations, drops, warnings."""

    file: str
    split: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    repair_examples: dict[str, list[Any]] = field(default_factory=dict)
    observations: dict[str, int] = field(default_factory=dict)
    observation_examples: dict[str, list[Any]] = field(default_factory=dict)
    dropped: dict[str, list[Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - self.rows_kept

    @property
    def dropped_ids(self) -> list[Any]:
        seen: dict[Any, None] = {}
        for ids in self.dropped.values():
            seen.update(dict.fromkeys(ids))
        return list(seen)

    def add_repair(self, kind: str, row_id: Any, count: int = 1) -> None:
        _count(self.repairs, self.repair_examples, kind, row_id, count)

    def add_observation(self, kind: str, ids: Sequence[Any]) -> None:
        if ids:
            self.observations[kind] = self.observations.get(kind, 0) + len(ids)
            examples = self.observation_examples.setdefault(kind, [])
            examples.extend(list(ids)[: MAX_EXAMPLES - len(examples)])

    def add_drop(self, reason: str, row_id: Any) -> None:
        self.dropped.setdefault(reason, []).append(row_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (ids are kept as they are in the file: int or str)."""
        return {
            "file": self.file,
            "split": self.split,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "repairs": {
                k: {"count": v, "example_ids": self.repair_examples.get(k, [])}
                for k, v in self.repairs.items()
            },
            "observations": {
                k: {"count": v, "example_ids": self.observation_examples.get(k, [])}
                for k, v in self.observations.items()
            },
            "dropped": {k: list(v) for k, v in self.dropped.items()},
            "warnings": list(self.warnings),
        }

    def to_text(self) -> str:
        """A short aligned table for a terminal or a notebook cell."""
        lines = [
            f"data report: {self.file}",
            f"  split {self.split}, format {self.format}: {self.rows_read} rows read, {self.rows_kept} kept, "
            f"{self.rows_dropped} dropped",
        ]
        sections = [
            ("repairs (fields changed)", self.repairs, self.repair_examples),
            ("observations (counted, not changed)", self.observations, self.observation_examples),
            ("dropped rows", {k: len(v) for k, v in self.dropped.items()}, self.dropped),
        ]
        width = max([len(k) for _, counts, _ in sections for k in counts] + [12])
        for title, counts, examples in sections:
            if not counts:
                lines.append(f"{title}: none")
                continue
            lines.append(f"{title}:")
            lines.append(f"  {'kind':<{width}}  {'count':>7}  example ids")
            for kind in sorted(counts):
                shown = examples.get(kind, [])[:MAX_EXAMPLES]
                more = " ..." if counts[kind] > len(shown) else ""
                lines.append(f"  {kind:<{width}}  {counts[kind]:>7}  {', '.join(map(str, shown))}{more}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def _count(counts: dict[str, int], examples: dict[str, list[Any]], kind: str, row_id: Any, n: int) -> None:
    counts[kind] = counts.get(kind, 0) + n
    kept = examples.setdefault(kind, [])
    if len(kept) < MAX_EXAMPLES and (not kept or kept[-1] != row_id):
        kept.append(row_id)


@dataclass
class LoadedData:
    """The parsed frame (contract in docs/ARCHITECTURE.md) and the report of how it was obtained."""

    frame: pl.DataFrame
    report: DataReport


# --------------------------------------------------------------------------------------------- cell parsing
@dataclass
class ParsedCell:
    """One JSON-list cell: the turns (None when nothing could be recovered), repair kinds applied, error."""

    turns: list[str] | None
    repairs: list[str]
    error: str | None = None


class _ScanError(ValueError):
    pass


def parse_turn_list(raw: str | None) -> ParsedCell:
    """Parse one LMSYS cell into turns, repairing what can be repaired and saying what was done.

    Valid JSON lists of strings come back unchanged. Everything else goes through the documented repairs; a
    cell that is neither JSON nor recoverable by the tolerant scanner gives `turns=None` and an error text.
    """
    if raw is None or not raw.strip():
        return ParsedCell([""], [NULL_CELL])
    text = raw.strip()
    repairs: list[str] = []
    try:
        value: Any = json.loads(text)
    except (ValueError, RecursionError):
        try:
            value = _scan_literal(text)
        except _ScanError as error:
            return ParsedCell(None, [], str(error))
        repairs.append(FALLBACK_PARSED)
    return _normalise(value, text, repairs)


def _normalise(value: Any, text: str, repairs: list[str]) -> ParsedCell:
    """Turn any decoded value into a non-empty list of UTF-8-safe strings, recording each change."""
    if value is None:
        return ParsedCell([""], repairs + [NULL_CELL])
    if isinstance(value, str):
        value = [value]
        repairs.append(BARE_STRING)
    elif isinstance(value, (bool, int, float)):
        value = [text]
        repairs.append(BARE_STRING)
    elif not isinstance(value, list):
        return ParsedCell(
            None, repairs, f"a JSON {type(value).__name__} where a list of strings was expected"
        )
    if not value:
        return ParsedCell([""], repairs + [EMPTY_LIST])
    turns: list[str] = []
    for item in value:
        if item is None:
            if NULL_TURN not in repairs:
                repairs.append(NULL_TURN)
            turns.append("")
        elif isinstance(item, str):
            turns.append(_clean_text(item, repairs) if _BAD_CHARS.search(item) else item)
        else:
            if NON_STRING_TURN not in repairs:
                repairs.append(NON_STRING_TURN)
            turns.append(_clean_text(json.dumps(item, ensure_ascii=False), repairs))
    return ParsedCell(turns, repairs)


def _clean_text(text: str, repairs: list[str]) -> str:
    """Pair up surrogates, replace lone ones by U+FFFD and drop U+0000, so the text encodes to UTF-8."""
    if _SURROGATE.search(text):
        paired = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        if paired.count("\ufffd") > text.count("\ufffd") and LONE_SURROGATE not in repairs:
            repairs.append(LONE_SURROGATE)
        text = paired
    if "\x00" in text:
        text = text.replace("\x00", "")
        if NUL_CHARACTER not in repairs:
            repairs.append(NUL_CHARACTER)
    return text


def _scan_literal(text: str) -> Any:
    """Tolerant reader for what `json.loads` rejects: Python-literal lists (single quotes, None), truncated
    lists, unescaped quotes inside a string, and a bare string. Raises `_ScanError` when the structure is
    genuinely ambiguous (e.g. unquoted items), so such a cell is reported rather than guessed."""
    first = text[0]
    if first in "\"'":
        value, _ = _scan_string(text, 0)
        return value
    if first == "{":
        raise _ScanError("malformed JSON object where a list of strings was expected")
    if first != "[":
        return text  # plain unquoted text: one turn
    items: list[str | None] = []
    pos, n = 1, len(text)
    while True:
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        if pos >= n:
            return items  # truncated list
        char = text[pos]
        if char == "]":
            if text[pos + 1 :].strip():
                raise _ScanError(f"unexpected text after the closing bracket at character {pos + 1}")
            return items
        if char == ",":
            pos += 1
        elif char in "\"'":
            value, pos = _scan_string(text, pos)
            items.append(value)
        elif text.startswith("null", pos) or text.startswith("None", pos):
            items.append(None)
            pos += 4
        else:
            raise _ScanError(
                f"unexpected {char!r} at character {pos}: list items must be quoted strings or null"
            )


def _scan_string(text: str, start: int) -> tuple[str, int]:
    """Read a quoted string from `start`; a quote counts as closing only where a list could continue."""
    quote, pos, n = text[start], start + 1, len(text)
    parts: list[str] = []
    while pos < n:
        char = text[pos]
        if char == "\\" and pos + 1 < n:
            escape = text[pos + 1]
            if escape == "u" and _HEX4.fullmatch(text, pos + 2, pos + 6):
                parts.append(chr(int(text[pos + 2 : pos + 6], 16)))
                pos += 6
                continue
            parts.append(_SIMPLE_ESCAPES.get(escape, "\\" + escape))
            pos += 2
        elif char == quote and _closes_string(text, pos + 1):
            return "".join(parts), pos + 1
        else:
            parts.append(char)
            pos += 1
    return "".join(parts), n  # truncated inside the string


def _closes_string(text: str, pos: int) -> bool:
    """True when a quote is followed by the end, `]` + end, or `,` + another item: otherwise it is content."""
    n = len(text)
    while pos < n and text[pos] in _WHITESPACE:
        pos += 1
    if pos >= n:
        return True
    if text[pos] == "]":
        return not text[pos + 1 :].strip()
    if text[pos] != ",":
        return False
    pos += 1
    while pos < n and text[pos] in _WHITESPACE:
        pos += 1
    return pos >= n or text[pos] in "\"']" or text.startswith(("null", "None"), pos)


def _parse_json_column(
    raws: list[str | None], ids: list[Any], column: str, report: DataReport, bar: Any
) -> tuple[list[list[str] | None], dict[int, str]]:
    """Parse a whole column: fast path for clean cells, `parse_turn_list` for the rest."""
    loads = json.loads
    suspect = _SUSPECT_ESCAPE.search
    turns_out: list[list[str] | None] = []
    errors: dict[int, str] = {}
    for index, raw in enumerate(raws):
        if raw is not None:
            try:
                value = loads(raw)
            except (ValueError, RecursionError):
                value = None
            if (
                type(value) is list
                and value
                and all(type(turn) is str for turn in value)
                and not ("\\u" in raw and suspect(raw))
                and "\x00" not in raw
            ):
                turns_out.append(value)
                if index & 4095 == 4095:
                    bar.update(4096)
                continue
        parsed = parse_turn_list(raw)
        for kind in parsed.repairs:
            report.add_repair(kind, ids[index])
        if parsed.turns is None:
            errors[index] = parsed.error or "unparseable"
        turns_out.append(parsed.turns)
        if index & 4095 == 4095:
            bar.update(4096)
    bar.update(len(raws) % 4096)
    return turns_out, errors


def _wrap_plain_column(
    values: list[Any], ids: list[Any], report: DataReport
) -> tuple[list[list[str] | None], dict[int, str]]:
    """WSDM (plain strings) or already-list columns: one turn per string, with the same null/char repairs."""
    out: list[list[str] | None] = []
    for index, value in enumerate(values):
        if value is None:
            report.add_repair(NULL_CELL, ids[index])
            out.append([""])
            continue
        parsed = _normalise(value, "", [])
        kinds = [kind for kind in parsed.repairs if kind != BARE_STRING]  # a plain string is the WSDM format
        for kind in kinds:
            report.add_repair(kind, ids[index])
        out.append(parsed.turns)
    return out, {}


# ------------------------------------------------------------------------------------------------ the loader
def load_competition(
    path: str | Path,
    cfg: DataConfig | None = None,
    split: Split = "auto",
    *,
    progress: bool | None = None,
) -> LoadedData:
    """Read a competition file into the frame of docs/ARCHITECTURE.md and a `DataReport`.

    `split="auto"` means train when the label columns are present; labels are read whenever they are present
    (also for split="test"), otherwise `label` is null. Train rows whose text cannot be recovered
    are dropped and listed in the report (`cfg.strict=True` raises `DataError` instead); test rows are never
    dropped: an unrecoverable field becomes [""] and is counted. A file left with no rows (header only, or
    every train row dropped) raises `DataError`. `progress=None` shows a bar for large files.
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
    label_columns = dialect.label_columns
    present = [c for c in label_columns if c in raw.columns]
    if split == "auto":
        split = "train" if present else "test"
    if split not in ("train", "test"):
        raise DataError(f"{path}: split must be 'train', 'test' or 'auto', got {split!r}")
    report.split = split
    report.rows_read = raw.height

    required = ["id", *TEXT_COLUMNS] + (list(label_columns) if split == "train" or present else [])
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} for the {split} split "
            f"(format {cfg.format}; columns found: {', '.join(raw.columns) or 'none'})"
        )
    optional = list(dialect.optional_columns)
    ignored = [c for c in raw.columns if c not in required and c not in optional]
    if ignored:
        report.warnings.append(f"ignored column(s): {', '.join(ignored)}")

    id_series = _parse_ids(raw["id"], path, report)
    ids = id_series.to_list()
    labels = dialect.parse_labels(raw, ids, path) if present else None
    if report.warnings and any(w.startswith("invalid UTF-8") for w in report.warnings):
        _count_replacement_chars(raw, ids, report)

    show = progress if progress is not None else raw.height >= 20_000
    texts: dict[str, list[list[str] | None]] = {}
    failures: dict[int, list[str]] = {}
    with progress_bar(total=raw.height * 3, desc=f"parsing {path.name}", unit="cell", enabled=show) as bar:
        for column in TEXT_COLUMNS:
            series = raw[column]
            if not isinstance(series.dtype, (pl.String, pl.List)):
                series = series.cast(pl.String)  # e.g. a numeric parquet column: its text is the turn
            if dialect.text_layout == "json_lists" and series.dtype == pl.String:
                parsed, errors = _parse_json_column(series.to_list(), ids, column, report, bar)
            else:
                parsed, errors = _wrap_plain_column(series.to_list(), ids, report)
                bar.update(raw.height)
            texts[column] = parsed
            for index, message in errors.items():
                failures.setdefault(index, []).append(f"{column}: {message}")

    keep = _handle_failures(failures, texts, ids, split, cfg.strict, path, report)
    _align_turns(texts, ids, keep, report)

    columns: dict[str, pl.Series] = {"id": id_series}
    for column in TEXT_COLUMNS:
        columns[column] = _list_series(column, texts[column])
    columns["label"] = (
        pl.Series("label", labels, dtype=pl.Int8)
        if labels is not None
        else pl.Series("label", [None] * raw.height, dtype=pl.Int8)
    )
    for column in optional:
        if column in raw.columns:
            columns[column] = raw[column].cast(pl.String)
    frame = pl.DataFrame(columns)
    if keep is not None:
        frame = frame.filter(pl.Series(keep))
    report.rows_kept = frame.height
    if frame.height == 0:
        # Nothing to train on, or no ids to predict (a submission needs at least one row): never a silent pass.
        if report.rows_read == 0:
            raise DataError(f"{path}: no data rows (only a header); the {split} split needs at least one row")
        reasons = ", ".join(f"{reason}: {len(ids)}" for reason, ids in report.dropped.items())
        raise DataError(f"{path}: all {report.rows_read} data rows were dropped ({reasons}); nothing is left")
    _observe(frame, report)
    return LoadedData(frame=frame, report=report)


def _list_series(name: str, rows: list[list[str]]) -> pl.Series:
    """List(String) column from Python lists, built flat and grouped: polars' nested-list constructor makes
    one Series per row, about 40x slower on the full train file."""
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
                texts[column][index] = [
                    ""
                ]  # test: the row's value; train: a placeholder, the row is filtered
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
