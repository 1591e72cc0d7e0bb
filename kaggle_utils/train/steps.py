"""The training schedule and one optimizer step.

The schedule is a pure function of (seed, epoch), which exact resume relies on: `epoch_examples` (which
examples, swapped copies included, an epoch uses), `epoch_batches` / `epoch_groups` (this process's
length-bucketed micro-batches and accumulation groups), `planned_steps` (the run's optimizer steps).
`optimizer_step` runs one accumulation group and stops the run with `NonFiniteLossError` on a NaN/inf loss.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from kaggle_utils.core.config import TrainConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.text.batching import LengthBucketSampler
from kaggle_utils.train.checkpointing import TrainState
from kaggle_utils.train.fold_data import FoldExamples, swap_mode
from kaggle_utils.train.losses import LossFn


class NonFiniteLossError(UsageError):
    """The training loss turned NaN or infinite (float16 overflow, divergence): training stops there."""


def examples_per_epoch(n_rows: int, cfg: TrainConfig) -> int:
    """Training examples one epoch shows: twice the rows with "double" swap augmentation, else the rows."""
    return 2 * n_rows if swap_mode(cfg) == "double" else n_rows


def epoch_examples(n_rows: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """Indices into the encoded examples (`training_examples`) that `epoch` trains on.

    "double": all 2n (both orders); "none": the n originals; "random": for each row one order, drawn from an
    RNG seeded by (seed, epoch) alone, so a resumed run re-draws the same orders.
    """
    mode = swap_mode(cfg)
    if mode == "double":
        return np.arange(2 * n_rows)
    if mode == "none":
        return np.arange(n_rows)
    flips = np.random.default_rng([cfg.seed, epoch, 0x5A]).integers(0, 2, size=n_rows)
    return np.arange(n_rows) + flips * n_rows


def epoch_batches(
    lengths: np.ndarray, cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This process's micro-batches of `epoch`: a pure function of (seed, epoch), as exact resume needs.

    Every process gets the same number of batches (DDP steps in lockstep); the < world-size leftover
    batches of an epoch are skipped.
    """
    sampler = LengthBucketSampler(lengths, cfg.per_device_batch_size, seed=cfg.seed)
    sampler.set_epoch(epoch)
    batches = list(iter(sampler))
    per_process = len(batches) // world
    return batches[rank::world][:per_process]


def planned_steps(n_examples: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps of the run: ceil(epochs x steps per epoch), capped by `max_steps`."""
    micro = (-(-n_examples // cfg.per_device_batch_size)) // world
    if micro < 1:
        raise UsageError(f"{n_examples} training examples make no batch for {world} process(es)")
    per_epoch = -(-micro // cfg.grad_accum)
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if total < 1:
        raise UsageError(f"train.epochs={cfg.epochs} / max_steps={cfg.max_steps} give no optimizer step")
    return total


def epoch_groups(
    examples: FoldExamples, tc: TrainConfig, epoch: int, rank: int, world: int
) -> list[list[list[int]]]:
    """This process's accumulation groups of `epoch`: lists of micro-batches of example indices."""
    chosen = epoch_examples(examples.n_rows, tc, epoch)
    batches = [
        [int(chosen[i]) for i in batch]
        for batch in epoch_batches(examples.lengths[chosen], tc, epoch, rank, world)
    ]
    return [batches[i : i + tc.grad_accum] for i in range(0, len(batches), tc.grad_accum)]


def optimizer_step(
    accelerator,
    model,
    optimizer,
    scheduler,
    group,
    examples: FoldExamples,
    collate,
    loss_fn: LossFn,
    max_grad_norm: float | None,
    state: TrainState,
) -> float:
    """One optimizer step over an accumulation group; adds its time, tokens, examples and loss to `state`."""
    began = time.perf_counter()
    loss, tokens, n_examples = _accumulate(accelerator, model, group, examples, collate, loss_fn)
    if not math.isfinite(loss):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        raise NonFiniteLossError(
            f"training stopped at step {state.global_step + 1}: the loss is {loss} (parameters {dtype}, "
            f"mixed precision {accelerator.mixed_precision}); the model overflowed or diverged and no later "
            "step would learn: use model.dtype=float32 (or bfloat16 on a GPU that has it), or a lower "
            "train.learning_rate"
        )
    if max_grad_norm and max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.train_time_s += time.perf_counter() - began
    state.global_step += 1
    state.tokens_seen += tokens
    state.examples_seen += n_examples
    state.loss_sum += loss
    state.loss_count += 1
    return loss


def advance_position(state: TrainState, group_index: int, n_groups: int, grad_accum: int) -> None:
    """Where the next step starts: the next group of this epoch, or the first of the next epoch."""
    if group_index == n_groups - 1:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    else:
        state.batch_in_epoch = (group_index + 1) * grad_accum


def _accumulate(
    accelerator, model, group, examples: FoldExamples, collate, loss_fn: LossFn
) -> tuple[float, int, int]:
    """Forward/backward over one accumulation group; gradients sync across processes on its last batch only.

    Returns the step's loss, real tokens and examples over all processes (the same on every process)."""
    device = accelerator.device
    total_loss, tokens, n_examples = 0.0, 0, 0
    for index, rows in enumerate(group):
        batch = collate(
            [{"input_ids": examples.input_ids[row], "labels": int(examples.labels[row])} for row in rows]
        )
        for name, values in examples.targets.items():
            batch[name] = torch.as_tensor(values[rows], dtype=torch.float32)
        batch = {key: value.to(device) for key, value in batch.items()}
        sync = index == len(group) - 1
        with contextlib.ExitStack() as stack:
            if not sync:
                stack.enter_context(accelerator.no_sync(model))
            with accelerator.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = loss_fn(logits, batch) / len(group)
            accelerator.backward(loss)
        total_loss += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
        n_examples += len(rows)
    if accelerator.num_processes > 1:
        # Every process saw its own micro-batches: the step's tokens are their sum, its loss their mean (what
        # DDP's averaged gradient descends), so tokens_seen and tokens/s count the global batch once.
        summed = accelerator.reduce(
            torch.tensor([total_loss, float(tokens), float(n_examples)], dtype=torch.float64, device=device),
            reduction="sum",
        )
        total_loss = float(summed[0]) / accelerator.num_processes
        tokens, n_examples = int(round(float(summed[1]))), int(round(float(summed[2])))
    return total_loss, tokens, n_examples
