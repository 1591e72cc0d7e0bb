"""Fitting QiD against training tokens D: the power law QiD ~ D^beta and a sign-agnostic trend, bootstrapped.

`bootstrap_fit(labels, tokens, probs_16bit, probs_quantized)` and `bootstrap_trend(...)` take arrays indexed
[checkpoint, row, class]; `answer_text(fits, trends)` states the result. Method: docs/DESIGN_NOTES.md,
"studies/qid.py".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kaggle_utils.core.metrics import log_loss, row_log_losses

PAPER_BETA = 0.5251  # QiD ~ D^0.5251 (arXiv 2411.17691, GPTQ on Pythia)
MIN_IDENTIFIABLE = 0.9  # share of bootstrap resamples whose QiDs are all > 0
SCHEME_LABELS = {"int8": "8-bit (LLM.int8)", "nf4": "4-bit (NF4)"}


def qid(labels: np.ndarray, probs_16bit: np.ndarray, probs_quantized: np.ndarray) -> float:
    """QiD = log_loss(quantized) - log_loss(16-bit), both with the competition's log loss."""
    return log_loss(labels, probs_quantized) - log_loss(labels, probs_16bit)


@dataclass
class PowerLawFit:
    """log QiD = intercept + beta log D, with a bootstrap percentile interval for beta."""

    beta: float | None
    intercept: float | None
    ci_low: float | None
    ci_high: float | None
    n_points: int
    n_bootstrap: int
    identifiable_share: float  # resamples whose QiDs were all > 0
    identifiable: bool
    reason: str = ""

    def describe(self) -> str:
        if not self.identifiable:
            return f"beta not identifiable ({self.reason})"
        return f"beta = {self.beta:.3f} (95% bootstrap CI {self.ci_low:.3f} .. {self.ci_high:.3f})"


def fit_log_log(tokens: np.ndarray, qids: np.ndarray) -> tuple[float, float] | None:
    """(beta, intercept) of the least-squares line through (log D, log QiD); None if a QiD <= 0."""
    tokens, qids = np.asarray(tokens, dtype=np.float64), np.asarray(qids, dtype=np.float64)
    if len(tokens) < 2 or np.any(qids <= 0) or len(np.unique(tokens)) < 2:
        return None
    beta, intercept = np.polyfit(np.log(tokens), np.log(qids), 1)
    return float(beta), float(intercept)


def _resamples(groups: np.ndarray, n_rows: int, n_bootstrap: int, seed: int):
    """Yield (checkpoint indices, row indices) per resample: training seeds drawn with replacement (a single
    seed kept as it is) and held-out rows drawn with replacement, the same rows for every checkpoint and both
    models (paired)."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, len(members), len(members)) if len(members) > 1 else np.zeros(1, dtype=int)
        yield np.concatenate([members[i] for i in drawn]), rng.integers(0, n_rows, n_rows)


def _loss_gap(labels: np.ndarray, probs_16bit: np.ndarray, probs_quantized: np.ndarray) -> np.ndarray:
    """(checkpoints, rows) per-row log loss of the quantized minus the 16-bit model."""
    return np.stack([row_log_losses(labels, p) for p in probs_quantized]) - np.stack(
        [row_log_losses(labels, p) for p in probs_16bit]
    )


def bootstrap_fit(
    labels: np.ndarray,
    tokens: np.ndarray,
    probs_16bit: np.ndarray,
    probs_quantized: np.ndarray,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> PowerLawFit:
    """Fit QiD ~ D^beta on checkpoints k (arrays indexed [k, row, class]) with a bootstrap interval.

    `labels` (n,) are the held-out labels shared by all checkpoints; `groups` (k,) the training seed of each
    checkpoint (None: one run), resampled together with the rows (see `_resamples`).
    """
    gap = _loss_gap(labels, probs_16bit, probs_quantized)
    tokens = np.asarray(tokens, dtype=np.float64)
    groups = np.zeros(len(tokens), dtype=int) if groups is None else np.asarray(groups)
    point_qid = gap.mean(axis=1)
    point = fit_log_log(tokens, point_qid)
    betas = []
    for checkpoints, rows in _resamples(groups, gap.shape[1], n_bootstrap, seed):
        fitted = fit_log_log(tokens[checkpoints], gap[np.ix_(checkpoints, rows)].mean(axis=1))
        if fitted is not None:
            betas.append(fitted[0])
    share = len(betas) / n_bootstrap if n_bootstrap else 0.0
    if point is None:
        negatives = int(np.sum(point_qid <= 0))
        return PowerLawFit(
            None,
            None,
            None,
            None,
            len(tokens),
            n_bootstrap,
            share,
            False,
            f"{negatives} of {len(tokens)} checkpoints have QiD <= 0: no power law to fit",
        )
    low, high = np.percentile(betas, [2.5, 97.5]).tolist() if betas else (math.nan, math.nan)
    identifiable = share >= MIN_IDENTIFIABLE
    reason = (
        ""
        if identifiable
        else (f"only {share:.0%} of bootstrap resamples have every QiD > 0 (QiD within noise of zero)")
    )
    return PowerLawFit(
        point[0], point[1], float(low), float(high), len(tokens), n_bootstrap, share, identifiable, reason
    )


@dataclass
class TrendFit:
    """Sign-agnostic view: QiD = a + slope * log10(D) (defined even when some QiD <= 0), and the mean QiD."""

    slope_per_decade: float
    slope_ci: tuple[float, float]
    mean_qid: float
    mean_qid_ci: tuple[float, float]

    def describe(self) -> str:
        return (
            f"QiD changes by {self.slope_per_decade:+.5f} per 10x tokens (95% CI {self.slope_ci[0]:+.5f} .. "
            f"{self.slope_ci[1]:+.5f}); mean QiD {self.mean_qid:+.5f} ({self.mean_qid_ci[0]:+.5f} .. "
            f"{self.mean_qid_ci[1]:+.5f})"
        )


def bootstrap_trend(
    labels: np.ndarray,
    tokens: np.ndarray,
    probs_16bit: np.ndarray,
    probs_quantized: np.ndarray,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> TrendFit:
    """Least-squares slope of QiD on log10(D) and the mean QiD, with seed-and-row bootstrap intervals."""
    gap = _loss_gap(labels, probs_16bit, probs_quantized)
    x = np.log10(np.asarray(tokens, dtype=np.float64))
    groups = np.zeros(len(x), dtype=int) if groups is None else np.asarray(groups)

    def slope(xs: np.ndarray, qids: np.ndarray) -> float:
        return float(np.polyfit(xs, qids, 1)[0]) if len(np.unique(xs)) > 1 else math.nan

    point = gap.mean(axis=1)
    slopes, means = [], []
    for checkpoints, rows in _resamples(groups, gap.shape[1], n_bootstrap, seed):
        resampled = gap[np.ix_(checkpoints, rows)].mean(axis=1)
        slopes.append(slope(x[checkpoints], resampled))
        means.append(float(resampled.mean()))
    low_s, high_s = np.nanpercentile(slopes, [2.5, 97.5])
    low_m, high_m = np.percentile(means, [2.5, 97.5])
    return TrendFit(
        slope(x, point), (float(low_s), float(high_s)), float(point.mean()), (float(low_m), float(high_m))
    )


def answer_text(fits: dict[str, PowerLawFit], trends: dict[str, TrendFit]) -> str:
    """One sentence per scheme: the fitted exponent (or why there is none) and the sign-agnostic trend."""
    parts = []
    for scheme, fit in fits.items():
        label = SCHEME_LABELS.get(scheme, scheme)
        trend = trends[scheme]
        low, high = trend.slope_ci
        direction = (
            "QiD grows with training tokens"
            if low > 0
            else "QiD shrinks with training tokens"
            if high < 0
            else "no trend of QiD with training tokens beyond seed and evaluation noise"
        )
        if not fit.identifiable:
            parts.append(f"{label}: {fit.describe()}; {direction} ({trend.describe()}).")
            continue
        if fit.ci_low <= PAPER_BETA <= fit.ci_high:
            verdict = f"consistent with the paper's {PAPER_BETA:.2f}"
        elif fit.ci_high < PAPER_BETA:
            verdict = f"below the paper's {PAPER_BETA:.2f}"
        else:
            verdict = f"above the paper's {PAPER_BETA:.2f}"
        parts.append(f"{label}: {fit.describe()}, {verdict}; {direction} ({trend.describe()}).")
    return " ".join(parts)
