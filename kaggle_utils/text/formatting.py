"""Conversation -> model input ids: a versioned prompt template, token-budget truncation and the A/B swap.

Template ("gemma", the default; ``<bos>`` is the tokenizer's bos id, the rest is text)::

    <bos><start_of_turn>user
    {prompt, turn 1}<end_of_turn>
    <start_of_turn>model
    <response_a>
    {response A, turn 1}
    </response_a>
    <response_b>
    {response B, turn 1}
    </response_b><end_of_turn>
    ... one such block per turn ...
    <start_of_turn>user
    Which response is better? A, B or tie?<end_of_turn>
    <start_of_turn>model

The question suffix is always present, whole, at the very end: the classifier pools the last token, so that
token sees the whole conversation and the question. "plain" uses ``### Prompt`` / ``### Response A`` /
``### Response B`` headings instead, for tokenizers without turn tokens. "llama3" (header tokens, ``<|eot_id|>``)
and "chatml" (``<|im_start|>`` / ``<|im_end|>``, Qwen-2 and SmolLM2) put the same pieces in those families' turn
markup; "auto" picks the tokenizer's family (Gemma, Llama-3, ChatML, else plain).

Truncation, for any Hugging Face fast tokenizer, to at most ``cfg.max_length`` tokens:

* Turns are taken in priority order (``keep_end``: last turn first; ``keep_start``: first turn first;
  ``head_tail``: last, first, second-to-last, second, ...) and kept whole while they fit. The turn that does
  not fit is cut; turns after it in priority are dropped and one marker stands where they were (room
  for it is set aside first, so the top-priority turn is kept whole whenever it fits beside that marker).
  A lower-priority turn is only kept cut when at least ``MIN_PARTIAL_TURN_TOKENS`` of its text fit.
* Inside the cut turn, prompt / response A / response B first fill short pieces (water-filling): a piece
  that fits within an equal share of what is left keeps all its text, and so on. A piece that an equal split
  would keep whole is therefore never cut (the old split, proportional over all three pieces, did that:
  ``(50, 3000, 500)`` at 1,900 gave ``[50, 1422, 427]``, now ``[50, 1350, 500]``). What remains goes to the
  pieces that must be cut, by ``cfg.cut_split``: ``"proportional"`` (the default) in proportion to their
  lengths, each keeping at least ``MIN_CUT_SHARE`` of an equal share, so the longer response keeps more and
  the row still shows which was longer; ``"equal"`` splits it equally (max-min fair), which hides the length
  difference of two cut responses. Response length is the strongest signal of this competition: in
  tests/train/test_loop.py::test_each_ordering_learns_below_the_class_prior (bar 1.0594) the best eval loss was
  1.0900 / 1.0902 (ft-then-quant / quant-then-ft) with ``"equal"``, both failing, and 1.0049 / 0.9757 with
  ``"proportional"``, both passing. Both splits are symmetric in A and B (equal lengths get equal shares; an
  integer remainder goes to A and B together or to neither; at most one token stays unused), so the swapped
  row is cut exactly like the original.
* A cut piece keeps its head and its end with ``cfg.truncation_marker`` between them: ``cfg.head_fraction``
  of the kept tokens from the start (rounded; for 0 < head_fraction < 1 at least the first and the last
  token), the rest from the end. Openers such as refusals and the final answer both survive.
  ``head_fraction=0`` keeps only the end, ``1`` only the start. ``cfg.truncation`` picks the turn order only.
* bos, template delimiters (incl. special tokens) and the question suffix are never cut. Text is tokenised
  with ``split_special_tokens=True``, so a literal ``<start_of_turn>`` or ``<pad>`` in user text is plain text.

Each text piece is tokenised once, in batch calls of the fast tokenizer over the dataset, without special
tokens; sequences are assembled by list slicing. Pieces are tokenised separately, so merges never cross a
delimiter; training and inference both go through ``encode_rows`` and therefore always agree. Every character
is tokenised, also what truncation throws away: the proportional split and ``content_tokens`` need each cut
piece's exact token count, which only the whole text gives (benchmarks/bench_tokenize.py ``--survivors``
measures what tokenising only the surviving text would save).

``TEMPLATE_VERSION`` names the template strings and the truncation rules; artifacts store it and refuse to
load under another version. Change it whenever anything in this module changes the produced ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from transformers import PreTrainedTokenizerFast

from kaggle_utils.core.config import FormatConfig, validate_section
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.text.tokenizer import END_OF_TURN, START_OF_TURN

LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# v2: a cut turn keeps short pieces whole (water-filling) and splits the rest among the cut pieces by
# format.cut_split (proportional to length by default, or equal); cut pieces keep head and end
# (format.head_fraction).
TEMPLATE_VERSION = "arena-pair-v2"
TURN_COLUMNS: tuple[str, str, str] = ("prompt", "response_a", "response_b")
TRUNCATION_MODES: tuple[str, ...] = ("keep_end", "keep_start", "head_tail")
CUT_SPLITS: tuple[str, ...] = ("proportional", "equal")
# cut_split="proportional": a cut piece keeps at least this share of an equal split of what the pieces kept
# whole leave (so a moderately long response is never starved by a very long one).
MIN_CUT_SHARE = 0.5
QUESTION = "Which response is better? A, B or tie?"
# An earlier (lower-priority) turn is kept in part only when this many of its text tokens fit.
MIN_PARTIAL_TURN_TOKENS = 32
# Rows per batch call of the tokenizer: bounds the memory of the intermediate token lists.
ROWS_PER_CHUNK = 4096


@dataclass(frozen=True)
class PromptTemplate:
    """The fixed text around each turn's three pieces, and the question suffix."""

    name: str
    turn_open: str  # before the turn's prompt
    prompt_to_a: str  # between the prompt and response A
    a_to_b: str  # between response A and response B
    turn_close: str  # after response B
    suffix: str  # the question; closes every sequence, never cut
    required_tokens: tuple[str, ...] = ()  # tokens the tokenizer must know as single special tokens


TEMPLATES: dict[str, PromptTemplate] = {
    "gemma": PromptTemplate(
        name="gemma",
        turn_open=f"{START_OF_TURN}user\n",
        prompt_to_a=f"{END_OF_TURN}\n{START_OF_TURN}model\n<response_a>\n",
        a_to_b="\n</response_a>\n<response_b>\n",
        turn_close=f"\n</response_b>{END_OF_TURN}\n",
        suffix=f"{START_OF_TURN}user\n{QUESTION}{END_OF_TURN}\n{START_OF_TURN}model\n",
        required_tokens=(START_OF_TURN, END_OF_TURN),
    ),
    # Llama-3 tokenizers: header tokens around the role, <|eot_id|> closes a message.
    "llama3": PromptTemplate(
        name="llama3",
        turn_open=f"{LLAMA3_HEADER_START}user{LLAMA3_HEADER_END}\n\n",
        prompt_to_a=f"{LLAMA3_EOT}{LLAMA3_HEADER_START}assistant{LLAMA3_HEADER_END}\n\n<response_a>\n",
        a_to_b="\n</response_a>\n<response_b>\n",
        turn_close=f"\n</response_b>{LLAMA3_EOT}",
        suffix=f"{LLAMA3_HEADER_START}user{LLAMA3_HEADER_END}\n\n{QUESTION}{LLAMA3_EOT}"
        f"{LLAMA3_HEADER_START}assistant{LLAMA3_HEADER_END}\n\n",
        required_tokens=(LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_EOT),
    ),
    # ChatML (Qwen-2, SmolLM2): <|im_start|>role ... <|im_end|>.
    "chatml": PromptTemplate(
        name="chatml",
        turn_open=f"{CHATML_START}user\n",
        prompt_to_a=f"{CHATML_END}\n{CHATML_START}assistant\n<response_a>\n",
        a_to_b="\n</response_a>\n<response_b>\n",
        turn_close=f"\n</response_b>{CHATML_END}\n",
        suffix=f"{CHATML_START}user\n{QUESTION}{CHATML_END}\n{CHATML_START}assistant\n",
        required_tokens=(CHATML_START, CHATML_END),
    ),
    "plain": PromptTemplate(
        name="plain",
        turn_open="### Prompt\n",
        prompt_to_a="\n\n### Response A\n",
        a_to_b="\n\n### Response B\n",
        turn_close="\n\n",
        suffix=f"### Question\n{QUESTION}\n### Answer\n",
    ),
}


# format.template="auto": the first family whose turn tokens the tokenizer has as single tokens, else "plain".
AUTO_TEMPLATE = "auto"
_AUTO_ORDER: tuple[str, ...] = ("gemma", "llama3", "chatml")


def template_for_tokenizer(tokenizer: PreTrainedTokenizerFast) -> str:
    """The template of the tokenizer's family: Gemma turn tokens, Llama-3 header tokens, ChatML, else plain."""
    for name in _AUTO_ORDER:
        if all(_single_token(tokenizer, token) for token in TEMPLATES[name].required_tokens):
            return name
    return "plain"


def resolve_template(tokenizer: PreTrainedTokenizerFast, cfg: FormatConfig) -> PromptTemplate:
    """`cfg.template`, with "auto" resolved from the tokenizer (an artifact ships its tokenizer: same answer)."""
    name = template_for_tokenizer(tokenizer) if cfg.template == AUTO_TEMPLATE else cfg.template
    return TEMPLATES[name]


def _single_token(tokenizer: PreTrainedTokenizerFast, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


@dataclass
class EncodedRows:
    """Token ids of a frame's rows, ready for a collator; labels already swapped when ``swapped``."""

    ids: list  # row ids, same order as the frame
    input_ids: list[list[int]]  # each len <= cfg.max_length, begins with bos (when the tokenizer has one)
    labels: np.ndarray | None  # int64 (n,), swapped when swap=True; None for test
    swapped: bool
    template_version: str = TEMPLATE_VERSION
    # Text tokens of prompt / response A / response B (columns) before and after truncation, per row.
    content_tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    kept_tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def truncated(self) -> np.ndarray:
        """Rows that lost any text (cut inside a turn or whole turns dropped)."""
        return (self.kept_tokens < self.content_tokens).any(axis=1)

    def summary(self) -> str:
        """One line for logs: how much truncation cost, so that it is never silent."""
        n = len(self)
        if n == 0:
            return "0 rows encoded"
        content = self.content_tokens.sum(axis=0)
        kept_share = self.kept_tokens.sum(axis=0) / np.maximum(content, 1)
        return (
            f"{n} rows, {int(self.truncated.sum())} truncated ({self.truncated.mean():.1%}); "
            f"tokens kept: prompt {kept_share[0]:.1%}, A {kept_share[1]:.1%}, B {kept_share[2]:.1%}; "
            f"length mean {self.lengths.mean():.0f}, max {self.lengths.max()}"
        )


def encode_rows(
    frame: pl.DataFrame,
    tokenizer: PreTrainedTokenizerFast,
    cfg: FormatConfig,
    swap: bool = False,
    *,
    progress: bool | None = None,
) -> EncodedRows:
    """Encode every row of ``frame`` (the data-layer contract) into at most ``cfg.max_length`` tokens.

    ``swap=True`` encodes the A/B-swapped rows (responses exchanged, labels A<->B) for augmentation and TTA.
    ``progress=None`` shows a progress bar for frames of 10,000 rows or more.
    """
    return _encode(frame, tokenizer, cfg, (swap,), progress)[0]


def encode_both_orders(
    frame: pl.DataFrame,
    tokenizer: PreTrainedTokenizerFast,
    cfg: FormatConfig,
    *,
    progress: bool | None = None,
) -> tuple[EncodedRows, EncodedRows]:
    """Original and swapped encodings (swap TTA, swap augmentation) from one tokenisation pass."""
    original, swapped = _encode(frame, tokenizer, cfg, (False, True), progress)
    return original, swapped


def swap_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The A/B-swapped copy: every ``<stem>_a`` / ``<stem>_b`` column pair exchanged, label 0<->1, tie stays.

    Covers response_a/b and model_a/b (and winner_model_a/b in raw frames). Swapping twice is the identity.
    """
    exprs: list[pl.Expr] = []
    for name in frame.columns:
        if name.endswith("_a") and f"{name[:-2]}_b" in frame.columns:
            partner = f"{name[:-2]}_b"
            exprs += [pl.col(partner).alias(name), pl.col(name).alias(partner)]
    if "label" in frame.columns:
        label = pl.col("label")
        exprs.append(
            pl.when(label == 0)
            .then(1)
            .when(label == 1)
            .then(0)
            .otherwise(label)
            .cast(frame["label"].dtype)
            .alias("label")
        )
    return frame.with_columns(exprs) if exprs else frame


# ARCHITECTURE.md's module table calls it swap_rows; its binding signature list calls it swap_frame.
swap_rows = swap_frame


def swap_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """Class indices with A (0) and B (1) exchanged; tie (2) and anything else unchanged."""
    array = np.asarray(labels)
    swapped = array.copy()
    swapped[array == 0] = 1
    swapped[array == 1] = 0
    return swapped


def swap_probs(probs: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Probability columns (A, B, tie) -> (B, A, tie): a prediction on a swapped row, mapped back (or forth).

    Also accepts two columns (A, B) for the binary WSDM variant. Swapping twice is the identity.
    """
    array = np.asarray(probs)
    if array.ndim == 0 or array.shape[-1] not in (2, 3):
        raise ValueError(f"swap_probs expects (..., 3) or (..., 2) probabilities, got shape {array.shape}")
    order = [1, 0, 2] if array.shape[-1] == 3 else [1, 0]
    return array[..., order]


TTA_SPACES: tuple[str, ...] = ("prob", "logit")


def average_views(original: np.ndarray, swapped_view: np.ndarray, space: str = "prob") -> np.ndarray:
    """Swap TTA: the original view's probabilities and the swapped view's (in the swapped row's own column
    order, un-swapped here) averaged, rows summing to one. `space` "prob": the arithmetic mean; "logit": the
    mean of log-probabilities, renormalised (a geometric mean: a confident view counts for more). The one
    place every model and the baseline combine TTA views; which space is better is chosen on OOF
    (`calibration.choose_tta_space`), not assumed."""
    original = np.asarray(original, dtype=np.float64)
    unswapped = swap_probs(np.asarray(swapped_view, dtype=np.float64))
    if space == "prob":
        mean = (original + unswapped) / 2.0
    elif space == "logit":
        tiny = np.finfo(np.float64).tiny
        logs = (np.log(np.maximum(original, tiny)) + np.log(np.maximum(unswapped, tiny))) / 2.0
        mean = np.exp(logs - logs.max(axis=-1, keepdims=True))
    else:
        raise ValueError(f"TTA space must be one of {TTA_SPACES}, got {space!r}")
    return mean / mean.sum(axis=-1, keepdims=True)


def minimum_max_length(tokenizer: PreTrainedTokenizerFast, cfg: FormatConfig) -> int:
    """The smallest ``max_length`` this tokenizer and template can honour (delimiters, suffix, markers)."""
    ids = _template_ids(tokenizer, cfg)
    return _minimum_length(ids)


# --------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _TemplateIds:
    bos: list[int]
    turn_open: list[int]
    prompt_to_a: list[int]
    a_to_b: list[int]
    turn_close: list[int]
    suffix: list[int]
    marker: list[int]

    @property
    def turn_overhead(self) -> int:
        return len(self.turn_open) + len(self.prompt_to_a) + len(self.a_to_b) + len(self.turn_close)


def _minimum_length(ids: _TemplateIds) -> int:
    # One turn's delimiters, a marker in each piece plus the dropped-turns marker, and one text token each.
    return len(ids.bos) + len(ids.suffix) + ids.turn_overhead + 4 * len(ids.marker) + 3


def _check_config(cfg: FormatConfig) -> None:
    """The config's own rules (`config.validate_section`), re-checked: a caller may change a field after
    building the config. The template must also be one this module renders."""
    validate_section(cfg)
    if cfg.template not in TEMPLATES and cfg.template != AUTO_TEMPLATE:
        raise UsageError(
            f"format.template={cfg.template!r} is unknown; choose one of "
            f"{sorted(TEMPLATES) + [AUTO_TEMPLATE]}"
        )


def _template_ids(tokenizer: PreTrainedTokenizerFast, cfg: FormatConfig) -> _TemplateIds:
    _check_config(cfg)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; encode_rows needs a tokenizer.json one"
        )
    template = resolve_template(tokenizer, cfg)
    for token in template.required_tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise UsageError(
                f"template {template.name!r} needs {token} as one special token, but this tokenizer splits it into "
                f"{len(ids)} ids; this tokenizer's family uses format.template={template_for_tokenizer(tokenizer)!r} "
                "(or 'auto'; 'plain' fits any tokenizer)"
            )
    fixed = tokenizer(
        [template.turn_open, template.prompt_to_a, template.a_to_b, template.turn_close, template.suffix],
        add_special_tokens=False,
    )["input_ids"]
    marker = tokenizer([cfg.truncation_marker], add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ][0]
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    return _TemplateIds(bos, *fixed, marker=marker)


def _check_frame(frame: pl.DataFrame) -> None:
    missing = [name for name in ("id", *TURN_COLUMNS) if name not in frame.columns]
    if missing:
        raise DataError(f"frame to encode lacks column(s) {missing}; it has {frame.columns}")
    for name in TURN_COLUMNS:
        dtype = frame.schema[name]
        if dtype != pl.List(pl.String):
            raise DataError(f"column {name!r} must be List(String) (turns), got {dtype}")
        bad = frame.filter(
            pl.col(name).is_null() | (pl.col(name).list.len() == 0) | pl.col(name).list.contains(None)
        )
        if bad.height:
            raise DataError(
                f"column {name!r}: {bad.height} row(s) with a missing/empty turn list or a null turn, "
                f"ids {bad['id'].head(10).to_list()}"
            )
    lens = frame.select(*(pl.col(name).list.len().alias(name) for name in TURN_COLUMNS))
    uneven = frame.filter(
        (lens["prompt"] != lens["response_a"]).to_numpy() | (lens["prompt"] != lens["response_b"]).to_numpy()
    )
    if uneven.height:
        raise DataError(
            f"{uneven.height} row(s) have prompt/response_a/response_b lists of different lengths, "
            f"ids {uneven['id'].head(10).to_list()}"
        )


def _labels(frame: pl.DataFrame) -> np.ndarray | None:
    if "label" not in frame.columns or frame["label"].null_count() == frame.height:
        return None
    null_rows = frame.filter(pl.col("label").is_null())
    if null_rows.height:
        raise DataError(
            f"{null_rows.height} row(s) have no label among labelled rows, ids {null_rows['id'].head(10).to_list()}"
        )
    labels = frame["label"].to_numpy().astype(np.int64)
    bad = ~np.isin(labels, (0, 1, 2))
    if bad.any():
        raise DataError(
            f"labels must be 0 (A), 1 (B) or 2 (tie); ids {frame['id'].filter(pl.Series(bad)).head(10).to_list()}"
        )
    return labels


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
    """Split ``budget`` text tokens among (prompt, A, B): short pieces first, then ``split`` among the cut ones.

    Pieces that fit within an equal share of what is left keep all their text (water-filling). What remains
    goes to the pieces that must be cut: ``"equal"`` splits it equally (max-min fair; the cut responses then
    keep the same amount, hiding which was longer), ``"proportional"`` in proportion to their lengths (the
    longer keeps more, so the length signal survives) with each cut piece keeping at least ``MIN_CUT_SHARE``
    of the equal share. Both are symmetric in A and B, never give a piece more than its length nor more than
    ``budget`` in total, and leave at most one token unused (an integer remainder that cannot go to A and B
    alike).
    """
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
    """``left`` tokens among the ``cut`` pieces (each longer than ``left / len(cut)``) in proportion to their
    lengths, each keeping at least ``MIN_CUT_SHARE`` of the equal share; fills ``alloc`` in place.

    Integer arithmetic only, so equal lengths get equal shares (A/B symmetry). Pieces whose proportional
    share falls below the floor are fixed at it (they are the shortest) and the rest is re-split. Each share
    is rounded down; the few tokens left over go +1 to the cut pieces from the longest down (equal lengths
    together, A and B before the prompt), stopping at the first that cannot get one: a longer piece never
    keeps fewer tokens than a shorter one, and at most one token stays unused.
    """
    floor_share = math.floor(MIN_CUT_SHARE * left / len(cut))
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
    """Text tokens kept per piece of a turn that does not fit whole; each cut piece also pays for a marker.

    Fewer markers reserved leave more text, so the smallest marker count that covers the cut pieces wins
    (the number of cut pieces only grows as the budget shrinks, so that count is exact).
    """
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
    turn_lengths: list[tuple[int, int, int]], ids: _TemplateIds, max_length: int, mode: str, cut_split: str
) -> dict[int, list[int]]:
    """Text tokens kept per piece of each kept turn (dropped turns are absent), from the pieces' token counts.

    Needs each piece's exact token count: the proportional split of a cut turn divides the budget in the
    ratio of the cut pieces' full lengths, so tokens that truncation throws away still decide what is kept.
    """
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


def _encode_row(
    turns: list[tuple[list[int], list[int], list[int]]],
    ids: _TemplateIds,
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


def _encode(
    frame: pl.DataFrame,
    tokenizer: PreTrainedTokenizerFast,
    cfg: FormatConfig,
    orders: tuple[bool, ...],
    progress: bool | None,
) -> list[EncodedRows]:
    ids = _template_ids(tokenizer, cfg)
    minimum = _minimum_length(ids)
    if cfg.max_length < minimum:
        raise UsageError(
            f"format.max_length={cfg.max_length} is too small for template "
            f"{resolve_template(tokenizer, cfg).name!r} with this tokenizer: "
            f"it needs at least {minimum} tokens (bos, turn delimiters, question suffix, truncation markers)"
        )
    _check_frame(frame)
    labels = _labels(frame)
    n_rows = frame.height
    outputs: list[list[list[int]]] = [[] for _ in orders]
    kept = [np.zeros((n_rows, 3), dtype=np.int64) for _ in orders]
    content = np.zeros((n_rows, 3), dtype=np.int64)
    show = n_rows >= 10_000 if progress is None else progress
    with progress_bar(total=n_rows, desc="tokenising", unit="row", enabled=show) as bar:
        for start in range(0, n_rows, ROWS_PER_CHUNK):
            chunk = frame.slice(start, ROWS_PER_CHUNK)
            n_turns = chunk["prompt"].list.len().to_list()
            texts: list[str] = []
            for name in TURN_COLUMNS:
                texts += chunk[name].explode().to_list()
            tokens = tokenizer(
                texts,
                add_special_tokens=False,
                split_special_tokens=True,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,  # pieces longer than the model's limit are expected here: truncation follows
            )["input_ids"]
            n_pieces = len(texts) // 3
            prompts, responses_a, responses_b = (
                tokens[:n_pieces],
                tokens[n_pieces : 2 * n_pieces],
                tokens[2 * n_pieces :],
            )
            offset = 0
            for row, count in enumerate(n_turns):
                window = slice(offset, offset + count)
                turns = list(zip(prompts[window], responses_a[window], responses_b[window], strict=True))
                offset += count
                content[start + row] = [sum(len(turn[piece]) for turn in turns) for piece in range(3)]
                for index, swap in enumerate(orders):
                    ordered = [(p, b, a) for p, a, b in turns] if swap else turns
                    row_ids, row_kept = _encode_row(
                        ordered, ids, cfg.max_length, cfg.truncation, cfg.head_fraction, cfg.cut_split
                    )
                    outputs[index].append(row_ids)
                    kept[index][start + row] = row_kept
            bar.update(chunk.height)

    row_ids = frame["id"].to_list()
    results = []
    for index, swap in enumerate(orders):
        order_content = content[:, [0, 2, 1]] if swap else content
        results.append(
            EncodedRows(
                ids=row_ids,
                input_ids=outputs[index],
                labels=None if labels is None else (swap_labels(labels) if swap else labels.copy()),
                swapped=swap,
                content_tokens=order_content,
                kept_tokens=kept[index],
            )
        )
    return results
