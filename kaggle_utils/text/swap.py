"""The A/B swap of rows, labels and probabilities, and swap-TTA averaging of the two views."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl


def swap_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The A/B-swapped copy: every ``<stem>_a`` / ``<stem>_b`` column pair exchanged, label 0<->1, tie stays.

    Covers response_a/b and model_a/b (and winner_model_a/b in raw frames). Swapping twice is the identity.
    """
    exprs: list[pl.Expr] = []
    for name in frame.columns:
        if name.endswith("_a") and f"{name[:-2]}_b" in frame.columns:
            partner = f"{name[:-2]}_b"
            exprs += [pl.col(partner).alias(name), pl.col(name).alias(partner)]
    if "label" in frame.columns:
        label = pl.col("label")
        exprs.append(
            pl.when(label == 0)
            .then(1)
            .when(label == 1)
            .then(0)
            .otherwise(label)
            .cast(frame["label"].dtype)
            .alias("label")
        )
    return frame.with_columns(exprs) if exprs else frame


def swap_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    """Class indices with A (0) and B (1) exchanged; tie (2) and anything else unchanged."""
    array = np.asarray(labels)
    swapped = array.copy()
    swapped[array == 0] = 1
    swapped[array == 1] = 0
    return swapped


def swap_probs(probs: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Probability columns (A, B, tie) -> (B, A, tie): a prediction on a swapped row, mapped back (or forth).

    Also accepts two columns (A, B) for the binary WSDM variant. Swapping twice is the identity.
    """
    array = np.asarray(probs)
    if array.ndim == 0 or array.shape[-1] not in (2, 3):
        raise ValueError(f"swap_probs expects (..., 3) or (..., 2) probabilities, got shape {array.shape}")
    order = [1, 0, 2] if array.shape[-1] == 3 else [1, 0]
    return array[..., order]


TTA_SPACES: tuple[str, ...] = ("prob", "logit")


def average_views(original: np.ndarray, swapped_view: np.ndarray, space: str = "prob") -> np.ndarray:
    """Swap TTA: the original view and the swapped view (in the swapped row's column order) averaged, rows
    summing to one. `space` "prob": arithmetic mean; "logit": renormalised geometric mean (chosen on OOF)."""
    original = np.asarray(original, dtype=np.float64)
    unswapped = swap_probs(np.asarray(swapped_view, dtype=np.float64))
    if space == "prob":
        mean = (original + unswapped) / 2.0
    elif space == "logit":
        tiny = np.finfo(np.float64).tiny
        logs = (np.log(np.maximum(original, tiny)) + np.log(np.maximum(unswapped, tiny))) / 2.0
        mean = np.exp(logs - logs.max(axis=-1, keepdims=True))
    else:
        raise ValueError(f"TTA space must be one of {TTA_SPACES}, got {space!r}")
    return mean / mean.sum(axis=-1, keepdims=True)
