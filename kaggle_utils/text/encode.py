"""Frame rows -> model input ids, tokenised in batches, in one or both A/B orders.

Each text piece is tokenised once (batch calls, no special tokens, ``split_special_tokens=True``) and the
sequence is assembled by list slicing, so training and inference always agree.
Usage: ``encoded = encode_rows(frame, tokenizer, FormatConfig(max_length=1024)); print(encoded.summary())``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from transformers import PreTrainedTokenizerFast

from kaggle_utils.core.config import FormatConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.text.swap import swap_labels
from kaggle_utils.text.template import TEMPLATE_VERSION, minimum_length, resolve_template, template_ids
from kaggle_utils.text.truncation import encode_row

TURN_COLUMNS: tuple[str, str, str] = ("prompt", "response_a", "response_b")
# Rows per batch call of the tokenizer: bounds the memory of the intermediate token lists.
ROWS_PER_CHUNK = 4096


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
            f"{null_rows.height} row(s) have no label among labelled rows, "
            f"ids {null_rows['id'].head(10).to_list()}"
        )
    labels = frame["label"].to_numpy().astype(np.int64)
    bad = ~np.isin(labels, (0, 1, 2))
    if bad.any():
        raise DataError(
            "labels must be 0 (A), 1 (B) or 2 (tie); "
            f"ids {frame['id'].filter(pl.Series(bad)).head(10).to_list()}"
        )
    return labels


def _encode(
    frame: pl.DataFrame,
    tokenizer: PreTrainedTokenizerFast,
    cfg: FormatConfig,
    orders: tuple[bool, ...],
    progress: bool | None,
) -> list[EncodedRows]:
    """One tokenisation pass over ``frame``, assembled once per entry of ``orders`` (True: A/B swapped)."""
    ids = template_ids(tokenizer, cfg)
    minimum = minimum_length(ids)
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
            for row, turns in enumerate(_tokenised_turns(chunk, tokenizer)):
                content[start + row] = [sum(len(turn[piece]) for turn in turns) for piece in range(3)]
                for index, swap in enumerate(orders):
                    ordered = [(p, b, a) for p, a, b in turns] if swap else turns
                    row_ids, row_kept = encode_row(
                        ordered, ids, cfg.max_length, cfg.truncation, cfg.head_fraction, cfg.cut_split
                    )
                    outputs[index].append(row_ids)
                    kept[index][start + row] = row_kept
            bar.update(chunk.height)
    return [
        EncodedRows(
            ids=frame["id"].to_list(),
            input_ids=outputs[index],
            labels=None if labels is None else (swap_labels(labels) if swap else labels.copy()),
            swapped=swap,
            content_tokens=content[:, [0, 2, 1]] if swap else content,
            kept_tokens=kept[index],
        )
        for index, swap in enumerate(orders)
    ]


def _tokenised_turns(
    chunk: pl.DataFrame, tokenizer: PreTrainedTokenizerFast
) -> list[list[tuple[list[int], list[int], list[int]]]]:
    """Per row of ``chunk``, its turns as (prompt, A, B) token lists, from one batch call of the tokenizer."""
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
    rows = []
    offset = 0
    for count in n_turns:
        window = slice(offset, offset + count)
        rows.append(list(zip(prompts[window], responses_a[window], responses_b[window], strict=True)))
        offset += count
    return rows
