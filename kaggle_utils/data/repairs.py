"""What loading changed or noticed: the repair and observation kinds and the DataReport that counts them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kaggle_utils.data.labels import MAX_EXAMPLES

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
        _count_with_example(self.repairs, self.repair_examples, kind, row_id, count)

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


def _count_with_example(
    counts: dict[str, int], examples: dict[str, list[Any]], kind: str, row_id: Any, n: int
) -> None:
    counts[kind] = counts.get(kind, 0) + n
    kept = examples.setdefault(kind, [])
    if len(kept) < MAX_EXAMPLES and (not kept or kept[-1] != row_id):
        kept.append(row_id)
