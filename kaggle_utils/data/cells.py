"""LMSYS JSON-list cells -> turns: a fast json.loads path, documented repairs, and a tolerant scanner.

Usage: `parsed = parse_turn_list('["hi", null]')` gives `parsed.turns == ["hi", ""]` and the repair kinds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kaggle_utils.data.repairs import (
    BARE_STRING,
    EMPTY_LIST,
    FALLBACK_PARSED,
    LONE_SURROGATE,
    NON_STRING_TURN,
    NUL_CHARACTER,
    NULL_CELL,
    NULL_TURN,
    DataReport,
)

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


def parse_json_column(
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


def wrap_plain_column(
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
