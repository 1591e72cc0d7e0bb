"""A row's views (its original A/B order and, with TTA, the swapped one), how they combine into one
prediction, and the fallback prediction for rows no view served.

    sequences, encoding = encode_views(frame, tokenizer, format_config, tta_swap=True)
    probs, paths = model_probabilities(views, manifest)  # NaN where no view served the row
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.evaluate.calibration import apply_calibration
from kaggle_utils.inference.device_forward import describe_error
from kaggle_utils.text.encode import encode_both_orders, encode_rows
from kaggle_utils.text.swap import average_views, swap_probs
from kaggle_utils.train.baseline import BaselineModel

logger = logging.getLogger(__name__)

VIEW_NAMES: tuple[str, ...] = ("original", "swapped")
ORIGINAL, SWAPPED = 0, 1
# How each row's final prediction was made (the report counts rows per path).
PATH_TTA, PATH_ORIGINAL, PATH_SWAPPED, PATH_FALLBACK = "tta", "original_only", "swapped_only", "fallback"


@dataclass
class ViewPredictions:
    """(views, rows, 3) probabilities in each view's own column order; `done` marks the rows served."""

    probs: np.ndarray
    done: np.ndarray


def encode_views(
    frame: Any, tokenizer: Any, format_config: Any, tta_swap: bool
) -> tuple[list[list[list[int]]], Any]:
    """The token sequences of every view (original, and the A/B-swapped one with TTA) and the original view's
    encoding (its `summary()` goes in reports): the one place both CV and `predict` format rows."""
    if tta_swap:
        original, swapped = encode_both_orders(frame, tokenizer, format_config)
        return [original.input_ids, swapped.input_ids], original
    original = encode_rows(frame, tokenizer, format_config)
    return [original.input_ids], original


def combine_views(
    views: ViewPredictions, fallback: np.ndarray, tta_space: str = "prob"
) -> tuple[np.ndarray, np.ndarray]:
    """Final (n, 3) probabilities and each row's path: both views averaged where both ran
    (`text.swap.average_views` in `tta_space`), the one view that ran, else the fallback row."""

    probs, done = views.probs, views.done
    has_original = done[ORIGINAL]
    has_swapped = done[SWAPPED] if len(done) > 1 else np.zeros_like(has_original)
    final = np.array(fallback, dtype=np.float64, copy=True)
    paths = np.full(len(final), PATH_FALLBACK, dtype=object)
    final[has_original] = probs[ORIGINAL, has_original]
    paths[has_original] = PATH_ORIGINAL
    if len(done) > 1:
        unswapped = swap_probs(probs[SWAPPED])  # read back in the original order
        only_swapped = has_swapped & ~has_original
        both = has_swapped & has_original
        final[only_swapped] = unswapped[only_swapped]
        paths[only_swapped] = PATH_SWAPPED
        final[both] = average_views(probs[ORIGINAL, both], probs[SWAPPED, both], tta_space)
        paths[both] = PATH_TTA
    return final, paths


def model_probabilities(views: ViewPredictions, manifest: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """What a model artifact predicts: its views combined in the manifest's `tta_space` (default "prob"), then
    its `calibration`; rows no view served are NaN. `predict`, ensemble members and `score_rows` all go
    through here, so a step added to a manifest changes CV and the submission together."""
    manifest = manifest or {}
    probs, paths = combine_views(
        views,
        np.full((views.probs.shape[1], len(LABEL_COLUMNS)), np.nan),
        str(manifest.get("tta_space") or "prob"),
    )
    return calibrate_served(probs, manifest.get("calibration")), paths


def calibrate_served(probs: np.ndarray, calibration: dict | None) -> np.ndarray:
    """`calibration.apply_calibration` on the rows that have a prediction; NaN rows stay NaN."""
    if not calibration:
        return probs
    served = np.all(np.isfinite(probs), axis=1)
    out = probs.copy()
    if served.any():
        out[served] = apply_calibration(probs[served], calibration)
    return out


def class_prior_from_manifest(manifest: dict | None) -> np.ndarray | None:
    """`class_prior` in the manifest as [a, b, tie] or {winner_model_a|a: ..}; None if absent or unusable."""
    raw = (manifest or {}).get("class_prior")
    if raw is None:
        return None
    if isinstance(raw, dict):
        keys = [
            (column, column.removeprefix("winner_model_").removeprefix("winner_")) for column in LABEL_COLUMNS
        ]
        values = [raw.get(full, raw.get(short)) for full, short in keys]
    else:
        values = list(raw)
    try:
        prior = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if (
        prior.shape != (len(LABEL_COLUMNS),)
        or not np.all(np.isfinite(prior))
        or np.any(prior < 0)
        or prior.sum() <= 0
    ):
        return None
    return prior / prior.sum()


def fallback_predictions(
    frame: Any, n_rows: int, baseline_path: str | Path | None, manifest: dict | None
) -> tuple[np.ndarray, str, list[dict]]:
    """The cheap prediction for rows no model pass served: baseline model, else class prior, else uniform.
    Returns (probs (n, 3), source name, errors met on the way); never raises."""
    errors: list[dict] = []
    if baseline_path is not None and frame is not None:
        try:
            probs = np.asarray(BaselineModel.load(baseline_path).predict_proba(frame), dtype=np.float64)
            if probs.shape != (n_rows, len(LABEL_COLUMNS)) or not np.all(np.isfinite(probs)):
                raise ValueError(
                    f"baseline returned shape {probs.shape} (or non-finite values) for {n_rows} rows"
                )
            return probs, f"baseline model {baseline_path}", errors
        except Exception as error:  # the baseline is an optional helper: fall through to the prior
            errors.append({"where": "fallback baseline", **describe_error(error)})
            logger.error("fallback baseline %s unusable (%r); using the class prior", baseline_path, error)
    prior = class_prior_from_manifest(manifest)
    if prior is not None:
        return np.tile(prior, (n_rows, 1)), "class prior from manifest", errors
    uniform = np.full(len(LABEL_COLUMNS), 1.0 / len(LABEL_COLUMNS))
    return np.tile(uniform, (n_rows, 1)), "uniform", errors
