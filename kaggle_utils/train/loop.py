"""The training loop: one fold, either ordering, resumable after interruption, on accelerate.

A lean loop rather than the HF Trainer because the parts that matter here are explicit and tested: the
A/B-swap augmentation (`TrainConfig.swap_augment`), length-bucketed batches, which weights ship, and an exact
resume. Multi-GPU runs go through ``accelerate launch`` (DDP); each process takes every world-size-th batch and
evaluates a contiguous share of the evaluated rows. The main process alone writes checkpoints (each process adds
its RNG state) and best weights; the logged loss and `tokens_seen` are reduced over processes, so they describe
the global batch once. Two CPU processes (gloo) reproduce one process with the same global batch
(tests/train/test_loop_multiprocess.py).

Which weights ship (`TrainConfig.selection`): "final" (default; the winners shipped the model after one epoch)
or "inner", the best of the evaluations on an inner holdout carved from the training part by prompt group. The
held-out fold whose score is reported as CV is never used to choose: it is scored once, after training, by the
shipped weights. (Choosing the best of many evaluations on that same fold made the CV optimistic.) Evaluations
during training are bounded: `evals_per_run` of them, each on at most `eval_rows_cap` rows (the inner holdout,
or with "final" a fixed sample of the held-out fold that only draws the learning curve).

Resume (`checkpointing.Checkpointer`): every `save_every_steps` optimizer steps a checkpoint is written
(atomically) with accelerate's `save_state` (optimizer, LR scheduler, grad scaler, RNG states) holding only the
trainable weights (LoRA + head: megabytes, not the frozen 9B base), plus `trainer_state.json` (optimizer step,
epoch, position in the epoch's batch order, history, best so far). The batch order of an epoch is a pure
function of (seed, epoch), so a resumed run re-creates it and skips what was done: on CPU, resuming gives the
same step and bit-identical weights as an uninterrupted run.

The objective is `loss_fn(logits, batch)` (losses.py; default cross-entropy on the labels, equal to the HF
classifier's own loss): soft targets / distillation are a loss function plus `target_columns` carried into the
batch. Without a `loss_fn` the config chooses: `train.teacher_path` (an OOF parquet, teacher.py) and/or
`train.pseudo_path` (pseudo_labels.py, joined to the training part only) give every training row a soft target
and train with `losses.distillation_loss`; `train.label_smoothing` alone, label-smoothed cross-entropy. Studies watch training through `on_step` callbacks (`StepInfo`: step, tokens, examples, loss, model),
never through hooks on the model.

Optimiser: bitsandbytes 8-bit AdamW on CUDA, torch AdamW on CPU (`TrainConfig.optimizer`); cosine schedule with
linear warm-up; gradient clipping; gradient accumulation; gradient checkpointing (non-reentrant) as
`ModelConfig.gradient_checkpointing` says. The 16-bit model trains in its dtype with accelerate's autocast
(bf16, or fp16 with a grad scaler on T4-class GPUs); trainable parameters are kept in fp32.

Backends (`TrainConfig.backend`): "hf" (transformers + peft, every device) or "unsloth" (CUDA only; imported
lazily; unsloth's CPU path builds a causal LM without the classification head, so it is refused on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig, TrainConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.metrics import class_prior, log_loss, prior_log_loss, row_log_losses
from kaggle_utils.data.folds import check_folds
from kaggle_utils.models.classifier import (
    apply_lora,
    base_has_weights,
    build_classifier,
    count_parameters,
    predict_probs,
)
from kaggle_utils.models.devices import resolve_dtype
from kaggle_utils.text.batching import LengthBucketSampler, PadCollator
from kaggle_utils.text.formatting import TEMPLATE_VERSION, encode_both_orders, encode_rows, swap_probs
from kaggle_utils.train.checkpointing import Checkpointer, TrainState
from kaggle_utils.train.losses import SOFT_LABELS, LossFn, loss_from_config
from kaggle_utils.train.pseudo_labels import join_pseudo, pseudo_for_fold
from kaggle_utils.train.teacher import HeldOutFold, teacher_targets

logger = logging.getLogger(__name__)

HEAD_MARKER = "modules_to_save"  # peft's name for the fully trained copy of the head

BuildModel = Callable[[PipelineConfig, Any, torch.device], nn.Module]


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
    # teacher's repair counts, pseudo-label counts (`_select_loss`, `_soft_targets`).
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


# ------------------------------------------------------------------------------------------------ memory


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


# ------------------------------------------------------------------------------------------------ data


def split_fold(frame: pl.DataFrame, folds: pl.DataFrame, fold: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training rows, held-out rows) of `frame` for `fold`; every frame row must have a label and a fold."""
    check_folds(folds, frame)
    available = sorted(folds["fold"].unique().to_list())
    if fold not in available:
        raise UsageError(f"fold {fold} is not in the folds file (it has folds {available})")
    if "label" not in frame.columns:
        raise DataError("training frame has no 'label' column (a test file?)")
    unlabelled = frame.filter(pl.col("label").is_null())["id"]
    if len(unlabelled):
        raise DataError(
            f"training frame: {len(unlabelled)} rows have no label (ids {unlabelled.head(5).to_list()})"
        )
    joined = frame.join(folds.select("id", "fold"), on="id", how="left", maintain_order="left")
    val = joined.filter(pl.col("fold") == fold).drop("fold")
    train = joined.filter(pl.col("fold") != fold).drop("fold")
    if val.is_empty() or train.is_empty():
        raise DataError(
            f"fold {fold} leaves {train.height} training and {val.height} held-out rows of the frame"
        )
    return train, val


def split_inner(
    train_part: pl.DataFrame, folds: pl.DataFrame, cfg: TrainConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows to train on, inner holdout) of a fold's training part for `selection="inner"`.

    Whole prompt groups (the folds file's `group`) are held out, drawn in a seeded order until the holdout has
    `inner_holdout_fraction` of the rows, at most `eval_rows_cap`: a near-duplicate prompt never sits on both
    sides, as with the folds. The reported held-out fold is not touched.
    """
    if not 0 < cfg.inner_holdout_fraction < 1:
        raise UsageError(f"train.inner_holdout_fraction must be in (0, 1), got {cfg.inner_holdout_fraction}")
    target = min(math.ceil(cfg.inner_holdout_fraction * train_part.height), cfg.eval_rows_cap)
    if target < 1:
        raise UsageError("train.selection='inner' needs train.eval_rows_cap >= 1 (the inner holdout's size)")
    groups = train_part.select("id").join(
        folds.select("id", "group"), on="id", how="left", maintain_order="left"
    )
    sizes = groups.group_by("group").len().sort("group")
    order = np.random.default_rng([cfg.seed, 0x1E]).permutation(sizes.height)
    counts = sizes["len"].to_numpy()[order]
    chosen, total = [], 0
    for index, count in zip(order, counts, strict=True):
        if total >= target:
            break
        if total + count > target and total > 0:
            continue  # a big group would overshoot the cap; smaller ones may still fit
        chosen.append(sizes["group"][int(index)])
        total += int(count)
    held = set(groups.filter(pl.col("group").is_in(chosen))["id"].to_list())
    mask = train_part["id"].is_in(list(held))
    inner, rest = train_part.filter(mask), train_part.filter(~mask)
    if inner.is_empty() or rest.is_empty():
        raise DataError(f"the inner holdout leaves {rest.height} training and {inner.height} inner rows")
    return rest, inner


def monitor_sample(n_rows: int, cap: int, seed: int) -> np.ndarray:
    """Sorted row positions of a fixed, seeded sample of at most `cap` rows (all rows when n_rows <= cap)."""
    if n_rows <= cap:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng([seed, 0xE7]).choice(n_rows, size=cap, replace=False))


def eval_interval(total_steps: int, cfg: TrainConfig) -> int:
    """Optimizer steps between evaluations: `eval_every_steps`, else total / `evals_per_run` (rounded up)."""
    if cfg.eval_every_steps is not None:
        if cfg.eval_every_steps < 1:
            raise UsageError("train.eval_every_steps must be >= 1 (or null: evals_per_run decides)")
        return cfg.eval_every_steps
    if cfg.evals_per_run < 1:
        raise UsageError("train.evals_per_run must be >= 1")
    return max(1, math.ceil(total_steps / cfg.evals_per_run))


@dataclass
class _Examples:
    input_ids: list[list[int]]
    labels: np.ndarray
    n_rows: int  # training rows; with swap augmentation example i + n_rows is row i swapped
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # per-class vectors (examples, classes)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def _training_examples(
    frame: pl.DataFrame, tokenizer, cfg: PipelineConfig, target_columns: Sequence[str] = ()
) -> _Examples:
    """Encoded training rows; with swap augmentation ("double" or "random") followed by their A/B-swapped
    copies (labels swapped, and the A/B entries of each target column), so example i + n is row i swapped.
    Which of them an epoch uses: `epoch_examples`."""

    targets = {name: _target_column(frame, name) for name in target_columns}
    mode = _swap_mode(cfg.train)
    if mode != "none":
        original, swapped = encode_both_orders(frame, tokenizer, cfg.format)
        logger.info("train encoding: %s", original.summary())
        return _Examples(
            original.input_ids + swapped.input_ids,
            np.concatenate([original.labels, swapped.labels]),
            frame.height,
            {name: np.concatenate([v, swap_probs(v)]) for name, v in targets.items()},
        )
    original = encode_rows(frame, tokenizer, cfg.format)
    logger.info("train encoding: %s", original.summary())
    return _Examples(original.input_ids, original.labels, frame.height, targets)


def _target_column(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A training-frame column of per-class vectors (A, B[, tie]) as float (rows, classes); refuses gaps."""
    if name not in frame.columns:
        raise DataError(f"training frame has no target column {name!r} (columns: {frame.columns})")
    values = frame[name].to_list()
    widths = {len(v) if isinstance(v, (list, tuple, np.ndarray)) else -1 for v in values}
    if len(widths) != 1 or widths.pop() not in (2, 3):
        bad = next(
            i
            for i, v in enumerate(values)
            if not isinstance(v, (list, tuple, np.ndarray))
            or len(v) != len(values[0])
            or len(v) not in (2, 3)
        )
        raise DataError(
            f"training frame column {name!r}, row {bad} (id {frame['id'][bad]}): expected a vector of "
            f"2 or 3 class values like every row, got {values[bad]!r}"
        )
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise DataError(
            f"training frame column {name!r}, row {bad} (id {frame['id'][bad]}): non-finite value "
            f"{values[bad]!r}"
        )
    return array


def _swap_mode(cfg: TrainConfig) -> str:
    if cfg.swap_augment not in ("none", "double", "random"):
        raise UsageError(f"train.swap_augment must be 'none', 'double' or 'random', got {cfg.swap_augment!r}")
    return cfg.swap_augment


def examples_per_epoch(n_rows: int, cfg: TrainConfig) -> int:
    """Training examples one epoch shows: twice the rows with "double" swap augmentation, else the rows."""
    return 2 * n_rows if _swap_mode(cfg) == "double" else n_rows


def epoch_examples(n_rows: int, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """Indices into the encoded examples (`_training_examples`) that `epoch` trains on.

    "double": all 2n (both orders); "none": the n originals; "random": for each row one order, drawn from an RNG
    seeded by (seed, epoch) alone, so a resumed run re-draws the same orders.
    """
    mode = _swap_mode(cfg)
    if mode == "double":
        return np.arange(2 * n_rows)
    if mode == "none":
        return np.arange(n_rows)
    flips = np.random.default_rng([cfg.seed, epoch, 0x5A]).integers(0, 2, size=n_rows)
    return np.arange(n_rows) + flips * n_rows


def epoch_batches(
    lengths: np.ndarray, cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This process's micro-batches of `epoch`: a pure function of (seed, epoch), which exact resume relies on.

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


def run_fingerprint(
    cfg: PipelineConfig,
    fold: int,
    train_ids: list,
    total_steps: int,
    targets: dict[str, np.ndarray] | None = None,
) -> str:
    """sha256 over what determines a run's trajectory: the format/model/LoRA/quant/train settings, the
    template version, the fold, the training row ids, the planned steps and, when rows carry soft targets
    (a teacher, pseudo-labels), their values: a teacher file rewritten under the same path is another run."""
    import hashlib

    relevant = {name: getattr(cfg, name) for name in ("format", "model", "lora", "quant", "train")}
    content = {
        "sections": {k: asdict(v) for k, v in relevant.items()},
        "fold": fold,
        "template_version": TEMPLATE_VERSION,
        "train_ids": [str(i) for i in train_ids],
        "total_steps": total_steps,
    }
    if targets:  # absent without targets, so earlier runs' fingerprints (and their checkpoints) still match
        content["targets"] = {
            name: hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()
            for name, values in sorted(targets.items())
        }
    payload = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ model


def distributed_state():
    """accelerate's process state (rank, world size, main process, barriers), initialised as `train_fold`'s
    Accelerator will be: under ``accelerate launch`` / ``torchrun`` the process group exists from here on, so
    callers can let the main process alone write the shared files (folds, tokenizer, base, artifacts)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def finish_distributed() -> None:
    """Every process waits for the others, then leaves the process group. A rank that exits while the group is
    still alive (the non-main ranks return as soon as training ends, while the main one exports) can abort at
    interpreter shutdown ("terminate called without an active exception", SIGABRT), failing the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def default_build_model(cfg: PipelineConfig, tokenizer, device: torch.device) -> nn.Module:
    """The trainable peft model for `cfg.train.ordering`: LoRA on the 16-bit base (ft-then-quant) or QLoRA on
    the NF4 base (quant-then-ft); through unsloth when `cfg.train.backend == "unsloth"`. With
    `cfg.train.method == "full"` (ft-then-quant only): the plain classifier, every weight trainable."""
    if cfg.train.backend == "unsloth" and cfg.train.method == "lora":
        return build_unsloth_classifier(cfg, tokenizer, device)
    if cfg.train.backend not in ("hf", "unsloth"):
        raise UsageError(f"train.backend must be 'hf' or 'unsloth', got {cfg.train.backend!r}")
    quant = cfg.quant if cfg.train.ordering == "quant-then-ft" else None
    if cfg.train.ordering not in ("ft-then-quant", "quant-then-ft"):
        raise UsageError(
            f"train.ordering must be 'ft-then-quant' or 'quant-then-ft', got {cfg.train.ordering!r}"
        )
    check_train_method(cfg)
    base = build_classifier(
        cfg.model, quant=quant, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, device=device
    )
    if cfg.train.method == "full":
        for param in base.parameters():
            param.requires_grad_(True)
        return base
    return apply_lora(base, cfg.lora)


def check_train_method(cfg: PipelineConfig) -> None:
    """Full fine-tuning updates the 16-bit weights themselves: quantized weights (quant-then-ft) cannot take
    gradient steps, and unsloth only builds peft models, so both combinations are refused up front."""
    method = cfg.train.method
    if method not in ("lora", "full"):
        raise UsageError(f"train.method must be 'lora' or 'full', got {method!r}")
    if method == "full" and cfg.train.ordering == "quant-then-ft":
        raise UsageError(
            "train.method 'full' needs train.ordering 'ft-then-quant': quantized weights "
            "(quant-then-ft) cannot be fine-tuned in full; use train.method 'lora' (QLoRA)"
        )
    if method == "full" and cfg.train.backend != "hf":
        raise UsageError(f"train.method 'full' runs on train.backend 'hf' only, got {cfg.train.backend!r}")


def build_unsloth_classifier(cfg: PipelineConfig, tokenizer, device: torch.device) -> nn.Module:
    """unsloth's fast LoRA/QLoRA path: `FastLanguageModel.from_pretrained(..., num_labels=3)` on CUDA only."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UsageError(
            "train.backend='unsloth' needs a CUDA GPU: on CPU unsloth only builds a causal LM "
            "(AutoModelForCausalLM, no classification head). Use train.backend='hf' here."
        )
    if not base_has_weights(cfg.model.base_model):
        raise UsageError(
            "train.backend='unsloth' loads a checkpoint directory; materialize random bases first"
        )
    try:
        from unsloth import FastLanguageModel
    except ImportError as error:
        raise UsageError(
            f"train.backend='unsloth' but unsloth is not importable ({error}); install requirements-gpu.txt"
        ) from error
    model, _ = FastLanguageModel.from_pretrained(
        model_name=cfg.model.base_model,
        max_seq_length=cfg.format.max_length,
        dtype=None,
        load_in_4bit=cfg.train.ordering == "quant-then-ft",
        num_labels=cfg.model.num_labels,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        modules_to_save=list(cfg.lora.modules_to_save),
        use_gradient_checkpointing="unsloth" if cfg.model.gradient_checkpointing else False,
        random_state=cfg.train.seed,
    )


# A reload that kept the trained head changes it by bf16 rounding only (~1e-3 relative); a dropped or re-initialised
# head differs by the size of the weights themselves, and its probabilities by tenths.
HEAD_ROUNDTRIP_HEAD_ATOL = 1e-2
HEAD_ROUNDTRIP_PROBS_ATOL = 2e-2


def check_unsloth_head_roundtrip(
    model: nn.Module, tokenizer, out_dir: str | Path, probe: list[list[int]]
) -> dict:
    """Save an unsloth-trained classifier merged to 16-bit, reload it with plain transformers and check what
    unsloth is known to lose: the trained `score` head and `num_labels` (GPU only; the GPU benchmark calls it).

    Raises UsageError naming what was lost (`verify_reloaded_classifier`); returns the measured differences.
    """
    from transformers import AutoModelForSequenceClassification

    out_dir = Path(out_dir)
    # What the trained model gives, taken before the save (which may merge the adapter in place).
    trained_head = _head_weight(model).detach().float().cpu().clone()
    expected = predict_probs(model, probe, tokenizer.pad_token_id)
    num_labels = model.config.num_labels
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        str(out_dir), local_files_only=True, device_map={"": str(_device_of(model))}
    )
    return verify_reloaded_classifier(
        reloaded, trained_head, expected, num_labels, probe, tokenizer.pad_token_id, source=str(out_dir)
    )


def verify_reloaded_classifier(
    reloaded: nn.Module,
    trained_head: torch.Tensor,
    expected_probs: np.ndarray,
    num_labels: int,
    probe: list[list[int]],
    pad_token_id: int,
    source: str = "reloaded model",
    head_atol: float = HEAD_ROUNDTRIP_HEAD_ATOL,
    probs_atol: float = HEAD_ROUNDTRIP_PROBS_ATOL,
) -> dict:
    """Compare a saved-and-reloaded classifier with what the trained model gave: the same `num_labels`, the
    same head (max |diff| <= head_atol) and the same probabilities on `probe` (max |diff| <= probs_atol).

    Raises UsageError listing every difference beyond tolerance (a save that silently dropped the head would
    otherwise ship a random classifier); returns the measured differences.
    """
    problems = []
    if reloaded.config.num_labels != num_labels:
        problems.append(f"num_labels {reloaded.config.num_labels} != {num_labels}")
    trained_head = trained_head.detach().float().cpu()
    reloaded_head = _head_weight(reloaded).detach().float().cpu()
    if reloaded_head.shape != trained_head.shape:
        problems.append(f"score head shape {tuple(reloaded_head.shape)} != {tuple(trained_head.shape)}")
        head_difference = math.inf
    else:
        head_difference = float((reloaded_head - trained_head).abs().max())
    if not head_difference <= head_atol:
        problems.append(
            f"score head differs from the trained one by {head_difference:.3g} > {head_atol:g} "
            "(dropped on save?)"
        )
    got = predict_probs(reloaded, probe, pad_token_id)
    probs_difference = (
        float(np.abs(got - expected_probs).max()) if got.shape == expected_probs.shape else math.inf
    )
    if not probs_difference <= probs_atol:
        problems.append(f"probabilities on the probe rows differ by {probs_difference:.3g} > {probs_atol:g}")
    if problems:
        raise UsageError(
            f"{source}: the saved classifier does not reproduce the trained one: " + "; ".join(problems)
        )
    return {
        "num_labels": reloaded.config.num_labels,
        "head_max_abs_diff": head_difference,
        "probs_max_abs_diff": probs_difference,
    }


def _head_weight(model: nn.Module) -> torch.Tensor:
    for name, param in model.named_parameters():
        if name.endswith(f"score.{HEAD_MARKER}.default.weight"):
            return param
    for name, param in model.named_parameters():
        if name.endswith("score.weight"):
            return param
    raise UsageError("model has no score head")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the head may get its own learning rate. 8-bit on CUDA by default."""
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # peft's head copy, or the plain model's head when every weight trains (train.method "full")
            (head if HEAD_MARKER in name or name.startswith("score.") else body).append(param)
    if not head and not body:
        raise UsageError("the model has no trainable parameters")
    groups = [
        {"params": body, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay},
        {"params": head, "lr": cfg.head_learning_rate or cfg.learning_rate, "weight_decay": cfg.weight_decay},
    ]
    groups = [group for group in groups if group["params"]]
    kind = cfg.optimizer
    if kind == "auto":
        kind = "adamw_8bit" if device.type == "cuda" else "adamw"
    if kind == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate)
    raise UsageError(f"train.optimizer must be auto, adamw or adamw_8bit; got {cfg.optimizer!r}")


def upcast_trainable(model: nn.Module) -> None:
    """fp32 master copies of what trains (LoRA, head): a 16-bit head cannot be unscaled by the fp16 grad scaler
    and loses small updates in bf16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def mixed_precision_for(model: nn.Module, device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    if torch.float16 in dtypes:
        return "fp16"
    if torch.bfloat16 in dtypes:
        return "bf16"
    return "no"


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class StepInfo:
    """What a step callback (`train_fold(on_step=...)`) sees after each optimizer step, after that step's
    evaluation and checkpoint: enough for studies (tokens, examples, the model) without hooks into the model."""

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


@dataclass
class _FoldData:
    """One fold's rows, encoded: what trains, what is evaluated during training, and the reported fold."""

    examples: _Examples
    train_ids: list
    n_train_rows: int
    val: Any  # EncodedRows of the reported fold
    val_labels: np.ndarray
    monitor_ids: list[list[int]]
    monitor_labels: np.ndarray
    eval_set: str
    prior: float
    soft_targets: dict = field(default_factory=dict)  # teacher / pseudo-label counts (`_soft_targets`)


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
    """Train on every fold but `fold` (an argument: which fold is held out is the run's, not the config's); ship the weights `cfg.train.selection` picks
    (the final step's, or the best on an inner holdout of the training part); score `fold` once, with them.

    `build_model(cfg, tokenizer, device)` makes the trainable model (default: `default_build_model`, i.e. the
    ordering's LoRA / QLoRA); a variant (variant_registry.py) passes its own. `loss_fn(logits, batch)` is the
    training objective (default: what the config asks for, `_select_loss`: distillation from
    `train.teacher_path` and/or `train.pseudo_path` rows, label-smoothed or plain cross-entropy; see losses.py);
    `target_columns` names training frame columns of per-class vectors (e.g. a teacher's probabilities) carried
    into every batch under their names. With `resume`, the newest complete checkpoint under `out_dir/checkpoints` is continued
    (`Checkpointer`). `on_step` (one callable or several) gets a `StepInfo` after every optimizer step, after
    that step's evaluation and checkpoint: progress, studies, and the tests' simulated crash.
    """
    from accelerate.utils import set_seed

    tc = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_loop_settings(tc)
    callbacks = [on_step] if callable(on_step) else list(on_step or ())

    # Setup: the fold's rows; the accelerator first (under `accelerate launch` it binds this process to its GPU),
    # then the model, optimiser and schedule; then where an earlier session of this run stopped.
    loss_fn, target_columns, loss_info = _select_loss(tc, loss_fn, target_columns)
    data = _fold_data(cfg, train_frame, folds, fold, tokenizer, target_columns)
    loss_info.update(data.soft_targets)
    logger.info("fold %d objective: %s", fold, loss_info)
    accelerator = _make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    set_seed(tc.seed)
    total_steps = planned_steps(examples_per_epoch(data.n_train_rows, tc), tc, world)
    interval = eval_interval(total_steps, tc)
    model, optimizer, scheduler = _prepare_model(cfg, tokenizer, build_model, accelerator, total_steps)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    checkpointer = Checkpointer(out_dir, accelerator, trainable, tc.save_every_steps)
    state, resumed_from = checkpointer.resume(
        run_fingerprint(cfg, fold, data.train_ids, total_steps, data.examples.targets), resume
    )
    if resumed_from is not None:
        logger.info("resuming fold %d from step %d of %d", fold, resumed_from, total_steps)
    collate = PadCollator(tokenizer.pad_token_id)
    trainable_params, total_params = count_parameters(accelerator.unwrap_model(model))
    session_start, wall_at_start = time.perf_counter(), state.wall_time_s

    def wall_time() -> float:  # earlier sessions' time plus this one's
        return wall_at_start + time.perf_counter() - session_start

    # The loop: optimizer steps over each epoch's length-bucketed accumulation groups; after each, a bounded
    # evaluation when due (selection "inner": maybe the new best), a checkpoint when due, then the callbacks.
    model.train()
    progress = progress and accelerator.is_main_process  # one bar, not one per process
    with PeakMemory(device) as memory, _progress(total_steps, state.global_step, progress, fold) as bar:
        while state.global_step < total_steps:
            groups = _epoch_groups(data.examples, tc, state.epoch, rank, world)
            for group_index in range(state.batch_in_epoch // tc.grad_accum, len(groups)):
                loss = _optimizer_step(
                    accelerator,
                    model,
                    optimizer,
                    scheduler,
                    groups[group_index],
                    data.examples,
                    collate,
                    loss_fn,
                    tc.max_grad_norm,
                    state,
                )
                _advance_position(state, group_index, len(groups), tc.grad_accum)
                finished = state.global_step >= total_steps
                if len(data.monitor_ids) and (state.global_step % interval == 0 or finished):
                    probs = _evaluate(
                        accelerator,
                        model,
                        data.monitor_ids,
                        tokenizer.pad_token_id,
                        tc.eval_token_budget,
                        progress,
                    )
                    _record(state, probs, data.monitor_labels, scheduler, wall_time())
                    if accelerator.is_main_process:
                        write_learning_curve(state.history, out_dir)
                    if tc.selection == "inner":
                        checkpointer.keep_if_best(state, model, probs)
                    model.train()
                state.wall_time_s = wall_time()
                checkpointer.after_step(state, finished)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", best=f"{state.best_eval_loss:.4f}")
                info = StepInfo(
                    state.global_step,
                    total_steps,
                    state.epoch,
                    state.tokens_seen,
                    state.examples_seen,
                    loss,
                    accelerator.unwrap_model(model),
                    state.history,
                    fold,
                )
                for callback in callbacks:
                    callback(info)
                if finished:
                    break

    # Finish: the weights that ship, then the one score of the reported fold, by them.
    accelerator.wait_for_everyone()  # best/ is written by the main process
    unwrapped = accelerator.unwrap_model(model)
    selected_step, selected_loss = _select_shipped_weights(tc.selection, state, checkpointer, unwrapped)
    unwrapped.eval()
    val_probs = _evaluate(
        accelerator, unwrapped, data.val.input_ids, tokenizer.pad_token_id, tc.eval_token_budget, progress
    )
    return TrainResult(
        model=unwrapped,
        fold=fold,
        ordering=tc.ordering,
        best_step=selected_step,
        best_eval_loss=selected_loss,
        selection=tc.selection,
        eval_set=data.eval_set,
        global_step=state.global_step,
        total_steps=total_steps,
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
        resumed_from_step=resumed_from,
        out_dir=out_dir,
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


def _fold_data(
    cfg: PipelineConfig,
    train_frame: pl.DataFrame,
    folds: pl.DataFrame,
    fold: int,
    tokenizer,
    target_columns: Sequence[str],
) -> _FoldData:
    """The fold's training examples, the rows evaluated during training and the reported fold, encoded."""
    tc = cfg.train
    train_part, val_part = split_fold(train_frame, folds, fold)
    held_out = [val_part]
    val = encode_rows(val_part, tokenizer, cfg.format)
    val_labels = np.asarray(val.labels, dtype=np.int64)
    if tc.selection == "inner":
        # Weights are chosen on rows of the training part, never on the fold whose score is reported.
        train_part, inner_part = split_inner(train_part, folds, tc)
        held_out.append(inner_part)
        monitor = encode_rows(inner_part, tokenizer, cfg.format)
        monitor_ids, monitor_labels = monitor.input_ids, np.asarray(monitor.labels, dtype=np.int64)
        eval_set = f"inner holdout ({inner_part.height} training rows)"
    else:
        # Learning curve only: a fixed sample of the held-out fold, never used to choose weights.
        picked = monitor_sample(len(val.input_ids), tc.eval_rows_cap, tc.seed)
        monitor_ids, monitor_labels = [val.input_ids[i] for i in picked], val_labels[picked]
        eval_set = f"held-out fold sample ({len(picked)} rows, learning curve only)"
    prior = prior_log_loss(
        val_labels, class_prior(np.asarray(train_part["label"].to_numpy(), dtype=np.int64))
    )
    train_part, soft_info = _soft_targets(tc, train_part, held_out, HeldOutFold.from_folds(folds, fold))
    return _FoldData(
        _training_examples(train_part, tokenizer, cfg, target_columns),
        train_part["id"].to_list(),
        train_part.height,
        val,
        val_labels,
        monitor_ids,
        monitor_labels,
        eval_set,
        prior,
        soft_info,
    )


def _select_loss(
    tc: TrainConfig, loss_fn: LossFn | None, target_columns: Sequence[str]
) -> tuple[LossFn, tuple[str, ...], dict]:
    """The objective: the caller's `loss_fn`, or the one the config asks for (losses.loss_from_config), with
    the batch fields it needs and a record of it for the summary. Both at once is refused: which would win?"""
    soft = tc.teacher_path is not None or tc.pseudo_path is not None
    if loss_fn is not None:
        if soft or tc.label_smoothing > 0:
            raise UsageError(
                "train_fold got a loss_fn and the config sets train.teacher_path / pseudo_path / "
                "label_smoothing; use one or the other"
            )
        return (
            loss_fn,
            tuple(target_columns),
            {
                "loss": getattr(loss_fn, "__name__", type(loss_fn).__name__),
                "target_columns": list(target_columns),
            },
        )
    fn, fields = loss_from_config(tc.distill_weight, tc.distill_temperature, tc.label_smoothing, soft)
    if soft:
        info = {
            "loss": "distillation",
            "distill_weight": tc.distill_weight,
            "distill_temperature": tc.distill_temperature,
            "label_smoothing": tc.label_smoothing,
        }
    else:
        info = {
            "loss": "label_smoothed_cross_entropy" if tc.label_smoothing > 0 else "cross_entropy",
            "label_smoothing": tc.label_smoothing,
        }
    return fn, (*target_columns, *(f for f in fields if f not in target_columns)), info


def _soft_targets(
    tc: TrainConfig, train_part: pl.DataFrame, held_out: list[pl.DataFrame], fold: HeldOutFold
) -> tuple[pl.DataFrame, dict]:
    """The training part with a `SOFT_LABELS` column when the config distils: the teacher's probabilities
    (teacher.py: checked, repairs counted, refused when the teacher saw `fold`, the scored fold) or, with
    pseudo-labels and no teacher, the one-hot labels; then `fold`'s pseudo rows (pseudo_labels.pseudo_for_fold:
    from a teacher that left `fold` out) that share no prompt group with `held_out` (join_pseudo, drops counted)."""
    if tc.teacher_path is None and tc.pseudo_path is None:
        return train_part, {}
    info: dict = {}
    if tc.teacher_path is not None:
        probs, report = teacher_targets(
            train_part, tc.teacher_path, tc.teacher_name, held_out=fold, allow_leak=tc.teacher_allow_leak
        )
        info["teacher"] = report.to_dict()
    else:
        probs = np.eye(3)[train_part["label"].to_numpy().astype(np.int64)]
        info["teacher"] = None
    train_part = train_part.with_columns(pl.Series(SOFT_LABELS, probs.tolist(), dtype=pl.List(pl.Float64)))
    if tc.pseudo_path is not None:
        pseudo, fold_check = pseudo_for_fold(tc.pseudo_path, fold, tc.teacher_allow_leak)
        train_part, counts = join_pseudo(train_part, held_out, pseudo)
        info["pseudo"] = {"path": tc.pseudo_path, **counts, "fold_check": fold_check}
    return train_part, info


def _make_accelerator(cfg: PipelineConfig):
    """CPU or this process's GPU; autocast to the base model's 16-bit dtype on CUDA."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if cuda else "cpu")
    return Accelerator(
        cpu=not cuda,
        mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if cuda else "no",
        step_scheduler_with_optimizer=False,
    )


def _prepare_model(
    cfg: PipelineConfig, tokenizer, build_model: BuildModel | None, accelerator, total_steps: int
):
    """(model, optimizer, scheduler), prepared by the accelerator: fp32 trainable weights, cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    tc = cfg.train
    model = (build_model or default_build_model)(cfg, tokenizer, accelerator.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    upcast_trainable(model)
    optimizer = make_optimizer(model, tc, accelerator.device)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(tc.warmup_ratio * total_steps), total_steps
    )
    return accelerator.prepare(model, optimizer, scheduler)


def _epoch_groups(
    examples: _Examples, tc: TrainConfig, epoch: int, rank: int, world: int
) -> list[list[list[int]]]:
    """This process's accumulation groups of `epoch`: lists of micro-batches of example indices."""
    chosen = epoch_examples(examples.n_rows, tc, epoch)
    batches = [
        [int(chosen[i]) for i in batch]
        for batch in epoch_batches(examples.lengths[chosen], tc, epoch, rank, world)
    ]
    return [batches[i : i + tc.grad_accum] for i in range(0, len(batches), tc.grad_accum)]


class NonFiniteLossError(UsageError):
    """The training loss turned NaN or infinite (float16 overflow, divergence): training stops at that step."""


def _optimizer_step(
    accelerator,
    model,
    optimizer,
    scheduler,
    group,
    examples: _Examples,
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
            f"training stopped at step {state.global_step + 1}: the loss is {loss} (parameters {dtype}, mixed "
            f"precision {accelerator.mixed_precision}); the model overflowed or diverged and no later step would "
            "learn: use model.dtype=float32 (or bfloat16 on a GPU that has it), or a lower train.learning_rate"
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


def _advance_position(state: TrainState, group_index: int, n_groups: int, grad_accum: int) -> None:
    """Where the next step starts: the next group of this epoch, or the first of the next epoch."""
    if group_index == n_groups - 1:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    else:
        state.batch_in_epoch = (group_index + 1) * grad_accum


def _select_shipped_weights(
    selection: str, state: TrainState, checkpointer: Checkpointer, model: nn.Module
) -> tuple[int, float]:
    """(step, its evaluation loss) of the weights that ship; with "inner", the best weights are loaded."""
    if selection == "inner":
        checkpointer.load_best(model, state.best_step)
        return state.best_step, state.best_eval_loss
    last = state.history[-1] if state.history and state.history[-1]["step"] == state.global_step else None
    return state.global_step, last["eval_loss"] if last else math.nan


def _accumulate(
    accelerator, model, group, examples: _Examples, collate, loss_fn: LossFn
) -> tuple[float, int, int]:
    """Forward/backward over one accumulation group; gradients sync across processes on its last batch only.

    Returns the step's loss, real tokens and examples over all processes (the same numbers on every process)."""
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


def _evaluate(
    accelerator,
    model,
    input_ids: list[list[int]],
    pad_token_id: int,
    token_budget: int,
    progress: bool = False,
) -> np.ndarray:
    """Held-out probabilities: each process predicts a contiguous share, gathered in order."""
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


LEARNING_CURVE_FILE = "learning_curve.jsonl"


def _record(state: TrainState, probs, labels, scheduler, wall_time_s: float) -> None:
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
    """`learning_curve.jsonl` in the run folder: one JSON line per evaluation (step, train loss over the window,
    held-out loss with its standard error over rows, accuracy, lr, tokens seen, wall time), rewritten whole
    after each evaluation so that a resumed run's file matches its restored history."""
    text = "".join(json.dumps(entry) + "\n" for entry in history)
    return atomic_write_bytes(Path(out_dir) / LEARNING_CURVE_FILE, text.encode("utf-8"))


@contextlib.contextmanager
def _progress(total: int, initial: int, enabled: bool, fold: int) -> Iterator[Any]:

    bar = progress_bar(
        total=total, initial=initial, desc=f"train fold {fold}", unit="step", enabled=enabled, leave=False
    )
    try:
        yield bar
    finally:
        bar.close()
