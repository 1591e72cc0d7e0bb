"""Blend weights on OOF: the constraints hold, noise gets no weight, a real second opinion does, and
members must be scored on identical rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import log_loss, make_oof
from kaggle_utils.evaluate.ensembles import aligned_oof, average_members, fit_blend_weights


def members(n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 3))
    true = np.exp(signal) / np.exp(signal).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in true])

    def noisy(scale):
        logits = signal + rng.normal(scale=scale, size=signal.shape)
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    noise = rng.dirichlet(np.full(3, 0.2), size=n)  # confident and random: worth nothing
    return labels, {"a": noisy(0.8), "b": noisy(0.8), "noise": noise}


def test_weights_are_a_convex_combination_that_beats_the_best_member():
    labels, probs = members()
    result = fit_blend_weights(labels, probs)
    weights = np.array(list(result.weights.values()))
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
    assert result.log_loss <= result.best_member_log_loss
    # two independent noisy views of the same signal: averaging them helps, clearly beyond noise
    assert result.weights["a"] > 0.3 and result.weights["b"] > 0.3
    assert result.gain > 2 * result.gain_standard_error
    assert result.weights["noise"] < 0.05
    blend = average_members([probs[n] for n in result.weights], list(result.weights.values()))
    assert log_loss(labels, blend) == pytest.approx(result.log_loss)


def test_a_single_member_gets_all_the_weight():
    labels, probs = members(n=200)
    result = fit_blend_weights(labels, {"a": probs["a"]})
    assert result.weights == {"a": 1.0} and result.gain == pytest.approx(0.0)


def test_average_members_checks_weights():
    with pytest.raises(UsageError, match="non-negative"):
        average_members([np.full((2, 3), 1 / 3)] * 2, [1.0, -1.0])


def test_aligned_oof_refuses_members_scored_on_different_rows():
    probs = np.full((3, 3), 1 / 3)
    store = pl.concat(
        [
            make_oof("x", [1, 2, 3], [0, 0, 0], probs, [0, 1, 2]),
            make_oof("y", [3, 2, 1], [0, 0, 0], probs, [2, 1, 0]),
        ]
    )
    ids, labels, by_name = aligned_oof(store, ["x", "y"])
    assert ids.to_list() == [1, 2, 3] and labels.tolist() == [0, 1, 2] and set(by_name) == {"x", "y"}
    other = pl.concat([store, make_oof("z", [1, 2, 4], [0, 0, 0], probs, [0, 1, 2])])
    with pytest.raises(UsageError, match="not the same rows"):
        aligned_oof(other, ["x", "z"])
    with pytest.raises(UsageError, match="no rows named 'w'"):
        aligned_oof(store, ["x", "w"])
