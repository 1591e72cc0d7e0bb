"""kaggle_utils.text.encode (with text.template and text.truncation), checked on differently built tokenizers.

* ``word_tok``: a WordLevel tokenizer whose every content word is its own token and names its origin
  ("p1x7" = prompt of turn 1, word 7). Counting and ordering those tokens in the output checks truncation
  exactly, independently of the implementation's own bookkeeping.
* ``bpe_tok``: the byte-level BPE demo tokenizer (Gemma layout) on arbitrary unicode text, literal special
  tokens included.
* ``gemma_tok``: Gemma-2's real tokenizer (SentencePiece, 256k pieces) from the shared reference folder
  ``<repo>/../shared/reference/tokenizers/gemma2`` (or ``$KAGGLE_UTILS_GEMMA2_TOKENIZER``); loaded once per
  module. Missing, it fails the test under CI (``CI=true``) and skips it elsewhere.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from builders import turns_frame
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kaggle_utils.core.config import FormatConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.text.encode import encode_both_orders, encode_rows
from kaggle_utils.text.swap import swap_frame, swap_labels, swap_probs
from kaggle_utils.text.template import (
    END_OF_TURN,
    START_OF_TURN,
    TEMPLATE_VERSION,
    TEMPLATES,
    minimum_max_length,
)
from kaggle_utils.text.tokenizer import load_tokenizer, train_demo_tokenizer
from kaggle_utils.text.truncation import CUT_SPLITS, TRUNCATION_MODES

MAX_TURNS, MAX_WORDS = 4, 120
CONTENT = re.compile(r"^([pab])(\d+)x(\d+)$")
PIECES = "pab"
HEAD_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
GEMMA2_ENV = "KAGGLE_UTILS_GEMMA2_TOKENIZER"
HYPOTHESIS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ fixtures
def _template_words() -> set[str]:
    splitter = pre_tokenizers.Whitespace()
    texts = [FormatConfig().truncation_marker]
    for template in TEMPLATES.values():
        texts += [
            template.turn_open,
            template.prompt_to_a,
            template.a_to_b,
            template.turn_close,
            template.suffix,
        ]
    words = set()
    for text in texts:
        for part in re.split(f"({re.escape(START_OF_TURN)}|{re.escape(END_OF_TURN)})", text):
            words.update(word for word, _ in splitter.pre_tokenize_str(part))
    return words - {START_OF_TURN, END_OF_TURN}


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    """WordLevel, specials at the start, Gemma's turn tokens appended at the end of the vocabulary."""
    content = {
        f"{piece}{turn}x{i}" for piece in PIECES for turn in range(MAX_TURNS) for i in range(MAX_WORDS)
    }
    vocab_words = ["[UNK]", "[PAD]", "[BOS]", "[EOS]", *sorted(_template_words() | content)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab_words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        extra_special_tokens=[START_OF_TURN, END_OF_TURN],
    )


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    corpus = [
        "Which response is better? A, B or tie? The model answers the user.",
        "naïve café — 数据 😊 <response_a> </response_b> ### Prompt",
        "def solve(x):\n    return x * 2\n",
    ] * 30
    return train_demo_tokenizer(corpus, None, vocab_size=400)


def _words(piece: str, turn: int, n: int) -> str:
    return " ".join(f"{piece}{turn}x{i}" for i in range(n))


def _word_rows(lengths: list[list[tuple[int, int, int]]]) -> list[list[tuple[str, str, str]]]:
    return [
        [tuple(_words(PIECES[k], t, turn[k]) for k in range(3)) for t, turn in enumerate(row)]
        for row in lengths
    ]


def _pieces(tok, text_or_texts):
    return tok(text_or_texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _template_parts(tok, cfg):
    template = TEMPLATES[cfg.template]
    parts = [template.turn_open, template.prompt_to_a, template.a_to_b, template.turn_close, template.suffix]
    fixed = tok(parts, add_special_tokens=False)["input_ids"]
    marker = _pieces(tok, cfg.truncation_marker)
    return fixed, marker


def _priority(n_turns: int, mode: str) -> list[int]:
    """Turn order of preference: last first (keep_end), first first (keep_start), alternating (head_tail)."""
    if mode == "keep_end":
        return list(reversed(range(n_turns)))
    if mode == "keep_start":
        return list(range(n_turns))
    ends = [x for pair in zip(reversed(range(n_turns)), range(n_turns), strict=True) for x in pair]
    return list(dict.fromkeys(ends))


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


# ---------------------------------------------------------------------------------------- word strategy
turn_lengths = st.tuples(*(st.integers(0, MAX_WORDS) for _ in range(3)))
word_rows = st.lists(st.lists(turn_lengths, min_size=1, max_size=MAX_TURNS), min_size=1, max_size=3)


@HYPOTHESIS
@given(
    lengths=word_rows,
    mode=st.sampled_from(TRUNCATION_MODES),
    # the word tokenizer knows Gemma's turn tokens only
    template=st.sampled_from(
        sorted(n for n, t in TEMPLATES.items() if set(t.required_tokens) <= {START_OF_TURN, END_OF_TURN})
    ),
    head_fraction=st.sampled_from(HEAD_FRACTIONS),
    slack=st.integers(0, 400),
    split=st.sampled_from(CUT_SPLITS),
)
def test_truncation_properties_counted_word_by_word(
    word_tok, lengths, mode, template, head_fraction, slack, split
):
    base = FormatConfig(template=template, truncation=mode, head_fraction=head_fraction, cut_split=split)
    cfg = FormatConfig(template=template, truncation=mode, head_fraction=head_fraction, cut_split=split,
                       max_length=minimum_max_length(word_tok, base) + slack)  # fmt: skip
    encoded = encode_rows(turns_frame(_word_rows(lengths)), word_tok, cfg)
    (turn_open, prompt_to_a, a_to_b, turn_close, suffix), marker = _template_parts(word_tok, cfg)
    assert len(marker) == 1
    turn_template = turn_open + prompt_to_a + a_to_b + turn_close
    overhead = len(turn_template)
    fixed_cost = 1 + len(suffix)

    for row, ids in zip(lengths, encoded.input_ids, strict=True):
        n_turns = len(row)
        tokens = word_tok.convert_ids_to_tokens(ids)
        # Never longer than max_length; bos first; the suffix whole at the end.
        assert len(ids) <= cfg.max_length
        assert ids[0] == word_tok.bos_token_id and ids[-len(suffix) :] == suffix
        # Delimiters and special tokens never cut: without text and markers, bos + k turn templates + suffix.
        skeleton = [i for i, t in zip(ids, tokens, strict=True) if not CONTENT.match(t) and i != marker[0]]
        kept_turns = (len(skeleton) - fixed_cost) // max(overhead, 1)
        assert skeleton == [word_tok.bos_token_id] + turn_template * kept_turns + suffix
        assert 1 <= kept_turns <= n_turns

        # Which words of which piece survived, in output order.
        seen: dict[tuple[int, int], list[int]] = {}
        positions: dict[tuple[int, int], list[int]] = {}
        for pos, token in enumerate(tokens):
            match = CONTENT.match(token)
            if match:
                key = (int(match[2]), PIECES.index(match[1]))
                seen.setdefault(key, []).append(int(match[3]))
                positions.setdefault(key, []).append(pos)
        turns_with_text = sorted({turn for turn, _ in seen})
        n_markers = sum(1 for i in ids if i == marker[0])

        fits_whole = fixed_cost + sum(overhead + sum(turn) for turn in row) <= cfg.max_length
        event("fits whole" if fits_whole else f"cut, {kept_turns} of {n_turns} turns kept")
        if fits_whole:
            assert n_markers == 0
            for t, turn in enumerate(row):
                for k in range(3):
                    assert seen.get((t, k), []) == list(range(turn[k]))
            continue

        # Text was lost, so a marker shows it (inside a cut piece or where whole turns were dropped).
        assert n_markers >= 1
        # Kept turns are the highest-priority ones.
        kept_set = set(_priority(n_turns, mode)[:kept_turns])
        assert set(turns_with_text) <= kept_set
        # The highest-priority turn survives whole whenever it fits alone (beside the dropped-turns marker).
        first = 0 if mode == "keep_start" else n_turns - 1
        gap_room = len(marker) if n_turns > 1 else 0
        if fixed_cost + overhead + sum(row[first]) + gap_room <= cfg.max_length:
            for k in range(3):
                assert seen.get((first, k), []) == list(range(row[first][k]))

        cut_pieces = 0
        for t, k in ((t, k) for t in sorted(kept_set) for k in range(3)):
            total, kept = row[t][k], seen.get((t, k), [])
            if len(kept) == total:
                assert kept == list(range(total))
                continue
            cut_pieces += 1
            if not kept:  # cut to nothing but its marker (tiny budget)
                continue
            # Head and end around the marker: head_fraction of the kept words from the start (rounded),
            # and for 0 < head_fraction < 1 at least the first and the last word.
            where = positions[(t, k)]
            head = math.floor(head_fraction * len(kept) + 0.5)
            if 0 < head_fraction < 1 and len(kept) >= 2:
                head = min(max(head, 1), len(kept) - 1)
                assert kept[0] == 0 and kept[-1] == total - 1
            assert kept == list(range(head)) + list(range(total - (len(kept) - head), total))
            marker_at = where[head - 1] + 1 if head else where[0] - 1
            assert ids[marker_at] == marker[0]
        # One marker per cut piece, plus one where whole turns were dropped.
        assert n_markers == cut_pieces + (kept_turns < n_turns)
        if kept_turns < n_turns and mode == "keep_end":
            assert ids[1] == marker[0]  # dropped turns were the first ones
        elif kept_turns < n_turns and mode == "keep_start":
            assert ids[-len(suffix) - 1] == marker[0]  # dropped turns were the last ones

        # Fairness inside the cut turn (the split under test).
        cut_turns = [t for t in kept_set if any(len(seen.get((t, k), [])) < row[t][k] for k in range(3))]
        assert len(cut_turns) <= 1
        for t in cut_turns:
            _check_cut_split(list(row[t]), [len(seen.get((t, k), [])) for k in range(3)], split)

        if n_turns == 1:
            # The whole budget is used (one token may stay unused so that A and B are cut alike).
            content_budget = cfg.max_length - fixed_cost - overhead
            kept_counts = [len(seen.get((0, k), [])) for k in range(3)]
            used = sum(kept_counts) + n_markers * len(marker)
            assert content_budget - 1 <= used <= content_budget
            assert n_markers == sum(1 for k in range(3) if kept_counts[k] < row[0][k])

    # The implementation's own bookkeeping agrees with the count.
    for r, ids in enumerate(encoded.input_ids):
        tokens = word_tok.convert_ids_to_tokens(ids)
        for k in range(3):
            assert encoded.kept_tokens[r, k] == sum(
                1 for t in tokens if CONTENT.match(t) and t[0] == PIECES[k]
            )
            assert encoded.content_tokens[r, k] == sum(turn[k] for turn in lengths[r])


@pytest.mark.parametrize(("split", "three_cut"), [("proportional", [34, 37, 27]), ("equal", [32, 33, 33])])
def test_water_filling_keeps_a_short_response_whole(word_tok, split, three_cut):
    """The issue's case, scaled: lengths (5, 119, 40) and 100 text tokens. The old proportional split cut B to
    29 while A kept 65; water-filling keeps the prompt and B whole and gives A the rest (in both modes)."""
    cfg = FormatConfig(template="plain", max_length=200)
    (turn_open, prompt_to_a, a_to_b, turn_close, suffix), marker = _template_parts(word_tok, cfg)
    overhead = len(turn_open + prompt_to_a + a_to_b + turn_close)
    cfg = FormatConfig(
        template="plain", max_length=1 + len(suffix) + overhead + 100 + len(marker), cut_split=split
    )
    encoded = encode_rows(turns_frame(_word_rows([[(5, 119, 40)]])), word_tok, cfg)
    assert encoded.kept_tokens[0].tolist() == [5, 55, 40]
    # Three long pieces, each paying for a marker: 98 words. "equal": 32 each, the 2 spare ones to A and B
    # (A and B keep the same, hiding that A is longer); "proportional": 98 * (110, 118, 90) / 318 rounded
    # down, the 2 spare ones to the longest pieces (A, then the prompt): A keeps more than B.
    three = encode_rows(turns_frame(_word_rows([[(110, 118, 90)]])), word_tok, cfg)
    assert three.kept_tokens[0].tolist() == three_cut


@pytest.mark.parametrize("split", ["proportional", "equal"])
def test_short_pieces_give_their_share_to_the_long_one(word_tok, split):
    cfg = FormatConfig(template="plain", max_length=100, cut_split=split)
    (turn_open, prompt_to_a, a_to_b, turn_close, suffix), marker = _template_parts(word_tok, cfg)
    content_budget = cfg.max_length - 1 - len(suffix) - len(turn_open + prompt_to_a + a_to_b + turn_close)
    encoded = encode_rows(turns_frame(_word_rows([[(3, 119, 2)]])), word_tok, cfg)
    assert encoded.kept_tokens[0].tolist() == [3, content_budget - len(marker) - 5, 2]


@pytest.mark.parametrize("split", CUT_SPLITS)
def test_text_that_truncation_throws_away_still_decides_the_proportional_split(word_tok, split):
    """Why encode_rows tokenises every character (issue 12 item 6, benchmarks/bench_tokenize.py --survivors):
    two responses A that differ only in a middle that is cut away either way give different ids under
    cut_split="proportional", because the split follows A's full token count. Tokenising only a head and an
    end window of each piece could not reproduce that without the exact count, which needs the whole text.
    "equal" depends on the cut pieces' lengths only through whether they are cut."""
    cfg = FormatConfig(template="plain", max_length=90, cut_split=split, head_fraction=0.5)
    head, end = _words("a", 0, 60), " ".join(f"a0x{i}" for i in range(60, 120))
    short_a, long_a = f"{head} {end}", f"{head} {' '.join(['a0x60'] * 200)} {end}"
    rows = [[(_words("p", 0, 2), response_a, _words("b", 0, 119))] for response_a in (short_a, long_a)]
    encoded = encode_rows(turns_frame(rows), word_tok, cfg)
    kept_a = encoded.kept_tokens[:, 1].tolist()
    assert encoded.content_tokens[:, 1].tolist() == [120, 320]
    assert max(kept_a) < 60  # both A's keep less than their common head and end: the middle is gone in both
    if split == "proportional":
        assert kept_a[0] < kept_a[1] and encoded.input_ids[0] != encoded.input_ids[1]
    else:
        assert encoded.input_ids[0] == encoded.input_ids[1]


# ----------------------------------------------------------------------------------------- BPE strategy
piece_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=500),
    st.sampled_from(["", "<start_of_turn>", "<bos> <pad> <end_of_turn>", "<response_b>", " [...] "]),
    st.lists(st.sampled_from(["the", "model", "café", "😊", "数据", "\n", "  "]), max_size=400).map(" ".join),
)

# Long pieces with distinct words (so a wrong head/end split cannot pass by repetition) make cuts common.
long_text = st.builds(lambda head, n, end: head + " ".join(f"w{i}" for i in range(n)) + end,
                      st.text(max_size=30), st.integers(50, 1500), st.text(max_size=30))  # fmt: skip


def _rows_of(text: st.SearchStrategy[str]) -> st.SearchStrategy[list[list[tuple[str, str, str]]]]:
    """Rows of 1-3 turns; single-turn rows drawn often, since they are read back token by token."""
    text = st.one_of(text, long_text)
    turn = st.tuples(text, text, text)
    row = st.one_of(st.lists(turn, min_size=1, max_size=1), st.lists(turn, min_size=1, max_size=3))
    return st.lists(row, min_size=1, max_size=3)


bpe_rows = _rows_of(piece_text)


def _check_cut_split(lengths: list[int], kept: list[int], split: str) -> None:
    """The split of a cut turn's text between its pieces, seen from the output. Both modes: a piece kept
    whole is never longer than a cut one (up to one rounding token). "equal": a cut piece keeps at least as
    much as any other (+1 rounding). "proportional": among cut pieces the longer never keeps fewer tokens."""
    cut = [k for k in range(3) if kept[k] < lengths[k]]
    for c in cut:
        for k in range(3):
            if split == "equal":
                assert kept[k] <= kept[c] + 1, (lengths, kept)
            elif k in cut and lengths[k] > lengths[c]:
                assert kept[k] >= kept[c], (lengths, kept)
            if k not in cut and lengths[k] > lengths[c]:  # only by one rounding token (it went to the longer)
                assert kept[c] == lengths[c] - 1, (lengths, kept)


def _cut_segment_ok(
    segment: list[int], piece: list[int], keep: int, marker: list[int], head_fraction: float
) -> bool:
    """``segment``: the piece's first h and last keep-h tokens around the marker, h ~ head_fraction * keep."""
    for head in range(keep + 1):
        if abs(head - head_fraction * keep) > 1:
            continue
        if segment == piece[:head] + marker + piece[len(piece) - (keep - head) :]:
            return True
    return False


def _check_truncation_properties(tok, rows, mode: str, slack: int, head_fraction: float, split: str) -> None:
    """Properties that hold for any fast tokenizer, checked against separately tokenised pieces."""
    base = FormatConfig(truncation=mode, head_fraction=head_fraction, cut_split=split)
    cfg = FormatConfig(truncation=mode, head_fraction=head_fraction, cut_split=split,
                       max_length=minimum_max_length(tok, base) + slack)  # fmt: skip
    encoded = encode_rows(turns_frame(rows), tok, cfg)
    (turn_open, prompt_to_a, a_to_b, turn_close, suffix), marker = _template_parts(tok, cfg)
    delimiters = (turn_open, prompt_to_a, a_to_b, turn_close)
    start, end = tok.convert_tokens_to_ids([START_OF_TURN, END_OF_TURN])
    for r, (row, ids) in enumerate(zip(rows, encoded.input_ids, strict=True)):
        assert len(ids) <= cfg.max_length
        assert ids[0] == tok.bos_token_id and ids[-len(suffix) :] == suffix
        # Literal special tokens in text stay text: the only special ids are the template's own.
        assert tok.bos_token_id not in ids[1:] and tok.pad_token_id not in ids and tok.eos_token_id not in ids
        kept_turns = (ids.count(end) - 1) // 2  # per turn: two of each; the suffix: two starts, one end
        assert (
            kept_turns >= 1
            and ids.count(end) == 2 * kept_turns + 1
            and ids.count(start) == 2 * kept_turns + 2
        )
        pieces = [_pieces(tok, list(turn)) for turn in row]
        turns = [turn_open + p + prompt_to_a + a + a_to_b + b + turn_close for p, a, b in pieces]
        fits_whole = 1 + sum(map(len, turns)) + len(suffix) <= cfg.max_length
        event("fits whole" if fits_whole else f"cut, {kept_turns} of {len(row)} turns kept")
        if fits_whole:  # untouched
            assert ids == [tok.bos_token_id] + [i for turn in turns for i in turn] + suffix
            assert encoded.kept_tokens[r].tolist() == encoded.content_tokens[r].tolist()
            continue
        assert _contains(ids, marker)
        gap_room = len(marker) if len(row) > 1 else 0  # the marker for dropped turns
        if mode == "keep_start":
            if 1 + len(turns[0]) + len(suffix) + gap_room <= cfg.max_length:
                assert ids[1 : 1 + len(turns[0])] == turns[0]
        elif (
            1 + len(turns[-1]) + len(suffix) + gap_room <= cfg.max_length
        ):  # the last turn survives if it fits
            assert ids[-len(suffix) - len(turns[-1]) :] == turns[-1] + suffix
        if len(row) > 1:
            continue
        # One turn: read the output back position by position, using only the kept counts.
        kept = encoded.kept_tokens[r].tolist()
        lengths = [len(piece) for piece in pieces[0]]
        assert encoded.content_tokens[r].tolist() == lengths
        cut = [k < n for k, n in zip(kept, lengths, strict=True)]
        position = 1
        for k in range(3):
            assert ids[position : position + len(delimiters[k])] == delimiters[k]
            position += len(delimiters[k])
            segment = ids[position : position + kept[k] + (len(marker) if cut[k] else 0)]
            position += len(segment)
            piece = pieces[0][k]
            if not cut[k]:
                assert segment == piece
                continue
            assert _cut_segment_ok(segment, piece, kept[k], marker, head_fraction)
            if 0 < head_fraction < 1 and kept[k] >= 2:  # the first and last token of a cut piece survive
                assert segment[0] == piece[0] and segment[-1] == piece[-1]
        assert ids[position:] == turn_close + suffix
        # The split under test; the budget is used up to the one token that may stay unused so that A and B
        # are cut alike.
        _check_cut_split(lengths, kept, split)
        content_budget = cfg.max_length - 1 - len(suffix) - sum(map(len, delimiters))
        assert content_budget - 1 <= sum(kept) + sum(cut) * len(marker) <= content_budget


@HYPOTHESIS
@given(rows=bpe_rows, mode=st.sampled_from(TRUNCATION_MODES), slack=st.integers(0, 200),
       head_fraction=st.sampled_from(HEAD_FRACTIONS), split=st.sampled_from(CUT_SPLITS))  # fmt: skip
def test_truncation_properties_on_arbitrary_text_with_bpe(bpe_tok, rows, mode, slack, head_fraction, split):
    _check_truncation_properties(bpe_tok, rows, mode, slack, head_fraction, split)


# ------------------------------------------------------------------------------------ Gemma-2 tokenizer
def _gemma2_dir() -> Path:
    """$KAGGLE_UTILS_GEMMA2_TOKENIZER, else <repo>/../shared/reference/tokenizers/gemma2 (the CI layout)."""
    override = os.environ.get(GEMMA2_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "tokenizers" / "gemma2"


@pytest.fixture(scope="module")
def gemma_tok() -> PreTrainedTokenizerFast:
    """Gemma-2's real tokenizer; the 17 MB tokenizer.json takes seconds to load, so once per module."""
    folder = _gemma2_dir()
    if not (folder / "tokenizer.json").is_file():
        message = (
            f"Gemma-2 tokenizer not found: {folder / 'tokenizer.json'} is missing (expected the shared "
            "reference folder next to the repo clone, <repo>/../shared/reference/tokenizers/gemma2, "
            f"or ${GEMMA2_ENV})"
        )
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    tok = load_tokenizer(folder)
    assert (tok.bos_token_id, *tok.convert_tokens_to_ids([START_OF_TURN, END_OF_TURN])) == (2, 106, 107)
    return tok


gemma_piece_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=400),
    st.sampled_from(
        ["", "<start_of_turn>", "<bos> <pad> <end_of_turn>", "<response_b>", " [...] ", "I'm sorry"]
    ),
    st.lists(
        st.sampled_from(["the", "model", "café", "😊", "数据", "\n", "  ", "def", "```"]), max_size=500
    ).map(" ".join),
)
gemma_rows = _rows_of(gemma_piece_text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=gemma_rows, mode=st.sampled_from(TRUNCATION_MODES), slack=st.integers(0, 300),
       head_fraction=st.sampled_from(HEAD_FRACTIONS), split=st.sampled_from(CUT_SPLITS))  # fmt: skip
def test_truncation_properties_with_gemma2_tokenizer(gemma_tok, rows, mode, slack, head_fraction, split):
    _check_truncation_properties(gemma_tok, rows, mode, slack, head_fraction, split)


def test_gemma2_keeps_a_refusal_and_the_end_of_a_long_response(gemma_tok):
    refusal = "I'm sorry, but I can't help with that. " + "Here is some general background instead. " * 200
    refusal += "In short: please consult a professional."
    frame = turns_frame([[("How do I do this?", refusal, "Sure! Step one: open the file.")]])
    encoded = encode_rows(frame, gemma_tok, FormatConfig(max_length=256))
    text = gemma_tok.decode(encoded.input_ids[0])
    assert len(encoded.input_ids[0]) <= 256
    assert (
        "<response_a>\nI'm sorry, but I can't help" in text
        and "consult a professional.\n</response_a>" in text
    )
    assert " [...] " in text and "Sure! Step one: open the file." in text  # the short response is whole


# ------------------------------------------------------------------------------------------------- swap
def _sections(tok, ids: list[int]) -> tuple[str, str, str]:
    text = tok.decode(ids)
    prompts = re.findall(r"<start_of_turn>user\n(.*?)<end_of_turn>", text, flags=re.S)[:-1]
    a = re.findall(r"<response_a>\n(.*?)\n</response_a>", text, flags=re.S)
    b = re.findall(r"<response_b>\n(.*?)\n</response_b>", text, flags=re.S)
    return "|".join(prompts), "|".join(a), "|".join(b)


def _equivariant_model(tok, input_ids: list[list[int]]) -> np.ndarray:
    """A toy model that treats A and B alike: its scores depend on the sections' text only."""

    def score(text: str) -> float:
        return (sum(map(ord, text)) % 101) / 25 + len(text) / 500

    logits = []
    for ids in input_ids:
        prompt, a, b = _sections(tok, ids)
        logits.append([score(a), score(b), 0.5 + score(prompt) / 10])
    logits = np.asarray(logits)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


safe_text = st.text(alphabet=st.sampled_from(list("abcdefgh éü数😊,.?\n")), max_size=400)


@HYPOTHESIS
@given(rows=st.lists(st.lists(st.tuples(safe_text, safe_text, safe_text), min_size=1, max_size=3), min_size=1,
                     max_size=4),
       mode=st.sampled_from(TRUNCATION_MODES), slack=st.integers(0, 300),
       head_fraction=st.sampled_from(HEAD_FRACTIONS), split=st.sampled_from(CUT_SPLITS))  # fmt: skip
def test_swapped_encoding_exchanges_a_and_b_exactly(bpe_tok, rows, mode, slack, head_fraction, split):
    labels = [i % 3 for i in range(len(rows))]
    frame = turns_frame(rows, labels)
    base = FormatConfig(truncation=mode, head_fraction=head_fraction, cut_split=split)
    cfg = FormatConfig(truncation=mode, head_fraction=head_fraction, cut_split=split,
                       max_length=minimum_max_length(bpe_tok, base) + slack)  # fmt: skip
    original, swapped = encode_both_orders(frame, bpe_tok, cfg)
    assert swapped.input_ids == encode_rows(frame, bpe_tok, cfg, swap=True).input_ids
    assert swapped.input_ids == encode_rows(swap_frame(frame), bpe_tok, cfg).input_ids
    assert original.input_ids == encode_rows(frame, bpe_tok, cfg).input_ids
    for ids, ids_swapped in zip(original.input_ids, swapped.input_ids, strict=True):
        prompt, a, b = _sections(bpe_tok, ids)
        assert _sections(bpe_tok, ids_swapped) == (prompt, b, a)
    # Labels and probabilities permute together: swap_probs(model(original)) == model(swapped).
    assert swapped.labels.tolist() == swap_labels(original.labels).tolist()
    np.testing.assert_allclose(
        swap_probs(_equivariant_model(bpe_tok, original.input_ids)),
        _equivariant_model(bpe_tok, swapped.input_ids),
    )
    np.testing.assert_array_equal(swapped.kept_tokens, original.kept_tokens[:, [0, 2, 1]])
    np.testing.assert_array_equal(swapped.content_tokens, original.content_tokens[:, [0, 2, 1]])


# ----------------------------------------------------------------------------------- contract and errors
def test_encoded_rows_carry_ids_labels_and_version(bpe_tok):
    frame = turns_frame([[("hi", "a", "b")], [("q", "long " * 50, "b")]], labels=[0, 2])
    encoded = encode_rows(frame, bpe_tok, FormatConfig(max_length=512))
    assert encoded.ids == [100, 101] and encoded.swapped is False
    assert encoded.labels.dtype == np.int64 and encoded.labels.tolist() == [0, 2]
    assert encoded.template_version == TEMPLATE_VERSION
    assert encoded.lengths.tolist() == [len(ids) for ids in encoded.input_ids]
    assert not encoded.truncated.any() and "0 truncated" in encoded.summary()
    assert encode_rows(frame.drop("label"), bpe_tok, FormatConfig(max_length=256)).labels is None
    null_labels = frame.with_columns(pl.lit(None, dtype=pl.Int8).alias("label"))
    assert encode_rows(null_labels, bpe_tok, FormatConfig(max_length=256)).labels is None


def test_default_gemma_template_text(bpe_tok):
    encoded = encode_rows(turns_frame([[("Hi?", "Hello!", "Hey.")]]), bpe_tok, FormatConfig())
    assert bpe_tok.decode(encoded.input_ids[0]) == (
        "<bos><start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"
        "<response_a>\nHello!\n</response_a>\n"
        "<response_b>\nHey.\n</response_b><end_of_turn>\n"
        "<start_of_turn>user\nWhich response is better? A, B or tie?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_template_needs_the_turn_tokens(word_tok):
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[BOS]": 1, "hi": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain_tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]")
    frame = turns_frame([[("hi", "hi", "hi")]])
    with pytest.raises(UsageError, match="template='plain'"):
        encode_rows(frame, plain_tok, FormatConfig(template="gemma"))
    assert encode_rows(frame, plain_tok, FormatConfig(template="plain")).input_ids[0][0] == 1


def test_config_and_length_errors_are_usage_errors(word_tok):
    frame = turns_frame([[("p0x1", "a0x1", "b0x1")]])
    with pytest.raises(UsageError, match="head_fraction"):
        FormatConfig(head_fraction=1.5)
    with pytest.raises(UsageError, match=r"format.cut_split must be one of \['proportional', 'equal'\]"):
        FormatConfig(cut_split="bogus")
    changed = FormatConfig()
    changed.truncation = "middle"  # changed after construction: encode_rows checks again
    with pytest.raises(UsageError, match="format.truncation must be one of"):
        encode_rows(frame, word_tok, changed)
    minimum = minimum_max_length(word_tok, FormatConfig())
    with pytest.raises(UsageError, match=f"max_length={minimum - 1} .* at least {minimum}"):
        encode_rows(frame, word_tok, FormatConfig(max_length=minimum - 1))
    assert len(encode_rows(frame, word_tok, FormatConfig(max_length=minimum)).input_ids[0]) <= minimum


def test_bad_frames_raise_data_errors_naming_ids(word_tok):
    good = turns_frame([[("a", "b", "c")], [("d", "e", "f")]], labels=[0, 1])
    with pytest.raises(DataError, match="response_b"):
        encode_rows(good.drop("response_b"), word_tok, FormatConfig())
    uneven = good.with_columns(pl.Series("response_a", [["b"], ["e", "extra"]]))
    with pytest.raises(DataError, match=r"different lengths, ids \[101\]"):
        encode_rows(uneven, word_tok, FormatConfig())
    null_turn = good.with_columns(pl.Series("prompt", [["a"], [None]], dtype=pl.List(pl.String)))
    with pytest.raises(DataError, match=r"'prompt'.*ids \[101\]"):
        encode_rows(null_turn, word_tok, FormatConfig())
    partial_labels = good.with_columns(pl.Series("label", [0, None], dtype=pl.Int8))
    with pytest.raises(DataError, match=r"no label.*ids \[101\]"):
        encode_rows(partial_labels, word_tok, FormatConfig())
    bad_label = good.with_columns(pl.Series("label", [0, 7], dtype=pl.Int8))
    with pytest.raises(DataError, match=r"ids \[101\]"):
        encode_rows(bad_label, word_tok, FormatConfig())


def test_generated_competition_data_encodes_within_limits(demo_tokenizer, train_data):
    cfg = FormatConfig(max_length=256)
    original, swapped = encode_both_orders(train_data.frame, demo_tokenizer, cfg)
    suffix = _template_parts(demo_tokenizer, cfg)[0][4]
    assert len(original) == train_data.frame.height
    assert max(original.lengths) <= 256 and max(swapped.lengths) <= 256
    assert all(
        ids[0] == demo_tokenizer.bos_token_id and ids[-len(suffix) :] == suffix for ids in original.input_ids
    )
    assert original.truncated.any() and (original.kept_tokens <= original.content_tokens).all()
    np.testing.assert_array_equal(swapped.labels, swap_labels(original.labels))
