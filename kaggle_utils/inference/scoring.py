"""Score labelled rows exactly as `predict` predicts them (the same encoding, schedule and view combination),
without deadline or fallback: cross-validation scores the shipped model with `score_rows`, so CV and the
submission cannot drift apart."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.inference.batch_queue import ScheduleReport
from kaggle_utils.inference.device_forward import make_forward, tokenizer_pad_id
from kaggle_utils.inference.report import InferenceError
from kaggle_utils.inference.schedule import run_schedule
from kaggle_utils.inference.views import ViewPredictions, encode_views, model_probabilities


@dataclass
class ScoredRows:
    """What `score_rows` returns: the final probabilities (what a submission of these rows would hold), each
    view's own probabilities (for studies of the TTA combination) and the throughput."""

    probs: np.ndarray
    views: ViewPredictions
    rows_per_s: float
    schedule: ScheduleReport


def score_rows(
    model: Any,
    tokenizer: Any,
    format_config: Any,
    frame: Any,
    cfg: InferenceConfig,
    device: str | torch.device = "cpu",
    manifest: dict | None = None,
) -> ScoredRows:
    """Predict labelled rows as `predict` would (encoding, forward, `cfg`'s token-budget schedule, views
    combined and calibrated by `manifest`). Raises InferenceError, naming the schedule's first error, when a
    row (or with TTA, one view of a row) was not served: a CV figure with holes would be wrong."""
    sequences, _ = encode_views(frame, tokenizer, format_config, cfg.tta_swap)
    forward = make_forward(model, tokenizer_pad_id(tokenizer), str(device))
    began = time.perf_counter()
    views, schedule = run_schedule(sequences, [forward], cfg, names=[str(device)])
    elapsed = time.perf_counter() - began
    served = views.done.any(axis=0)
    if not served.all():
        first = schedule.errors[0] if schedule.errors else {"message": "no error recorded"}
        raise InferenceError(
            f"scoring left {int((~served).sum())} of {len(served)} rows unpredicted "
            f"(first error: {first.get('type', '')} {first.get('message', '')})"
        )
    if cfg.tta_swap and not views.done.all():
        raise InferenceError(
            f"scoring served only one view of {int((~views.done.all(axis=0)).sum())} rows: "
            "CV must score both TTA views as the submission would"
        )
    probs, _ = model_probabilities(views, manifest)
    rows_per_s = len(served) / elapsed if elapsed > 0 else float("nan")
    return ScoredRows(probs=probs, views=views, rows_per_s=rows_per_s, schedule=schedule)
