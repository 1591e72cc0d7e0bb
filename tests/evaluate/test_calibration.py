"""Calibration on OOF predictions: temperature (and bias) recovered, never worse in-sample, applied the same
way by CV and predict, and the reliability diagram."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import log_loss
from kaggle_utils.evaluate.calibration import (
    Calibration,
    apply_calibration,
    fit_calibration,
    plot_reliability,
    reliability_bins,
)


def synthetic(n: int = 4000, temperature: float = 2.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated probabilities, then the probabilities made over-confident by 1/T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, size=(n, 3))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in true])
    sharp = np.exp(logits * temperature)
    return labels, sharp / sharp.sum(axis=1, keepdims=True)


def test_temperature_scaling_recovers_the_over_confidence():
    labels, probs = synthetic(temperature=2.5)
    fitted = fit_calibration(labels, probs, "temperature")
    assert fitted.temperature == pytest.approx(2.5, rel=0.1)
    assert fitted.log_loss_after < fitted.log_loss_before - 0.05
    assert fitted.log_loss_after == pytest.approx(log_loss(labels, apply_calibration(probs, fitted)))


def test_bias_corrects_a_shifted_class():
    labels, probs = synthetic(temperature=1.0, seed=1)
    shifted = probs * np.array([3.0, 1.0, 1.0])
    shifted /= shifted.sum(axis=1, keepdims=True)
    temperature_only = fit_calibration(labels, shifted, "temperature")
    with_bias = fit_calibration(labels, shifted, "temperature+bias")
    assert with_bias.log_loss_after < temperature_only.log_loss_after - 0.01
    assert with_bias.bias[0] < -0.5  # pulls class A back down (log 3 = 1.1)


@pytest.mark.parametrize("method", ["temperature", "temperature+bias"])
def test_calibration_never_worsens_the_rows_it_was_fitted_on(method):
    labels, probs = synthetic(n=300, temperature=1.0, seed=2)  # already calibrated: little to gain
    fitted = fit_calibration(labels, probs, method)
    assert fitted.log_loss_after <= fitted.log_loss_before + 1e-9


def test_none_is_the_identity_and_nan_rows_stay_nan():
    labels, probs = synthetic(n=50)
    np.testing.assert_allclose(apply_calibration(probs, None), probs)
    np.testing.assert_allclose(apply_calibration(probs, Calibration()), probs)
    assert fit_calibration(labels, probs, "none").temperature == 1.0


def test_manifest_round_trip_and_bad_values():
    labels, probs = synthetic(n=200)
    fitted = fit_calibration(labels, probs, "temperature+bias")
    assert Calibration.from_dict(fitted.to_dict()) == fitted
    with pytest.raises(UsageError, match="method 'platt'"):
        Calibration(method="platt")
    with pytest.raises(UsageError, match="positive"):
        Calibration.from_dict({"method": "temperature", "temperature": -1})
    with pytest.raises(UsageError, match="malformed calibration"):
        Calibration.from_dict({"method": "temperature", "temperature": "hot"})


def test_reliability_diagram_is_written(tmp_path):
    labels, probs = synthetic(n=500)
    bins = reliability_bins(labels, probs)
    assert sum(b["rows"] for b in bins) == 500
    # over-confident: in the top bins accuracy lies below confidence
    assert bins[-1]["accuracy"] < bins[-1]["confidence"]
    fitted = fit_calibration(labels, probs)
    path = plot_reliability(
        labels, {"before": probs, "after": apply_calibration(probs, fitted)}, tmp_path / "reliability.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("given", [[1.2, 0.0], "temperature", 3])
def test_a_calibration_that_is_not_a_mapping_names_the_field(given):
    with pytest.raises(UsageError, match=r"^calibration must be a mapping with method, temperature and bias"):
        Calibration.from_dict(given)


@pytest.mark.parametrize("temperature", [1e-300, 0.01, 25.0, float("inf")])
def test_a_temperature_outside_its_range_is_refused(temperature):
    with pytest.raises(
        UsageError, match=r"calibration.temperature must be a positive number in \[0.05, 20.0\]"
    ):
        Calibration.from_dict({"method": "temperature", "temperature": temperature})


def test_calibrated_probabilities_are_clipped_as_the_metric_clips():
    probs = np.array([[0.999999, 0.0000005, 0.0000005], [0.2, 0.3, 0.5]])
    out = apply_calibration(probs, Calibration(method="temperature", temperature=0.05))
    eps = np.finfo(np.float64).eps
    assert np.all(out > 0) and np.all(out < 1) and out.min() >= eps * 0.5
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
