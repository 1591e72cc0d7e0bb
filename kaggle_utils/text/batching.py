"""Batches of token ids: dynamic padding, length-bucketed training batches, token-budget inference batches.

Padding is wasted compute. Training draws batches of similar length from random buckets (still shuffled, so
the gradient noise stays honest); inference packs rows longest first under a token budget
(rows x padded length), so the first batch is the biggest and an out-of-memory shows up at once, not after
hours (on Kaggle an OOM looks like any other "Notebook Threw Exception").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class PadCollator:
    """Pad a list of ``{"input_ids": list[int], "labels": int (optional)}`` to the batch's longest row.

    Right padding by default (the classifier pools the last non-pad token); ``padding_side="left"`` puts each
    row's last token in the last column; ``pad_to_multiple_of`` rounds the padded length up.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError(
                "PadCollator needs a pad_token_id (the tokenizer has none: set tokenizer.pad_token)"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PadCollator got an empty batch")
        rows = [list(feature["input_ids"]) for feature in features]
        empty = [index for index, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(f"PadCollator got empty input_ids at batch position(s) {empty}")
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            span = slice(0, len(row)) if self.padding_side == "right" else slice(width - len(row), width)
            input_ids[index, span] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[index, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        with_labels = ["labels" in feature for feature in features]
        if any(with_labels):
            if not all(with_labels):
                missing = [index for index, has in enumerate(with_labels) if not has]
                raise ValueError(
                    f"PadCollator: labels missing at batch position(s) {missing} while others have them"
                )
            batch["labels"] = torch.as_tensor(
                [int(feature["labels"]) for feature in features], dtype=torch.long
            )
        return batch


class LengthBucketSampler(Sampler[list[int]]):
    """Training batches of similar length, shuffled (seed + epoch): every index exactly once per epoch.

    Shuffled indices are cut into buckets, each sorted by length and cut into batches; ``shuffle=False`` sorts
    all by length. Usage: ``DataLoader(dataset, batch_sampler=LengthBucketSampler(lengths, 8))``.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        bucket_size_multiplier: int = 50,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_size_multiplier < 1:
            raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        super().__init__()
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise ValueError(f"lengths must be one-dimensional, got shape {self.lengths.shape}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.bucket_size = self.batch_size * int(bucket_size_multiplier)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.shuffle:
            return -(-n // self.batch_size)
        full, rest = divmod(n, self.bucket_size)
        return full * -(-self.bucket_size // self.batch_size) + -(-rest // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def _batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng([self.seed, epoch])
        permuted = rng.permutation(n)
        batches: list[list[int]] = []
        for start in range(0, n, self.bucket_size):
            bucket = permuted[start : start + self.bucket_size]
            bucket = bucket[np.argsort(-self.lengths[bucket], kind="stable")]
            batches += [
                bucket[i : i + self.batch_size].tolist() for i in range(0, len(bucket), self.batch_size)
            ]
        return [batches[i] for i in rng.permutation(len(batches))]


def token_budget_batches(
    lengths: Sequence[int] | np.ndarray, token_budget: int, max_rows: int | None = None
) -> list[list[int]]:
    """Inference batches, longest first: each holds as many rows as fit ``rows * max_len <= token_budget``
    (a longer row runs alone); ``max_rows`` caps the rows per batch."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    batches: list[list[int]] = []
    start, n = 0, len(order)
    while start < n:
        # Rows are sorted longest first, so the first row of a batch sets its padded length.
        rows = max(1, token_budget // max(int(sorted_lengths[start]), 1))
        if max_rows is not None:
            rows = min(rows, max_rows)
        batches.append(order[start : start + rows].tolist())
        start += rows
    return batches


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / computed tokens (rows x padded length), summed over all batches; 1.0 means no padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = computed = 0
    for batch in batches:
        if len(batch) == 0:
            continue
        batch_lengths = lengths[np.asarray(batch, dtype=np.int64)]
        real += int(batch_lengths.sum())
        computed += int(batch_lengths.max()) * len(batch)
    if computed == 0:
        raise ValueError("padding_efficiency: the batches hold no tokens")
    return real / computed
