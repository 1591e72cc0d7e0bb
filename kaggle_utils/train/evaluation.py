"""Bounded evaluation during training and the learning-curve file.

`eval_interval` says when to evaluate, `evaluate_rows` predicts rows over every process, `record_evaluation`
adds an entry to the run's history and `write_learning_curve` rewrites `learning_curve.jsonl` from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kaggle_utils.core.config import TrainConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.metrics import log_loss, row_log_losses
from kaggle_utils.models.classifier import predict_probs
from kaggle_utils.train.checkpointing import TrainState

LEARNING_CURVE_FILE = "learning_curve.jsonl"


def eval_interval(total_steps: int, cfg: TrainConfig) -> int:
    """Optimizer steps between evaluations: `eval_every_steps`, else total / `evals_per_run` (rounded up)."""
    if cfg.eval_every_steps is not None:
        if cfg.eval_every_steps < 1:
            raise UsageError("train.eval_every_steps must be >= 1 (or null: evals_per_run decides)")
        return cfg.eval_every_steps
    if cfg.evals_per_run < 1:
        raise UsageError("train.evals_per_run must be >= 1")
    return max(1, math.ceil(total_steps / cfg.evals_per_run))


def evaluate_rows(
    accelerator: Any,
    model: nn.Module,
    input_ids: list[list[int]],
    pad_token_id: int,
    token_budget: int,
    progress: bool = False,
) -> np.ndarray:
    """(rows, classes) probabilities of `input_ids` by `model`: each process predicts a contiguous share,
    gathered in order, so every process gets all rows."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    share = -(-len(input_ids) // world)
    local = predict_probs(
        accelerator.unwrap_model(model),
        input_ids[rank * share : (rank + 1) * share],
        pad_token_id,
        token_budget=token_budget,
        progress=progress and accelerator.is_main_process,
    )
    if world == 1:
        return local
    return np.concatenate([part for part in gather_object([local]) if len(part)])


def record_evaluation(
    state: TrainState, probs: np.ndarray, labels: np.ndarray, scheduler: Any, wall_time_s: float
) -> None:
    """Append an evaluation to `state.history` (step, training loss since the last entry, held-out loss with
    its standard error, accuracy, lr, tokens, wall time) and restart the training-loss window."""
    rows = row_log_losses(labels, probs)
    state.history.append(
        {
            "step": state.global_step,
            "train_loss": state.loss_sum / max(state.loss_count, 1),
            "eval_loss": log_loss(labels, probs),
            "eval_loss_se": float(rows.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else None,
            "eval_rows": int(len(rows)),
            "eval_accuracy": float((probs.argmax(axis=1) == labels).mean()),
            "lr": float(scheduler.get_last_lr()[0]),
            "tokens_seen": state.tokens_seen,
            "wall_time_s": wall_time_s,
        }
    )
    state.loss_sum, state.loss_count = 0.0, 0


def write_learning_curve(history: list[dict], out_dir: str | Path) -> Path:
    """`learning_curve.jsonl` in the run folder: one JSON line per evaluation (step, train loss over the
    window, held-out loss with its standard error over rows, accuracy, lr, tokens seen, wall time), rewritten
    whole after each evaluation so that a resumed run's file matches its restored history."""
    text = "".join(json.dumps(entry) + "\n" for entry in history)
    return atomic_write_bytes(Path(out_dir) / LEARNING_CURVE_FILE, text.encode("utf-8"))
