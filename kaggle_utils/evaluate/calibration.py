"""Calibration fitted on out-of-fold predictions: temperature scaling, optionally with a per-class bias.

`fit_calibration(labels, probs)` fits it; `apply_calibration(probs, calibration)` is what both CV and
`predict` apply (an ensemble manifest carries it). `plot_reliability` draws the reliability diagram.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import N_CLASSES, log_loss

METHODS: tuple[str, ...] = ("none", "temperature", "temperature+bias")
# Temperatures outside this range mean the fit found nothing to calibrate (or data too small): clipped there.
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class Calibration:
    """log-probabilities / temperature + bias, then softmax; `log_loss_before/after` on the fitted rows."""

    method: str = "none"
    temperature: float = 1.0
    bias: tuple[float, ...] = (0.0, 0.0, 0.0)
    fitted_rows: int = 0
    log_loss_before: float | None = None
    log_loss_after: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"calibration method {self.method!r} is not one of {list(METHODS)}")
        low, high = TEMPERATURE_RANGE
        if not (np.isfinite(self.temperature) and low * (1 - 1e-9) <= self.temperature <= high * (1 + 1e-9)):
            raise UsageError(
                f"calibration.temperature must be a positive number in [{low}, {high}], "
                f"got {self.temperature!r}"
            )
        if len(self.bias) != N_CLASSES or not np.all(np.isfinite(self.bias)):
            raise UsageError(f"calibration bias must be {N_CLASSES} finite numbers, got {self.bias!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bias": list(self.bias)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        """From a manifest's `calibration` (None or absent: none); a malformed one is a UsageError."""
        if data is None or (isinstance(data, dict) and not data):
            return cls()
        if not isinstance(data, dict):
            raise UsageError(
                f"calibration must be a mapping with method, temperature and bias, got "
                f"{type(data).__name__} {data!r}"
            )
        try:
            return cls(
                method=str(data.get("method", "none")),
                temperature=float(data.get("temperature", 1.0)),
                bias=tuple(float(v) for v in data.get("bias", (0.0, 0.0, 0.0))),
                fitted_rows=int(data.get("fitted_rows", 0)),
                log_loss_before=data.get("log_loss_before"),
                log_loss_after=data.get("log_loss_after"),
            )
        except (TypeError, ValueError) as error:
            raise UsageError(f"malformed calibration {data!r}: {error}") from error


def _log_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != N_CLASSES:
        raise ValueError(f"probs must have shape (n, {N_CLASSES}), got {probs.shape}")
    return np.log(np.clip(probs, np.finfo(np.float64).tiny, 1.0))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def apply_calibration(probs: np.ndarray, calibration: Calibration | dict | None) -> np.ndarray:
    """softmax(log p / T + bias) row by row, clipped to [eps, 1 - eps] and renormalised as the metric clips
    (never an exact 0 or 1); the identity (renormalised) for method "none". NaN rows (not served by any model
    pass) stay NaN for the caller's fallback."""
    if not isinstance(calibration, Calibration):
        calibration = Calibration.from_dict(calibration)
    probs = np.asarray(probs, dtype=np.float64)
    if calibration.method == "none":
        return probs / probs.sum(axis=1, keepdims=True)
    logits = _log_probs(probs) / calibration.temperature + np.asarray(calibration.bias)
    eps = np.finfo(np.float64).eps
    calibrated = np.clip(_softmax(logits), eps, 1 - eps)
    return calibrated / calibrated.sum(axis=1, keepdims=True)


def fit_calibration(labels: np.ndarray, probs: np.ndarray, method: str = "temperature") -> Calibration:
    """The temperature (and bias) minimising log loss on these OOF rows. The temperature is fitted as its
    log, so it stays positive; the bias of the tie class is held at 0 (only differences matter)."""
    if method not in METHODS:
        raise UsageError(f"calibration method {method!r} is not one of {list(METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    before = log_loss(labels, probs)  # validates shapes, labels and finiteness
    if method == "none":
        return Calibration(fitted_rows=len(labels), log_loss_before=before, log_loss_after=before)
    logp = _log_probs(probs)
    rows = np.arange(len(labels))
    with_bias = method == "temperature+bias"

    def objective(params: np.ndarray) -> float:
        bias = np.array([params[1], params[2], 0.0]) if with_bias else 0.0
        logits = logp / np.exp(params[0]) + bias
        logits = logits - logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[rows, labels]))

    start = np.zeros(3 if with_bias else 1)
    low, high = np.log(TEMPERATURE_RANGE)
    bounds = [(low, high)] + [(-5.0, 5.0)] * (2 if with_bias else 0)
    result = minimize(objective, start, method="L-BFGS-B", bounds=bounds)
    params = result.x if result.fun <= objective(start) else start  # never worse than doing nothing
    bias = (float(params[1]), float(params[2]), 0.0) if with_bias else (0.0, 0.0, 0.0)
    calibration = Calibration(
        method=method,
        temperature=float(np.exp(params[0])),
        bias=bias,
        fitted_rows=len(labels),
        log_loss_before=before,
    )
    after = log_loss(labels, apply_calibration(probs, calibration))
    return Calibration(**{**asdict(calibration), "log_loss_after": after})


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Top-label confidence bins: rows, mean confidence, accuracy (empty bins left out)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(1.0 / N_CLASSES, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    return [
        {
            "rows": int((index == b).sum()),
            "confidence": float(confidence[index == b].mean()),
            "accuracy": float(correct[index == b].mean()),
        }
        for b in range(n_bins)
        if (index == b).any()
    ]


def plot_reliability(
    labels: np.ndarray,
    probs_by_name: dict[str, np.ndarray],
    path: str | Path,
    title: str = "reliability (top-label confidence)",
) -> Path:
    """One line per prediction set (e.g. before and after calibration), the diagonal is perfect calibration;
    each point's size is its bin's row count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    for name, probs in probs_by_name.items():
        bins = reliability_bins(labels, probs)
        loss = log_loss(labels, probs)
        axis.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            label=f"{name} (log loss {loss:.4f})",
        )
        axis.scatter(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            s=[max(8.0, 400.0 * b["rows"] / len(labels)) for b in bins],
            alpha=0.3,
        )
    axis.set_xlim(1.0 / N_CLASSES - 0.02, 1.0)
    axis.set_ylim(0.0, 1.0)
    axis.set_xlabel("mean top-label confidence in bin")
    axis.set_ylabel("accuracy in bin")
    axis.set_title(title)
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
