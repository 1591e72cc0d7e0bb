"""What a fold's training reports: `TrainResult` (returned by `train_fold`), `StepInfo` (what `on_step`
callbacks see after each optimizer step) and `PeakMemory` (peak CPU/CUDA memory over a block)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class TrainResult:
    """What one fold's training produced. `model` holds the weights that ship (`TrainConfig.selection`)."""

    model: nn.Module
    fold: int
    ordering: str
    best_step: int  # the step whose weights ship: the last ("final") or the inner holdout's best ("inner")
    best_eval_loss: float  # loss on the evaluation set (`eval_set`) at best_step; nan if not evaluated there
    selection: str
    eval_set: str  # what was evaluated during training
    global_step: int
    total_steps: int
    history: list[dict]
    val_ids: list
    val_labels: np.ndarray
    val_probs: (
        np.ndarray
    )  # the returned model's probabilities on the whole held-out fold (no TTA), scored once
    prior_log_loss: float  # training rows' class prior, scored on the held-out labels
    train_rows: int
    train_examples: int  # per epoch, with the swapped copies ("double")
    trainable_params: int
    total_params: int
    wall_time_s: float  # this process's training time incl. evaluation, summed over resumed sessions
    train_time_s: float  # forward/backward/optimizer only
    tokens_seen: int  # real (unpadded) training tokens
    peak_rss_bytes: int | None
    peak_cuda_bytes: int | None
    resumed_from_step: int | None
    out_dir: Path
    # Which objective trained and from what targets: loss name, teacher path/name, alpha, T, smoothing, the
    # teacher's repair counts, pseudo-label counts (`select_loss`, `_soft_targets`).
    loss: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.train_time_s if self.train_time_s > 0 else float("nan")

    def summary(self) -> dict:
        """JSON-ready numbers (no model, no arrays)."""
        return {
            "fold": self.fold,
            "ordering": self.ordering,
            "best_step": self.best_step,
            "best_eval_loss": self.best_eval_loss,
            "selection": self.selection,
            "eval_set": self.eval_set,
            "prior_log_loss": self.prior_log_loss,
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "train_rows": self.train_rows,
            "train_examples": self.train_examples,
            "val_rows": len(self.val_ids),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "wall_time_s": self.wall_time_s,
            "train_time_s": self.train_time_s,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": self.tokens_per_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "resumed_from_step": self.resumed_from_step,
            "loss": self.loss,
            "history": self.history,
        }


@dataclass
class StepInfo:
    """What a step callback (`train_fold(on_step=...)`) sees after each optimizer step, after that step's
    evaluation and checkpoint: enough for studies (tokens, examples, the model) without model hooks."""

    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # the epoch the next step belongs to
    tokens_seen: int  # real (unpadded) training tokens so far, over all processes (resumed sessions included)
    examples_seen: int  # training examples (swapped copies included) so far, over all processes
    loss: float  # this step's training loss (mean over processes)
    model: nn.Module  # the unwrapped model, in training mode (a callback that evaluates it must restore that)
    history: list[dict]  # evaluations so far
    fold: int


StepCallback = Callable[[StepInfo], None]


class PeakMemory:
    """Peak memory over a block: CPU resident set (Linux VmHWM, reset on entry) and CUDA max allocated.

    Linux lets a process reset its own RSS high-water mark (/proc/self/clear_refs), so two phases in one
    process are measured separately. Elsewhere the process-lifetime `ru_maxrss` is reported, flagged by
    `rss_is_lifetime_peak`.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.peak_rss_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self.rss_is_lifetime_peak = False

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.rss_is_lifetime_peak = True
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak_rss_bytes = _current_peak_rss()
        if self._cuda():
            self.peak_cuda_bytes = int(torch.cuda.max_memory_allocated(self.device))

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()


def _current_peak_rss() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
