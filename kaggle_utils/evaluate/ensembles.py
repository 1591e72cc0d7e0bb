"""Blend weights fitted on out-of-fold predictions, and the OOF tables lined up to fit them.

A blend is the weighted mean of its members' probabilities (`blend_members`, in CV and in `predict`), with
non-negative weights summing to one fitted by `fit_blend_weights(labels, {name: probs})` to minimise OOF log
loss; a fold or seed ensemble is the same with equal weights (`average_members`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.optimize import minimize

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import N_CLASSES, PROB_COLUMNS, log_loss, row_log_losses


@dataclass
class BlendResult:
    """The fitted weights (name -> weight), the blend's OOF log loss (in-sample: the rows it was fitted on),
    the best single member's, and the gain with its paired standard error."""

    weights: dict[str, float]
    log_loss: float
    best_member: str
    best_member_log_loss: float
    gain: float
    gain_standard_error: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def average_members(member_probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted (default: equal) mean of (n, 3) probabilities: a fold ensemble, a seed ensemble."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    w = (
        np.full(len(stacked), 1.0 / len(stacked))
        if weights is None
        else np.asarray(weights, dtype=np.float64)
    )
    if w.shape != (len(stacked),) or np.any(w < 0) or w.sum() <= 0:
        raise UsageError(f"weights must be {len(stacked)} non-negative numbers with a positive sum, got {w}")
    return np.einsum("m,mrc->rc", w / w.sum(), stacked)


def fit_blend_weights(labels: np.ndarray, member_probs: dict[str, np.ndarray]) -> BlendResult:
    """Non-negative weights summing to one that minimise the blend's log loss on these rows."""
    if not member_probs:
        raise UsageError("a blend needs at least one member")
    names = list(member_probs)
    labels = np.asarray(labels, dtype=np.int64)
    stacked = np.stack([np.asarray(member_probs[n], dtype=np.float64) for n in names])
    if stacked.shape[1:] != (len(labels), N_CLASSES):
        raise UsageError(
            f"every member needs ({len(labels)}, {N_CLASSES}) probabilities, got {stacked.shape[1:]}"
        )
    picked = np.clip(stacked[:, np.arange(len(labels)), labels], 1e-15, 1.0)  # (members, rows)

    def weights_of(params: np.ndarray) -> np.ndarray:
        shifted = np.exp(params - params.max())
        return shifted / shifted.sum()

    def objective(params: np.ndarray) -> float:
        return float(-np.mean(np.log(weights_of(params) @ picked)))

    start = np.zeros(len(names))
    result = minimize(objective, start, method="L-BFGS-B") if len(names) > 1 else None
    weights = weights_of(result.x if result is not None and result.fun <= objective(start) else start)
    weights[weights < 1e-4] = 0.0  # a member that adds nothing is dropped, not kept at 1e-9
    weights = weights / weights.sum()
    blend = np.einsum("m,mrc->rc", weights, stacked)
    singles = {n: log_loss(labels, stacked[i]) for i, n in enumerate(names)}
    best = min(singles, key=singles.get)
    diff = row_log_losses(labels, stacked[names.index(best)]) - row_log_losses(labels, blend)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    return BlendResult(
        weights={n: float(w) for n, w in zip(names, weights, strict=True)},
        log_loss=log_loss(labels, blend),
        best_member=best,
        best_member_log_loss=singles[best],
        gain=float(diff.mean()),
        gain_standard_error=se,
    )


def aligned_oof(
    oof: pl.DataFrame, names: Sequence[str]
) -> tuple[pl.Series, np.ndarray, dict[str, np.ndarray]]:
    """(ids, labels, name -> probs) for the OOF store's `names` on the same rows in the same order. Members
    scored on different rows cannot be blended or compared: a UsageError lists what differs."""
    tables = {}
    for name in names:
        part = oof.filter(pl.col("name") == name).sort("id")
        if part.height == 0:
            raise UsageError(f"OOF store has no rows named {name!r}; it has {sorted(oof['name'].unique())}")
        if part["id"].is_duplicated().any():
            raise UsageError(f"OOF rows of {name!r} repeat ids: one prediction per row is needed")
        tables[name] = part
    first = next(iter(tables.values()))
    for name, part in tables.items():
        if part["id"].to_list() != first["id"].to_list():
            missing = set(first["id"].to_list()) ^ set(part["id"].to_list())
            raise UsageError(
                f"OOF rows of {name!r} and {names[0]!r} are not the same rows ({len(missing)} ids "
                f"differ, e.g. {sorted(missing, key=str)[:5]}): score members on identical folds"
            )
        if part["label"].to_list() != first["label"].to_list():
            raise UsageError(f"OOF labels of {name!r} and {names[0]!r} differ on the same ids")
    probs = {name: part.select(PROB_COLUMNS).to_numpy().astype(np.float64) for name, part in tables.items()}
    return first["id"], first["label"].to_numpy().astype(np.int64), probs


@dataclass
class BlendedRows:
    """(n, 3) weighted mean over the members that served each row (NaN where none did) and how many did."""

    probs: np.ndarray
    members_served: np.ndarray
    n_members: int


def blend_members(member_probs: Sequence[np.ndarray], weights: Sequence[float]) -> BlendedRows:
    """Weighted mean per row over the members whose row is finite (served); weights renormalised per row.
    Weights are finite and >= 0 (`ensemble_members`); they are divided by their largest first, so huge or tiny
    ones (1e308, 1e-320) neither overflow nor lose their ratio."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    served = np.all(np.isfinite(stacked), axis=2)
    scaled = np.asarray(weights, dtype=np.float64)
    if scaled.size and scaled.max() > 0:
        scaled = scaled / scaled.max()
    w = scaled[:, None] * served
    total = w.sum(axis=0)
    blended = np.einsum("mr,mrc->rc", w, np.where(served[:, :, None], stacked, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        blended = blended / total[:, None]
    blended[total <= 0] = np.nan
    return BlendedRows(
        probs=blended,
        members_served=(served & (np.asarray(weights)[:, None] > 0)).sum(axis=0),
        n_members=int((np.asarray(weights) > 0).sum()),
    )
