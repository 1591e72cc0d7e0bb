"""kaggle_utils.text.swap: the A/B swap of frames, labels and probabilities, and swap-TTA averaging."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from builders import turns_frame
from hypothesis import given
from hypothesis import strategies as st

from kaggle_utils.text.swap import average_views, swap_frame, swap_labels, swap_probs


@given(labels=st.lists(st.integers(0, 2), max_size=50))
def test_swap_label_and_probability_algebra(labels):
    labels = np.asarray(labels, dtype=np.int64)
    assert swap_labels(swap_labels(labels)).tolist() == labels.tolist()
    assert ((swap_labels(labels) == 2) == (labels == 2)).all()
    one_hot = np.eye(3)[labels]
    np.testing.assert_array_equal(swap_probs(one_hot), np.eye(3)[swap_labels(labels)])
    probs = np.random.default_rng(len(labels)).dirichlet(np.ones(3), size=len(labels))
    np.testing.assert_array_equal(swap_probs(swap_probs(probs)), probs)
    np.testing.assert_array_equal(swap_probs(probs)[:, 2], probs[:, 2])
    assert swap_probs(np.array([[0.7, 0.3]])).tolist() == [[0.3, 0.7]]
    with pytest.raises(ValueError, match="shape"):
        swap_probs(np.ones((2, 4)))


def test_swap_frame_exchanges_every_a_b_pair_and_is_an_involution():
    frame = turns_frame(
        [[("q", "left", "right")], [("q2", "x", "y")], [("q3", "s", "t")]], labels=[0, 1, 2]
    ).with_columns(model_a=pl.Series(["m1", "m2", "m3"]), model_b=pl.Series(["n1", "n2", "n3"]))
    swapped = swap_frame(frame)
    assert swapped.columns == frame.columns
    assert swapped["label"].dtype == pl.Int8 and swapped["label"].to_list() == [1, 0, 2]
    assert swapped["response_a"].to_list() == [["right"], ["y"], ["t"]]
    assert swapped["model_a"].to_list() == ["n1", "n2", "n3"] and swapped["model_b"].to_list() == [
        "m1",
        "m2",
        "m3",
    ]
    assert swapped["prompt"].to_list() == frame["prompt"].to_list()
    assert swap_frame(swapped).equals(frame)
    test_frame = frame.drop("label")
    assert swap_frame(swap_frame(test_frame)).equals(test_frame)


def test_average_views_in_probability_and_logit_space():
    original = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    swapped_view = np.array([[0.1, 0.5, 0.4], [0.3, 0.1, 0.6]])  # columns (B, A, tie) of the swapped row
    unswapped = swapped_view[:, [1, 0, 2]]
    np.testing.assert_allclose(average_views(original, swapped_view), (original + unswapped) / 2)
    geometric = np.sqrt(original * unswapped)
    np.testing.assert_allclose(
        average_views(original, swapped_view, "logit"), geometric / geometric.sum(axis=1, keepdims=True)
    )
    # the two spaces differ, and a zero probability does not produce NaN in logit space
    assert not np.allclose(
        average_views(original, swapped_view), average_views(original, swapped_view, "logit")
    )
    assert np.isfinite(average_views(np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]), "logit")).all()
    with pytest.raises(ValueError, match="TTA space"):
        average_views(original, swapped_view, "median")
