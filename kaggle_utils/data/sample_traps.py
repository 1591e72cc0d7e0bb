"""The known traps of the real files (COMPETITION.md), injected into generated rows.

Usage: `for kind, rows in plan_traps(rng, n).items(): ...apply_trap(kind, row, rng, split)`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kaggle_utils.data.sample_text import SampleRow

# Placeholders (letters only, so json.dumps keeps them) replaced by raw JSON escapes after serialisation.
_LONE_SURROGATE_MARK = "QQLONESURROGATEQQ"
_SURROGATE_PAIR_MARK = "QQSURROGATEPAIRQQ"
_NUL_MARK = "QQNULCHARQQ"

_ESCAPE_MARKS = {
    _LONE_SURROGATE_MARK: "\\ud83d",
    _SURROGATE_PAIR_MARK: "\\ud83d\\ude0a",
    _NUL_MARK: "\\u0000",
}

# Trap kinds, in priority order (a file with fewer rows than kinds gets the first ones), with their rates.
TRAP_RATES: dict[str, float] = {
    "unparseable": 0.0005,  # unquoted list items: nothing can recover them (train: dropped; test: kept)
    "null_turn": 0.002,  # [null] or a null inside a multi-turn list
    "both_responses_null": 0.002,
    "empty_list": 0.001,
    "both_responses_empty": 0.001,
    "empty_prompt": 0.0005,
    "missing_cell": 0.0005,  # an empty CSV field
    "lone_surrogate": 0.002,  # "\ud83d" escape with no partner
    "surrogate_pair": 0.002,  # "\ud83d\ude0a" escape pair: must decode to one emoji, no repair
    "nul_character": 0.0005,  # "\u0000" escape
    "special_characters": 0.002,  # escaped quotes, backslashes, newlines, commas, tabs
    "very_long_field": 0.0005,  # a response of 25,000-60,000 characters
    "turn_count_mismatch": 0.001,
    "python_literal_list": 0.001,  # ['...', "it's", None]
    "truncated_list": 0.001,  # JSON text cut off
    "unescaped_quotes": 0.001,  # ["He said "yes", then left"]
    "bare_string": 0.0005,  # "text" instead of ["text"]
    "identical_responses_non_tie": 0.002,  # label noise (train); identical responses (test)
}


def plan_traps(
    rng: np.random.Generator, n: int, rates: dict[str, float] = TRAP_RATES
) -> dict[str, list[int]]:
    """Distinct row indices per trap kind: rate * n rows, at least one each while the file has room."""
    counts = {kind: max(1, round(rate * n)) for kind, rate in rates.items()}
    order = rng.permutation(n).tolist()
    plan: dict[str, list[int]] = {}
    used = 0
    for kind, count in counts.items():
        take = order[used : used + count]
        if not take:
            break
        plan[kind] = sorted(take)
        used += len(take)
    return plan


def apply_trap(kind: str, row: SampleRow, rng: np.random.Generator, split: str) -> None:
    """Turn a clean row into one carrying `kind` (raw cells are the exact text written to the CSV)."""
    if kind == "unparseable":
        words = row.response_b[-1].split()[:8] or ["Hello", "there"]
        row.raw["response_b"] = "[" + " ".join(words).replace('"', "") + ", and so on]"
    elif kind == "null_turn":
        if len(row.prompt) > 1:
            row.raw["response_a"] = json.dumps([*row.response_a[:-1], None], ensure_ascii=False)
        else:
            row.raw["response_a"] = "[null]"
    elif kind == "both_responses_null":
        row.raw["response_a"] = row.raw["response_b"] = json.dumps([None] * len(row.prompt))
    elif kind == "empty_list":
        row.raw["response_b"] = "[]"
    elif kind == "both_responses_empty":
        row.response_a = [""] * len(row.prompt)
        row.response_b = [""] * len(row.prompt)
    elif kind == "empty_prompt":
        row.prompt = [""] * len(row.prompt)
    elif kind == "missing_cell":
        row.raw["response_a"] = None
    elif kind == "lone_surrogate":
        row.response_a[-1] = insert_at_word(row.response_a[-1], f" {_LONE_SURROGATE_MARK} ", rng)
    elif kind == "surrogate_pair":
        row.response_b[-1] = insert_at_word(row.response_b[-1], f" {_SURROGATE_PAIR_MARK} ", rng)
    elif kind == "nul_character":
        row.response_a[-1] = insert_at_word(row.response_a[-1], _NUL_MARK, rng)
    elif kind == "special_characters":
        tricky = ' She said "yes, of course", then left.\n\tPath: C:\\temp\\new, "quoted, text"\n\n'
        row.response_a[-1] = insert_at_word(row.response_a[-1], tricky, rng)
        row.prompt[-1] = row.prompt[-1] + " Answer with \"a, b\" or 'c'.\nThanks,\n"
    elif kind == "very_long_field":
        pass  # generated long in generate_rows
    elif kind == "turn_count_mismatch":
        row.prompt = [*row.prompt, "Can you say more about that?"]
    elif kind == "python_literal_list":
        # both quote kinds in the text make repr() use single quotes with \' escapes: not JSON
        row.raw["prompt"] = repr([*row.prompt[:-1], row.prompt[-1] + " It's \"fine\", isn't it?"])
    elif kind == "truncated_list":
        full = json.dumps(row.response_b, ensure_ascii=False)
        row.raw["response_b"] = full[: max(3, int(len(full) * 0.6))]
    elif kind == "unescaped_quotes":
        content = row.response_a[-1].replace('"', "")
        row.raw["response_a"] = (
            '["He said "yes" to the plan, then left. ' + content.replace("\n", "\\n") + '"]'
        )
        if len(row.prompt) > 1:
            row.prompt = row.prompt[-1:]
            row.response_b = row.response_b[-1:]
    elif kind == "bare_string":
        row.raw["response_b"] = json.dumps(row.response_b[-1], ensure_ascii=False)
        if len(row.prompt) > 1:
            row.prompt = row.prompt[-1:]
            row.response_a = row.response_a[-1:]
    elif kind == "identical_responses_non_tie":
        row.response_b = list(row.response_a)
        row.label = int(rng.integers(2)) if split == "train" else row.label
    else:
        raise ValueError(f"unknown trap kind {kind!r}")


def insert_at_word(text: str, piece: str, rng: np.random.Generator) -> str:
    """Insert `piece` at a word boundary inside `text` (or append it)."""
    spaces = [i for i, c in enumerate(text[:2000]) if c == " "]
    if not spaces:
        return text + piece
    at = spaces[int(rng.integers(len(spaces)))]
    return text[:at] + piece + text[at:]


def cell_json(turns: list[str]) -> str:
    """The JSON-list cell text for `turns`, with the escape placeholders turned into raw JSON escapes."""
    dumped = json.dumps(turns, ensure_ascii=False)
    if "QQ" in dumped:
        for mark, escape in _ESCAPE_MARKS.items():
            dumped = dumped.replace(mark, escape)
    return dumped


# WSDM cells are plain parquet strings: no JSON traps; these are the traps that format still has.
WSDM_TRAP_RATES: dict[str, float] = {
    "null_response": 0.005,  # a missing response (parquet null)
    "empty_prompt": 0.002,
    "both_responses_empty": 0.002,
    "nul_character": 0.002,
    "identical_responses_non_tie": 0.003,
}


def apply_wsdm_trap(kind: str, cell: dict[str, Any], rng: np.random.Generator) -> None:
    """Turn a clean WSDM cell dict into one carrying `kind` (a key of `WSDM_TRAP_RATES`)."""
    if kind == "null_response":
        cell["response_b" if rng.random() < 0.5 else "response_a"] = None
    elif kind == "empty_prompt":
        cell["prompt"] = ""
    elif kind == "both_responses_empty":
        cell["response_a"] = cell["response_b"] = ""
    elif kind == "nul_character":
        cell["response_a"] = insert_at_word(cell["response_a"], "\x00", rng)
    elif kind == "identical_responses_non_tie":
        cell["response_b"] = cell["response_a"]
    else:
        raise ValueError(f"unknown WSDM trap kind {kind!r}")
