"""Combining a row's views into one prediction, and the fallback chain (baseline, class prior, uniform)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from kaggle_utils.inference.views import (
    ViewPredictions,
    class_prior_from_manifest,
    combine_views,
    fallback_predictions,
)


def test_combine_views_averages_the_unswapped_swapped_view():
    probs = np.array(
        [
            [[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]],
            [[0.2, 0.7, 0.1], [0.6, 0.1, 0.3], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]],
        ]
    )
    done = np.array([[True, True, False, False], [True, False, True, False]])
    fallback = np.tile([0.35, 0.34, 0.31], (4, 1))
    final, paths = combine_views(ViewPredictions(probs, done), fallback)
    np.testing.assert_allclose(final[0], [(0.6 + 0.7) / 2, (0.3 + 0.2) / 2, 0.1])
    np.testing.assert_allclose(final[1], [0.5, 0.2, 0.3])
    np.testing.assert_allclose(final[2], [0.5, 0.1, 0.4])
    np.testing.assert_allclose(final[3], [0.35, 0.34, 0.31])
    assert paths.tolist() == ["tta", "original_only", "swapped_only", "fallback"]


def test_class_prior_and_fallback_chain(tmp_path):
    assert class_prior_from_manifest({"class_prior": [2, 1, 1]}).tolist() == [0.5, 0.25, 0.25]
    named = {"class_prior": {"winner_model_a": 0.4, "winner_model_b": 0.4, "winner_tie": 0.2}}
    assert class_prior_from_manifest(named).tolist() == pytest.approx([0.4, 0.4, 0.2])
    assert class_prior_from_manifest({"class_prior": {"a": 1, "b": 1, "tie": 2}})[2] == 0.5
    for bad in ({}, {"class_prior": [1, 2]}, {"class_prior": [1, -1, 1]}, {"class_prior": "x"}, None):
        assert class_prior_from_manifest(bad) is None
    frame = pl.DataFrame({"id": [1, 2]})
    probs, source, errors = fallback_predictions(
        frame, 2, tmp_path / "missing.joblib", {"class_prior": [1, 1, 2]}
    )
    assert source == "class prior from manifest" and probs.tolist() == [[0.25, 0.25, 0.5]] * 2
    assert errors and errors[0]["where"] == "fallback baseline"
    probs, source, _ = fallback_predictions(None, 3, None, None)
    assert source == "uniform" and probs.shape == (3, 3)
