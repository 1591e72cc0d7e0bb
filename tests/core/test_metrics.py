"""Kaggle log loss (eps=auto) against scikit-learn, the constant references, and the OOF store."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import log_loss as sklearn_log_loss

from kaggle_utils.core.errors import DataError
from kaggle_utils.core.metrics import (
    OOF_COLUMNS,
    class_prior,
    load_oof,
    log_loss,
    make_oof,
    prior_log_loss,
    save_oof,
    score_oof,
    uniform_log_loss,
)


def sklearn_reference(labels, probs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when rows do not sum to one
        return sklearn_log_loss(labels, probs, labels=[0, 1, 2])


@pytest.mark.parametrize("seed", range(5))
def test_equals_sklearn_on_random_probability_rows(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 500))
    probs = rng.dirichlet(rng.uniform(0.2, 3.0, size=3), size=n)
    labels = rng.integers(0, 3, size=n)
    assert log_loss(labels, probs) == pytest.approx(sklearn_reference(labels, probs), rel=1e-12, abs=1e-15)


def test_equals_sklearn_with_exact_zeros_and_ones():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=300)
    one_hot = np.eye(3)[rng.integers(0, 3, size=300)]  # confident, often wrong: clipping decides the value
    mixed = np.vstack([one_hot[:100], rng.dirichlet([1, 1, 1], size=200)])
    mixed[100:150, 0] = 0.0
    mixed[100:150] /= mixed[100:150].sum(axis=1, keepdims=True)
    for probs in (one_hot, mixed):
        ours = log_loss(labels, probs)
        assert np.isfinite(ours)
        assert ours == pytest.approx(sklearn_reference(labels, probs), rel=1e-12)
    assert log_loss(np.array([0]), np.array([[0.0, 1.0, 0.0]])) == pytest.approx(
        -np.log(np.finfo(float).eps), rel=1e-9
    )


def test_rows_not_summing_to_one_are_renormalised_like_kaggle():
    """sklearn >= 1.5 only warns and scores unnormalised rows as given; Kaggle's eps=auto renormalises."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=400)
    raw = rng.uniform(0.01, 1.0, size=(400, 3))
    ours = log_loss(labels, raw)
    assert ours == pytest.approx(sklearn_reference(labels, raw / raw.sum(axis=1, keepdims=True)), rel=1e-12)
    assert abs(ours - sklearn_reference(labels, raw)) > 1e-3  # the raw sklearn value is not Kaggle's score
    assert log_loss(labels, raw * 0.9) == pytest.approx(ours, rel=1e-12)  # scale-free per row


def test_exact_zero_in_an_unnormalised_row_is_clipped_before_renormalising():
    """eps=auto order (scikit-learn < 1.5, as Kaggle's metric): clip first, then divide by the sum."""
    eps = np.finfo(np.float64).eps
    row = np.array([[0.7, 0.6, 0.0]])
    expected = -np.log(eps / (0.7 + 0.6 + eps))
    assert log_loss(np.array([2]), row) == pytest.approx(expected, rel=1e-12)
    assert log_loss(np.array([0]), row) == pytest.approx(-np.log(0.7 / (1.3 + eps)), rel=1e-12)


def test_float32_input_uses_float32_epsilon_like_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=200)
    probs = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=200)]
    assert log_loss(labels, probs) == pytest.approx(sklearn_reference(labels, probs), rel=1e-6)
    assert log_loss(labels, probs) < 17  # -log(float32 eps) ~ 15.9, far below float64's 36


def test_rejects_bad_shapes_labels_and_non_finite_values():
    with pytest.raises(ValueError, match="shape"):
        log_loss(np.array([0, 1]), np.ones((2, 2)))
    with pytest.raises(ValueError, match="labels"):
        log_loss(np.array([0, 3]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="NaN"):
        log_loss(np.array([0, 1]), np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]]))


def test_reference_losses():
    labels = np.array([0] * 35 + [1] * 34 + [2] * 31)
    prior = class_prior(labels)
    assert prior == pytest.approx([0.35, 0.34, 0.31])
    assert prior_log_loss(labels) == pytest.approx(-(prior * np.log(prior)).sum(), rel=1e-12)
    assert uniform_log_loss() == pytest.approx(np.log(3)) == pytest.approx(1.0986, abs=1e-4)
    assert prior_log_loss(labels) < uniform_log_loss()
    assert prior_log_loss(labels, np.full(3, 1 / 3)) == pytest.approx(np.log(3))


def _oof(name: str, n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = pl.Series(np.arange(n, dtype=np.int64) + 500)
    folds = np.arange(n) % 3
    probs = rng.dirichlet([2, 2, 2], size=n)
    labels = rng.integers(0, 3, size=n)
    return make_oof(name, ids, folds, probs, labels), probs, labels, folds


def test_oof_round_trip_scores_per_fold_and_keeps_other_names(tmp_path):
    path = tmp_path / "oof.parquet"
    first, probs, labels, folds = _oof("baseline")
    second, *_ = _oof("gemma", seed=1)
    save_oof(first, path)
    save_oof(second, path)
    stored = load_oof(path)
    assert stored.columns == list(OOF_COLUMNS)
    assert sorted(stored["name"].unique().to_list()) == ["baseline", "gemma"]
    assert load_oof(path, name="baseline").equals(first)

    score = score_oof(stored, name="baseline")
    assert score.log_loss == pytest.approx(log_loss(labels, probs))
    assert set(score.per_fold) == {0, 1, 2}
    assert score.per_fold[1] == pytest.approx(log_loss(labels[folds == 1], probs[folds == 1]))
    assert score.uniform_log_loss == pytest.approx(np.log(3))

    replaced, *_ = _oof("baseline", seed=5)
    save_oof(replaced, path)  # same name again: replaces, does not duplicate
    assert load_oof(path).height == 120
    assert load_oof(path, name="baseline").equals(replaced)
    with pytest.raises(ValueError, match="exactly one name"):
        score_oof(load_oof(path))


def test_oof_written_fold_by_fold_keeps_every_fold(tmp_path):
    """compare writes each fold's table under the same name: all folds must survive, not only the last."""
    path = tmp_path / "oof.parquet"
    whole, *_ = _oof("gemma/seed1/quantized", n=30)
    for _key, part in sorted(whole.partition_by("fold", as_dict=True).items()):
        save_oof(part, path)
    stored = load_oof(path, name="gemma/seed1/quantized")
    assert stored.height == 30 and sorted(stored["fold"].unique().to_list()) == [0, 1, 2]
    assert stored.sort("id").equals(whole.sort("id"))
    # Rewriting one fold replaces that fold only.
    again = whole.filter(pl.col("fold") == 1).with_columns(p_a=pl.col("p_a") * 0.5)
    save_oof(again, path)
    stored = load_oof(path, name="gemma/seed1/quantized")
    assert stored.height == 30
    assert stored.filter(pl.col("fold") == 1).sort("id")["p_a"].to_list() == again.sort("id")["p_a"].to_list()
    # The same id under one name in two folds is refused: a row is held out once.
    moved = whole.filter(pl.col("fold") == 1).with_columns(fold=pl.lit(7, dtype=pl.Int32))
    with pytest.raises(DataError, match="share a"):
        save_oof(moved, path)
    # replace="name": a whole run written at once drops the name's folds a previous run left behind.
    save_oof(whole.filter(pl.col("fold") == 0), path, replace="name")
    assert sorted(load_oof(path)["fold"].unique().to_list()) == [0]


def test_oof_checks_reject_bad_tables(tmp_path):
    oof, *_ = _oof("baseline")
    with pytest.raises(DataError, match="non-finite or negative"):
        save_oof(
            oof.with_columns(p_a=pl.when(pl.col("id") == 501).then(float("nan")).otherwise(pl.col("p_a"))),
            tmp_path / "x.parquet",
        )
    with pytest.raises(DataError, match="share a"):
        save_oof(pl.concat([oof, oof.head(2)]), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="missing columns"):
        save_oof(oof.drop("fold"), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no OOF rows named"):
        save_oof(oof, tmp_path / "ok.parquet")
        load_oof(tmp_path / "ok.parquet", name="other")
