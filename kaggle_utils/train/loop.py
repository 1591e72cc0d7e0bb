"""Train one fold: `train_fold` reads top to bottom as the data step, setup, the step loop and finish.

    result = train_fold(cfg, frame, folds, tokenizer, "runs/fold0", fold=0)
    result.val_probs, result.summary()

The fold's rows are built once, before training (`fold_data.build_fold_data`); the model, optimizer and
accelerator come from `model_setup`, the schedule and the optimizer step from `steps`, bounded evaluation and
`learning_curve.jsonl` from `evaluation`, checkpoints and exact resume from `checkpointing`. Multi-GPU runs go
through ``accelerate launch`` (DDP). `train.selection` picks the weights that ship ("final", or "inner": the
best on an inner holdout of the training part); the reported fold is scored once, after training, by them.
Design notes: docs/DESIGN_NOTES.md, "train/loop".
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig, TrainConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.classifier import count_parameters
from kaggle_utils.text.batching import PadCollator
from kaggle_utils.train.checkpointing import Checkpointer, TrainState, run_fingerprint
from kaggle_utils.train.evaluation import (
    eval_interval,
    evaluate_rows,
    record_evaluation,
    write_learning_curve,
)
from kaggle_utils.train.fold_data import FoldData, build_fold_data
from kaggle_utils.train.losses import LossFn, select_loss
from kaggle_utils.train.model_setup import BuildModel, make_accelerator, prepare_model
from kaggle_utils.train.results import PeakMemory, StepCallback, StepInfo, TrainResult
from kaggle_utils.train.steps import (
    advance_position,
    epoch_groups,
    examples_per_epoch,
    optimizer_step,
    planned_steps,
)

logger = logging.getLogger(__name__)


def train_fold(
    cfg: PipelineConfig,
    train_frame: pl.DataFrame,
    folds: pl.DataFrame,
    tokenizer,
    out_dir: str | Path,
    *,
    fold: int = 0,
    build_model: BuildModel | None = None,
    resume: bool = True,
    loss_fn: LossFn | None = None,
    target_columns: Sequence[str] = (),
    on_step: StepCallback | Sequence[StepCallback] | None = (),
    progress: bool = True,
) -> TrainResult:
    """Train on every fold but `fold`, ship the weights `cfg.train.selection` picks, score `fold` with them.

    `build_model(cfg, tokenizer, device)` makes the trainable model (default: `default_build_model`).
    `loss_fn(logits, batch)` is the objective (default: what the config asks for, `losses.select_loss`);
    `target_columns` names training-frame columns of per-class vectors carried into every batch. With `resume`
    the newest complete checkpoint under `out_dir/checkpoints` is continued. `on_step` (one callable or
    several) gets a `StepInfo` after every optimizer step, after that step's evaluation and checkpoint.
    """
    tc = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_loop_settings(tc)
    callbacks = [on_step] if callable(on_step) else list(on_step or ())

    loss_fn, target_columns, loss_info = select_loss(tc, loss_fn, target_columns)
    data = build_fold_data(cfg, train_frame, folds, fold, tokenizer, target_columns)
    loss_info.update(data.soft_targets)
    logger.info("fold %d objective: %s", fold, loss_info)

    session = _setup(cfg, data, tokenizer, build_model, out_dir, fold, resume)
    progress = progress and session.accelerator.is_main_process  # one bar, not one per process
    with PeakMemory(session.accelerator.device) as memory:
        _run_steps(session, data, loss_fn, callbacks, progress)
    return _finish(session, data, memory, loss_info, progress)


@dataclass
class _Session:
    """One fold's training session as `_setup` leaves it: the prepared model, optimizer and schedule, the
    checkpointer and the state to continue from."""

    cfg: PipelineConfig
    fold: int
    out_dir: Path
    pad_token_id: int
    accelerator: Any
    model: nn.Module  # as prepared by the accelerator (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpointer: Checkpointer
    state: TrainState
    resumed_from: int | None
    total_steps: int
    eval_every: int
    wall_before: float = 0.0  # wall time of earlier sessions of this run
    started: float = field(default_factory=time.perf_counter)

    def wall_time(self) -> float:
        """Earlier sessions' wall time plus this one's."""
        return self.wall_before + time.perf_counter() - self.started


def _setup(
    cfg: PipelineConfig,
    data: FoldData,
    tokenizer,
    build_model: BuildModel | None,
    out_dir: Path,
    fold: int,
    resume: bool,
) -> _Session:
    """The accelerator first (under `accelerate launch` it binds this process to its GPU), then the model,
    optimizer and schedule, then where an earlier session of this run stopped."""
    from accelerate.utils import set_seed

    tc = cfg.train
    accelerator = make_accelerator(cfg)
    set_seed(tc.seed)
    total_steps = planned_steps(examples_per_epoch(data.n_train_rows, tc), tc, accelerator.num_processes)
    eval_every = eval_interval(total_steps, tc)
    model, optimizer, scheduler = prepare_model(cfg, tokenizer, build_model, accelerator, total_steps)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    checkpointer = Checkpointer(out_dir, accelerator, trainable, tc.save_every_steps)
    fingerprint = run_fingerprint(cfg, fold, data.train_ids, total_steps, data.examples.targets)
    state, resumed_from = checkpointer.resume(fingerprint, resume)
    if resumed_from is not None:
        logger.info("resuming fold %d from step %d of %d", fold, resumed_from, total_steps)
    return _Session(
        cfg=cfg,
        fold=fold,
        out_dir=out_dir,
        pad_token_id=tokenizer.pad_token_id,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpointer=checkpointer,
        state=state,
        resumed_from=resumed_from,
        total_steps=total_steps,
        eval_every=eval_every,
        wall_before=state.wall_time_s,
    )


def _run_steps(
    session: _Session, data: FoldData, loss_fn: LossFn, callbacks: list[StepCallback], progress: bool
) -> None:
    """Optimizer steps over each epoch's length-bucketed accumulation groups, from where the state says, until
    the planned total; after each, a bounded evaluation and a checkpoint when due, then the callbacks."""
    tc, state, accelerator, model = session.cfg.train, session.state, session.accelerator, session.model
    rank, world = accelerator.process_index, accelerator.num_processes
    collate = PadCollator(session.pad_token_id)
    model.train()
    with _progress(session.total_steps, state.global_step, progress, session.fold) as bar:
        while state.global_step < session.total_steps:
            groups = epoch_groups(data.examples, tc, state.epoch, rank, world)
            for group_index in range(state.batch_in_epoch // tc.grad_accum, len(groups)):
                loss = optimizer_step(
                    accelerator,
                    model,
                    session.optimizer,
                    session.scheduler,
                    groups[group_index],
                    data.examples,
                    collate,
                    loss_fn,
                    tc.max_grad_norm,
                    state,
                )
                advance_position(state, group_index, len(groups), tc.grad_accum)
                finished = state.global_step >= session.total_steps
                if len(data.monitor_ids) and (state.global_step % session.eval_every == 0 or finished):
                    _evaluate_during_training(session, data, progress)
                state.wall_time_s = session.wall_time()
                session.checkpointer.after_step(state, finished)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", best=f"{state.best_eval_loss:.4f}")
                info = _step_info(session, loss)
                for callback in callbacks:
                    callback(info)
                if finished:
                    break


def _evaluate_during_training(session: _Session, data: FoldData, progress: bool) -> None:
    """Score the rows monitored during training, add them to the history and `learning_curve.jsonl`, and with
    selection "inner" keep the weights when they are the best so far."""
    tc, state, model = session.cfg.train, session.state, session.model
    probs = evaluate_rows(
        session.accelerator, model, data.monitor_ids, session.pad_token_id, tc.eval_token_budget, progress
    )
    record_evaluation(state, probs, data.monitor_labels, session.scheduler, session.wall_time())
    if session.accelerator.is_main_process:
        write_learning_curve(state.history, session.out_dir)
    if tc.selection == "inner":
        session.checkpointer.keep_if_best(state, model, probs)
    model.train()


def _step_info(session: _Session, loss: float) -> StepInfo:
    state = session.state
    return StepInfo(
        step=state.global_step,
        total_steps=session.total_steps,
        epoch=state.epoch,
        tokens_seen=state.tokens_seen,
        examples_seen=state.examples_seen,
        loss=loss,
        model=session.accelerator.unwrap_model(session.model),
        history=state.history,
        fold=session.fold,
    )


def _finish(
    session: _Session, data: FoldData, memory: PeakMemory, loss_info: dict, progress: bool
) -> TrainResult:
    """The weights that ship (`train.selection`), then the one score of the reported fold, by them."""
    tc, state, accelerator = session.cfg.train, session.state, session.accelerator
    accelerator.wait_for_everyone()  # best/ is written by the main process
    unwrapped = accelerator.unwrap_model(session.model)
    trainable_params, total_params = count_parameters(unwrapped)
    selected_step, selected_loss = _select_shipped_weights(
        tc.selection, state, session.checkpointer, unwrapped
    )
    unwrapped.eval()
    val_probs = evaluate_rows(
        accelerator, unwrapped, data.val.input_ids, session.pad_token_id, tc.eval_token_budget, progress
    )
    return TrainResult(
        model=unwrapped,
        fold=session.fold,
        ordering=tc.ordering,
        best_step=selected_step,
        best_eval_loss=selected_loss,
        selection=tc.selection,
        eval_set=data.eval_set,
        global_step=state.global_step,
        total_steps=session.total_steps,
        history=state.history,
        val_ids=list(data.val.ids),
        val_labels=data.val_labels,
        val_probs=val_probs,
        prior_log_loss=data.prior,
        train_rows=data.n_train_rows,
        train_examples=examples_per_epoch(data.n_train_rows, tc),
        trainable_params=trainable_params,
        total_params=total_params,
        wall_time_s=state.wall_time_s,
        train_time_s=state.train_time_s,
        tokens_seen=state.tokens_seen,
        peak_rss_bytes=memory.peak_rss_bytes,
        peak_cuda_bytes=memory.peak_cuda_bytes,
        resumed_from_step=session.resumed_from,
        out_dir=session.out_dir,
        loss=loss_info,
    )


def _check_loop_settings(tc: TrainConfig) -> None:
    if tc.grad_accum < 1 or tc.per_device_batch_size < 1:
        raise UsageError("train.grad_accum and train.per_device_batch_size must be >= 1")
    if tc.save_every_steps < 1:
        raise UsageError("train.save_every_steps must be >= 1")
    if tc.selection not in ("final", "inner"):
        raise UsageError(f"train.selection must be 'final' or 'inner', got {tc.selection!r}")
    if tc.eval_rows_cap < 0:
        raise UsageError(f"train.eval_rows_cap must be >= 0, got {tc.eval_rows_cap}")


def _select_shipped_weights(
    selection: str, state: TrainState, checkpointer: Checkpointer, model: nn.Module
) -> tuple[int, float]:
    """(step, its evaluation loss) of the weights that ship; with "inner", the best weights are loaded."""
    if selection == "inner":
        checkpointer.load_best(model, state.best_step)
        return state.best_step, state.best_eval_loss
    last = state.history[-1] if state.history and state.history[-1]["step"] == state.global_step else None
    return state.global_step, last["eval_loss"] if last else math.nan


@contextlib.contextmanager
def _progress(total: int, initial: int, enabled: bool, fold: int) -> Iterator[Any]:
    """A step progress bar (shown only when enabled and on a terminal), closed on exit."""
    bar = progress_bar(
        total=total, initial=initial, desc=f"train fold {fold}", unit="step", enabled=enabled, leave=False
    )
    try:
        yield bar
    finally:
        bar.close()
