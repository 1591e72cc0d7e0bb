"""Token-budget truncation: which turns, and how many tokens of each piece, a row keeps in ``max_length``.

Turns are taken in priority order (``keep_end``, ``keep_start``, ``head_tail``) and kept whole while they fit;
the turn that does not fit is cut and the rest are dropped behind one marker. Inside a cut turn short pieces
stay whole and the rest is split by ``cut_split`` (A/B symmetric); a cut piece keeps its head and its end
around the marker. bos, template delimiters and the question suffix are never cut (docs/DESIGN_NOTES.md).
"""

from __future__ import annotations

import math

from kaggle_utils.text.template import TemplateIds

TRUNCATION_MODES: tuple[str, ...] = ("keep_end", "keep_start", "head_tail")
CUT_SPLITS: tuple[str, ...] = ("proportional", "equal")
# cut_split="proportional": a cut piece keeps at least this share of an equal split of what the pieces kept
# whole leave (so a moderately long response is never starved by a very long one).
MIN_CUT_SHARE = 0.5
# An earlier (lower-priority) turn is kept in part only when this many of its text tokens fit.
MIN_PARTIAL_TURN_TOKENS = 32


def _turn_priority(n_turns: int, mode: str) -> list[int]:
    if mode == "keep_end":
        return list(range(n_turns - 1, -1, -1))
    if mode == "keep_start":
        return list(range(n_turns))
    order: list[int] = []
    low, high = 0, n_turns - 1
    while low <= high:
        order.append(high)
        if low != high:
            order.append(low)
        high, low = high - 1, low + 1
    return order


def _share(lengths: tuple[int, int, int], budget: int, split: str) -> list[int]:
    """Split ``budget`` text tokens among (prompt, A, B): pieces within an equal share stay whole, the rest
    is split among the cut pieces ``"equal"``-ly or ``"proportional"``-ly (A/B symmetric, at most one token
    unused)."""
    if sum(lengths) <= budget:
        return list(lengths)
    left = max(budget, 0)
    alloc = [0, 0, 0]
    open_pieces = sorted(range(3), key=lambda piece: lengths[piece])
    while open_pieces and lengths[open_pieces[0]] * len(open_pieces) <= left:  # fits an equal share: whole
        alloc[open_pieces[0]] = lengths[open_pieces[0]]
        left -= lengths[open_pieces[0]]
        open_pieces.pop(0)
    if not open_pieces:  # cannot happen (the pieces do not fit together); guards the divisions below
        return alloc
    if split == "equal":
        level, extra = divmod(left, len(open_pieces))
        for piece in open_pieces:
            alloc[piece] = level
        if extra >= 2 and 1 in open_pieces and 2 in open_pieces:
            alloc[1] += 1
            alloc[2] += 1
            extra -= 2
        if extra and 0 in open_pieces:
            alloc[0] += 1
            extra -= 1
        if extra and (1 in open_pieces) != (2 in open_pieces):
            alloc[1 if 1 in open_pieces else 2] += 1
        return alloc
    _split_proportionally(lengths, open_pieces, left, alloc)
    return alloc


def _split_proportionally(lengths: tuple[int, int, int], cut: list[int], left: int, alloc: list[int]) -> None:
    """``left`` tokens among the ``cut`` pieces in proportion to their lengths, each keeping at least
    ``MIN_CUT_SHARE`` of the equal share; fills ``alloc`` in place, in integers (equal lengths, equal shares).
    """
    floor_share = math.floor(MIN_CUT_SHARE * left / len(cut))
    # pieces whose proportional share falls below the floor are fixed at it; the rest is re-split
    rest, at_floor = list(cut), []
    while True:
        budget, total = left - floor_share * len(at_floor), sum(lengths[piece] for piece in rest)
        starved = [piece for piece in rest if budget * lengths[piece] < floor_share * total]
        if not starved:
            break
        at_floor += starved
        rest = [piece for piece in rest if piece not in starved]
    for piece in at_floor:
        alloc[piece] = floor_share
    for piece in rest:
        alloc[piece] = budget * lengths[piece] // total
    # rounding leftovers: +1 per cut piece from the longest down (equal lengths together, A and B before the
    # prompt), stopping at the first that cannot get one, so a longer piece never keeps fewer tokens
    extra = left - sum(alloc[piece] for piece in cut)
    for length in sorted({lengths[piece] for piece in cut}, reverse=True):
        group = [piece for piece in cut if lengths[piece] == length]
        units = [[piece for piece in group if piece != 0], [piece for piece in group if piece == 0]]
        complete = True
        for unit in (unit for unit in units if unit):
            if len(unit) <= extra:
                for piece in unit:
                    alloc[piece] += 1
                extra -= len(unit)
            else:
                complete = False
        if not complete or not extra:
            break


def _cut_allocation(
    lengths: tuple[int, int, int], content_budget: int, marker_len: int, split: str
) -> list[int]:
    """Text tokens kept per piece of a turn that does not fit whole; each cut piece also pays for a marker
    (the smallest marker count that covers the cut pieces wins)."""
    alloc = list(lengths)
    for n_markers in (1, 2, 3):
        alloc = _share(lengths, content_budget - n_markers * marker_len, split)
        n_cut = sum(a < length for a, length in zip(alloc, lengths, strict=True))
        if n_cut <= n_markers:
            break
    return alloc


def _head_tokens(keep: int, head_fraction: float) -> int:
    """How many of ``keep`` tokens come from the piece's start; with 0 < head_fraction < 1 and keep >= 2 both
    the first and the last token of the piece are kept."""
    head = math.floor(head_fraction * keep + 0.5)
    if 0.0 < head_fraction < 1.0 and keep >= 2:
        head = min(max(head, 1), keep - 1)
    return head


def _cut_piece(ids: list[int], keep: int, marker: list[int], head_fraction: float) -> list[int]:
    """The piece's head and end around the marker (openers such as refusals and conclusions both survive)."""
    length = len(ids)
    if keep >= length:
        return ids
    head = _head_tokens(keep, head_fraction)
    return ids[:head] + marker + ids[length - (keep - head) :]


def _turn_keep(
    turn_lengths: list[tuple[int, int, int]], ids: TemplateIds, max_length: int, mode: str, cut_split: str
) -> dict[int, list[int]]:
    """Text tokens kept per piece of each kept turn (dropped turns are absent), from the pieces' full token
    counts (the proportional split needs them, also for tokens that are thrown away)."""
    n_turns = len(turn_lengths)
    budget = max_length - len(ids.bos) - len(ids.suffix)
    overhead, marker_len = ids.turn_overhead, len(ids.marker)
    keep: dict[int, list[int]] = {}  # turn -> kept text tokens per piece
    if sum(overhead + sum(lengths) for lengths in turn_lengths) <= budget:
        keep = {turn: list(lengths) for turn, lengths in enumerate(turn_lengths)}
    else:
        # Something will be lost. With several turns, room is set aside for the marker of dropped turns,
        # given back if in the end only the lowest-priority turn is cut.
        reserve = marker_len if n_turns > 1 else 0
        budget -= reserve
        for rank, turn in enumerate(_turn_priority(n_turns, mode)):
            lengths = turn_lengths[turn]
            full_cost = overhead + sum(lengths)
            if rank == n_turns - 1:
                budget, reserve = budget + reserve, 0
            if full_cost <= budget:
                keep[turn] = list(lengths)
                budget -= full_cost
                continue
            content_budget = budget - overhead
            if rank == 0 or content_budget - 3 * marker_len >= MIN_PARTIAL_TURN_TOKENS:
                keep[turn] = _cut_allocation(lengths, content_budget, marker_len, cut_split)
            break  # turns after this one in priority are dropped (one marker stands for them)
    return keep


def encode_row(
    turns: list[tuple[list[int], list[int], list[int]]],
    ids: TemplateIds,
    max_length: int,
    mode: str,
    head_fraction: float,
    cut_split: str,
) -> tuple[list[int], list[int]]:
    """One row's input ids (and kept text tokens per piece) from its tokenised turns."""
    n_turns = len(turns)
    turn_lengths = [(len(p), len(a), len(b)) for p, a, b in turns]
    keep = _turn_keep(turn_lengths, ids, max_length, mode, cut_split)
    gap_marker = len(keep) < n_turns

    out = list(ids.bos)
    kept_total = [0, 0, 0]
    previous_kept = True
    for turn in range(n_turns):
        if turn not in keep:
            if previous_kept and gap_marker:
                out += ids.marker
            previous_kept = False
            continue
        previous_kept = True
        prompt, response_a, response_b = turns[turn]
        kept = keep[turn]
        out += ids.turn_open
        out += _cut_piece(prompt, kept[0], ids.marker, head_fraction)
        out += ids.prompt_to_a
        out += _cut_piece(response_a, kept[1], ids.marker, head_fraction)
        out += ids.a_to_b
        out += _cut_piece(response_b, kept[2], ids.marker, head_fraction)
        out += ids.turn_close
        for piece in range(3):
            kept_total[piece] += kept[piece]
    out += ids.suffix
    return out, kept_total
