"""Dynamic padding, length-bucketed training batches and token-budget inference batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from transformers import Gemma2Config, Gemma2ForSequenceClassification

from kaggle_utils.text.batching import (
    LengthBucketSampler,
    PadCollator,
    padding_efficiency,
    token_budget_batches,
)

lengths_strategy = st.lists(st.integers(1, 3000), min_size=1, max_size=300)


def _long_tailed_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=6.2, sigma=0.8, size=n), 20, 2048).astype(np.int64)


# ------------------------------------------------------------------------------------------- collator
def test_right_and_left_padding():
    features = [{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 0}]
    right = PadCollator(pad_token_id=0)(features)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [2, 0] and right["labels"].dtype == torch.long
    left = PadCollator(pad_token_id=9, padding_side="left")(features)
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    rounded = PadCollator(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5]}])
    assert rounded["input_ids"].shape == (1, 8) and "labels" not in rounded
    assert rounded["attention_mask"].sum().item() == 5


def test_collator_rejects_inconsistent_batches():
    collate = PadCollator(pad_token_id=0)
    with pytest.raises(ValueError, match=r"labels missing at batch position\(s\) \[1\]"):
        collate([{"input_ids": [1], "labels": 1}, {"input_ids": [2]}])
    with pytest.raises(ValueError, match="empty input_ids"):
        collate([{"input_ids": []}])
    with pytest.raises(ValueError, match="padding_side"):
        PadCollator(pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id"):
        PadCollator(pad_token_id=None)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_gives_the_classifier_the_same_logits_as_single_rows(padding_side):
    """The classifier pools the last non-pad token: padding must not change a row's logits."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_labels=3, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    model = Gemma2ForSequenceClassification(config).eval()
    rows = [[2, 7, 9, 11, 13, 17], [2, 5], [2, 33, 34, 35]]
    batch = PadCollator(pad_token_id=0, padding_side=padding_side)([{"input_ids": r} for r in rows])
    with torch.no_grad():
        batched = model(**batch).logits
        single = torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------- train sampler
@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, batch_size=st.integers(1, 16), multiplier=st.integers(1, 8),
       seed=st.integers(0, 10), shuffle=st.booleans())  # fmt: skip
def test_bucket_sampler_yields_every_index_once_per_epoch(lengths, batch_size, multiplier, seed, shuffle):
    sampler = LengthBucketSampler(
        lengths, batch_size, seed=seed, bucket_size_multiplier=multiplier, shuffle=shuffle
    )
    for _ in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(1 <= len(batch) <= batch_size for batch in batches)


def test_bucket_sampler_is_seeded_shuffles_between_epochs_and_buckets_by_length():
    lengths = _long_tailed_lengths(4000)
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=3, bucket_size_multiplier=50)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert epoch0 != epoch1  # the epoch advances on every pass
    sampler.set_epoch(0)
    assert list(sampler) == epoch0  # same seed and epoch, same batches
    assert list(LengthBucketSampler(lengths, 8, seed=4)) != epoch0
    # Batches come from length-sorted buckets, in shuffled order: far less padding than random batches,
    # yet not one global sort (the first batches are not simply the longest rows).
    random_batches = [list(range(i, min(i + 8, len(lengths)))) for i in range(0, len(lengths), 8)]
    assert padding_efficiency(lengths, epoch0) > 0.9 > padding_efficiency(lengths, random_batches)
    batch_max = [lengths[b].max() for b in epoch0]
    assert batch_max != sorted(batch_max, reverse=True)
    fixed = list(LengthBucketSampler(lengths, 8, shuffle=False))
    fixed_max = [lengths[b].max() for b in fixed]
    assert fixed_max == sorted(fixed_max, reverse=True)


def test_bucket_sampler_drives_a_dataloader():
    lengths = [3, 1, 2, 5, 4, 6, 2]
    data = [{"input_ids": list(range(1, n + 1)), "labels": i % 3} for i, n in enumerate(lengths)]
    loader = DataLoader(
        data, batch_sampler=LengthBucketSampler(lengths, 3, seed=0), collate_fn=PadCollator(0)
    )
    seen = 0
    for batch in loader:
        real = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == real.max().item()
        seen += len(batch["labels"])
    assert seen == len(lengths)


# ------------------------------------------------------------------------------------ inference batches
@settings(max_examples=100, deadline=None)
@given(
    lengths=lengths_strategy, budget=st.integers(1, 20000), max_rows=st.one_of(st.none(), st.integers(1, 64))
)
def test_token_budget_batches_properties(lengths, budget, max_rows):
    batches = token_budget_batches(lengths, budget, max_rows=max_rows)
    lengths = np.asarray(lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert lengths[batches[0]].max() == lengths.max()  # the biggest batch shape comes first
    widths = [lengths[batch].max() for batch in batches]
    assert widths == sorted(widths, reverse=True)
    for position, batch in enumerate(batches):
        width = lengths[batch].max()
        assert len(batch) == 1 or len(batch) * width <= budget  # only a lone over-long row may exceed it
        if max_rows is not None:
            assert len(batch) <= max_rows
        # As many rows as fit: one more row (the next longest) would break the budget or the row cap.
        if position + 1 < len(batches):
            assert (len(batch) + 1) * width > budget or (max_rows is not None and len(batch) == max_rows)


def test_token_budget_batches_reach_high_padding_efficiency_on_long_tailed_lengths():
    lengths = _long_tailed_lengths(5000, seed=1)
    in_file_order = [list(range(i, min(i + 8, len(lengths)))) for i in range(0, len(lengths), 8)]
    budgeted = token_budget_batches(lengths, 8192)
    assert padding_efficiency(lengths, budgeted) >= 0.95 > padding_efficiency(lengths, in_file_order)


def test_padding_efficiency_by_hand_and_errors():
    assert padding_efficiency([4, 2, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(12 / 14)
    assert padding_efficiency([5], [[0]]) == 1.0
    with pytest.raises(ValueError, match="no tokens"):
        padding_efficiency([1, 2], [])
    with pytest.raises(ValueError, match="token_budget"):
        token_budget_batches([1, 2], 0)
    assert token_budget_batches([10, 3000, 20], 100) == [[1], [2, 0]]  # longest first
