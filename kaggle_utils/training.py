"""The training loop: one fold, either ordering, resumable after interruption, on accelerate.

A lean loop rather than the HF Trainer because the parts that matter here are explicit and tested: the
A/B-swap augmentation (`TrainConfig.swap_augment`), length-bucketed batches, which weights ship, and an exact
resume. Multi-GPU runs go through ``accelerate launch`` (DDP); each process takes every world-size-th batch and
evaluates a contiguous share of the evaluated rows. The main process alone writes checkpoints (each process adds
its RNG state) and best weights; the logged loss and `tokens_seen` are reduced over processes, so they describe
the global batch once. Two CPU processes (gloo) reproduce one process with the same global batch
(tests/test_training_multiprocess.py).

Which weights ship (`TrainConfig.selection`): "final" (default; the winners shipped the model after one epoch)
or "inner", the best of the evaluations on an inner holdout carved from the training part by prompt group. The
held-out fold whose score is reported as CV is never used to choose: it is scored once, after training, by the
shipped weights. (Choosing the best of many evaluations on that same fold made the CV optimistic.) Evaluations
during training are bounded: `evals_per_run` of them, each on at most `eval_rows_cap` rows (the inner holdout,
or with "final" a fixed sample of the held-out fold that only draws the learning curve).

Resume: every `save_every_steps` optimizer steps a checkpoint is written (atomically: a temp directory renamed
into place) with accelerate's `save_state` (optimizer, LR scheduler, grad scaler, Python/NumPy/torch/CUDA RNG
states) holding only the trainable weights (LoRA + head: megabytes, not the frozen 9B base), plus
`trainer_state.json` (optimizer step, epoch, position in the epoch's batch order, history, best so far). The
batch order of an epoch is a pure function of (seed, epoch), so a resumed run re-creates it and skips what
was done: on CPU, resuming gives the same step and bit-identical weights as an uninterrupted run.

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
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from kaggle_utils.batching import LengthBucketSampler, PadCollator
from kaggle_utils.config import PipelineConfig, TrainConfig
from kaggle_utils.devices import resolve_dtype
from kaggle_utils.errors import DataError, UsageError
from kaggle_utils.folds import check_folds
from kaggle_utils.formatting import TEMPLATE_VERSION, encode_both_orders, encode_rows
from kaggle_utils.metrics import class_prior, log_loss, prior_log_loss
from kaggle_utils.modeling import (
    apply_lora,
    base_has_weights,
    build_classifier,
    count_parameters,
    predict_probs,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS = "trainable.safetensors"
BEST_PROBS = "val_probs.npy"
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
    val_probs: np.ndarray  # the returned model's probabilities on the whole held-out fold (no TTA), scored once
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
            "history": self.history,
        }


@dataclass
class _State:
    """Everything besides tensors a resumed run needs (saved as trainer_state.json)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (always a whole accumulation group)
    tokens_seen: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    loss_sum: float = 0.0  # since the last history entry
    loss_count: int = 0
    best_step: int = -1
    best_eval_loss: float = math.inf
    history: list[dict] = field(default_factory=list)
    fingerprint: str = ""  # what the run is (config, fold, rows): a checkpoint of another run is never resumed


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
        raise DataError(f"training frame: {len(unlabelled)} rows have no label (ids {unlabelled.head(5).to_list()})")
    joined = frame.join(folds.select("id", "fold"), on="id", how="left", maintain_order="left")
    val = joined.filter(pl.col("fold") == fold).drop("fold")
    train = joined.filter(pl.col("fold") != fold).drop("fold")
    if val.is_empty() or train.is_empty():
        raise DataError(f"fold {fold} leaves {train.height} training and {val.height} held-out rows of the frame")
    return train, val


def split_inner(train_part: pl.DataFrame, folds: pl.DataFrame, cfg: TrainConfig
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
    groups = train_part.select("id").join(folds.select("id", "group"), on="id", how="left", maintain_order="left")
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

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def _training_examples(frame: pl.DataFrame, tokenizer, cfg: PipelineConfig) -> _Examples:
    """Encoded training rows; with swap augmentation ("double" or "random") followed by their A/B-swapped
    copies (labels swapped), so example i + n is row i swapped. Which of them an epoch uses: `epoch_examples`."""
    mode = _swap_mode(cfg.train)
    if mode != "none":
        original, swapped = encode_both_orders(frame, tokenizer, cfg.format)
        logger.info("train encoding: %s", original.summary())
        return _Examples(original.input_ids + swapped.input_ids, np.concatenate([original.labels, swapped.labels]))
    original = encode_rows(frame, tokenizer, cfg.format)
    logger.info("train encoding: %s", original.summary())
    return _Examples(original.input_ids, original.labels)


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


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
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


def run_fingerprint(cfg: PipelineConfig, fold: int, train_ids: list, total_steps: int) -> str:
    """sha256 over what determines a run's trajectory: the format/model/LoRA/quant/train settings, the
    template version, the fold, the training row ids and the planned steps."""
    import hashlib

    relevant = {name: getattr(cfg, name) for name in ("format", "model", "lora", "quant", "train")}
    payload = json.dumps({"sections": {k: asdict(v) for k, v in relevant.items()}, "fold": fold,
                          "template_version": TEMPLATE_VERSION,
                          "train_ids": [str(i) for i in train_ids], "total_steps": total_steps},
                         sort_keys=True, default=str)
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
    the NF4 base (quant-then-ft); through unsloth when `cfg.train.backend == "unsloth"`."""
    if cfg.train.backend == "unsloth":
        return build_unsloth_classifier(cfg, tokenizer, device)
    if cfg.train.backend != "hf":
        raise UsageError(f"train.backend must be 'hf' or 'unsloth', got {cfg.train.backend!r}")
    quant = cfg.quant if cfg.train.ordering == "quant-then-ft" else None
    if cfg.train.ordering not in ("ft-then-quant", "quant-then-ft"):
        raise UsageError(f"train.ordering must be 'ft-then-quant' or 'quant-then-ft', got {cfg.train.ordering!r}")
    base = build_classifier(
        cfg.model, quant=quant, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, device=device
    )
    return apply_lora(base, cfg.lora)


def build_unsloth_classifier(cfg: PipelineConfig, tokenizer, device: torch.device) -> nn.Module:
    """unsloth's fast LoRA/QLoRA path: `FastLanguageModel.from_pretrained(..., num_labels=3)` on CUDA only."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UsageError(
            "train.backend='unsloth' needs a CUDA GPU: on CPU unsloth only builds a causal LM "
            "(AutoModelForCausalLM, no classification head). Use train.backend='hf' here."
        )
    if not base_has_weights(cfg.model.base_model):
        raise UsageError("train.backend='unsloth' loads a checkpoint directory; materialize random bases first")
    try:
        from unsloth import FastLanguageModel
    except ImportError as error:
        raise UsageError(f"train.backend='unsloth' but unsloth is not importable ({error}); "
                         "install requirements-gpu.txt") from error
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


def check_unsloth_head_roundtrip(model: nn.Module, tokenizer, out_dir: str | Path, probe: list[list[int]]) -> dict:
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
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out_dir), local_files_only=True,
                                                                  device_map={"": str(_device_of(model))})
    return verify_reloaded_classifier(reloaded, trained_head, expected, num_labels, probe, tokenizer.pad_token_id,
                                      source=str(out_dir))


def verify_reloaded_classifier(reloaded: nn.Module, trained_head: torch.Tensor, expected_probs: np.ndarray,
                               num_labels: int, probe: list[list[int]], pad_token_id: int,
                               source: str = "reloaded model", head_atol: float = HEAD_ROUNDTRIP_HEAD_ATOL,
                               probs_atol: float = HEAD_ROUNDTRIP_PROBS_ATOL) -> dict:
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
        problems.append(f"score head differs from the trained one by {head_difference:.3g} > {head_atol:g} "
                        "(dropped on save?)")
    got = predict_probs(reloaded, probe, pad_token_id)
    probs_difference = float(np.abs(got - expected_probs).max()) if got.shape == expected_probs.shape else math.inf
    if not probs_difference <= probs_atol:
        problems.append(f"probabilities on the probe rows differ by {probs_difference:.3g} > {probs_atol:g}")
    if problems:
        raise UsageError(f"{source}: the saved classifier does not reproduce the trained one: " + "; ".join(problems))
    return {"num_labels": reloaded.config.num_labels, "head_max_abs_diff": head_difference,
            "probs_max_abs_diff": probs_difference}


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
            (head if HEAD_MARKER in name else body).append(param)
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


def train_fold(
    cfg: PipelineConfig,
    train_frame: pl.DataFrame,
    folds: pl.DataFrame,
    tokenizer,
    out_dir: str | Path,
    *,
    fold: int | None = None,
    build_model: BuildModel | None = None,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on every fold but `fold` (default `cfg.train.fold`); ship the weights `cfg.train.selection` picks
    (the final step's, or the best on an inner holdout of the training part); score `fold` once, with them.

    `build_model(cfg, tokenizer, device)` makes the trainable model (default: `default_build_model`, i.e. the
    ordering's LoRA / QLoRA); the variant registry in compare.py passes its own. With `resume`, the newest
    complete checkpoint under `out_dir/checkpoints` is continued. `on_step(step)` runs after every optimizer
    step (after that step's evaluation and checkpoint): progress hooks, and the tests' simulated crash.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    tc = cfg.train
    fold = tc.fold if fold is None else fold
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tc.grad_accum < 1 or tc.per_device_batch_size < 1:
        raise UsageError("train.grad_accum and train.per_device_batch_size must be >= 1")
    if tc.save_every_steps < 1:
        raise UsageError("train.save_every_steps must be >= 1")
    if tc.selection not in ("final", "inner"):
        raise UsageError(f"train.selection must be 'final' or 'inner', got {tc.selection!r}")
    if tc.eval_rows_cap < 0:
        raise UsageError(f"train.eval_rows_cap must be >= 0, got {tc.eval_rows_cap}")

    train_part, val_part = split_fold(train_frame, folds, fold)
    val = encode_rows(val_part, tokenizer, cfg.format)
    val_labels = np.asarray(val.labels, dtype=np.int64)
    if tc.selection == "inner":
        # Weights are chosen on rows of the training part, never on the fold whose score is reported.
        train_part, inner_part = split_inner(train_part, folds, tc)
        monitor = encode_rows(inner_part, tokenizer, cfg.format)
        monitor_ids, monitor_labels = monitor.input_ids, np.asarray(monitor.labels, dtype=np.int64)
        eval_set = f"inner holdout ({inner_part.height} training rows)"
    else:
        # Learning curve only: a fixed sample of the held-out fold, never used to choose weights.
        picked = monitor_sample(len(val.input_ids), tc.eval_rows_cap, tc.seed)
        monitor_ids, monitor_labels = [val.input_ids[i] for i in picked], val_labels[picked]
        eval_set = f"held-out fold sample ({len(picked)} rows, learning curve only)"
    examples = _training_examples(train_part, tokenizer, cfg)
    n_train_rows = train_part.height
    prior = prior_log_loss(val_labels, class_prior(np.asarray(train_part["label"].to_numpy(), dtype=np.int64)))

    # The accelerator first: under `accelerate launch` it binds this process to its GPU.
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if cuda else "cpu")
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if cuda else "no",
        step_scheduler_with_optimizer=False,
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    set_seed(tc.seed)
    model = (build_model or default_build_model)(cfg, tokenizer, device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    upcast_trainable(model)
    total_steps = planned_steps(examples_per_epoch(n_train_rows, tc), tc, world)
    interval = eval_interval(total_steps, tc)
    optimizer = make_optimizer(model, tc, device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(tc.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable_names = {name for name, param in model.named_parameters() if param.requires_grad}
    _register_trainable_only_checkpoints(accelerator, trainable_names)

    fingerprint = run_fingerprint(cfg, fold, train_part["id"].to_list(), total_steps)
    state, resumed_from = _State(fingerprint=fingerprint), None
    latest = _latest_checkpoint(out_dir) if resume else None
    if latest is not None:
        saved = _State(**json.loads((latest / STATE_FILE).read_text(encoding="utf-8")))
        if saved.fingerprint != fingerprint:
            raise UsageError(
                f"{latest} is a checkpoint of a different run (config, fold or training rows differ); "
                "resume with the same settings, pass resume=False to start over, or use another output directory"
            )
        accelerator.load_state(str(latest))
        state = saved
        resumed_from = state.global_step
        if accelerator.is_main_process:
            _prune_best(out_dir, keep={state.best_step}, newer_than=state.global_step)
        logger.info("resuming fold %d from %s (step %d of %d)", fold, latest, state.global_step, total_steps)
    elif resume is False and (out_dir / CHECKPOINTS_DIR).exists() and accelerator.is_main_process:
        shutil.rmtree(out_dir / CHECKPOINTS_DIR)
    if resume is False and (out_dir / BEST_DIR).exists() and accelerator.is_main_process:
        shutil.rmtree(out_dir / BEST_DIR)
    accelerator.wait_for_everyone()  # no process writes a checkpoint before the main one has cleared them

    collate = PadCollator(tokenizer.pad_token_id)
    lengths = examples.lengths
    session_start = time.perf_counter()
    wall_at_start = state.wall_time_s
    trainable_params, total_params = count_parameters(accelerator.unwrap_model(model))
    checkpointed_best = state.best_step  # the best the latest checkpoint refers to: kept until superseded there
    model.train()
    progress = progress and accelerator.is_main_process  # one bar, not one per process
    with PeakMemory(device) as memory, _progress(total_steps, state.global_step, progress, fold) as bar:
        while state.global_step < total_steps:
            chosen = epoch_examples(n_train_rows, tc, state.epoch)
            batches = [[int(chosen[i]) for i in batch]
                       for batch in epoch_batches(lengths[chosen], tc, state.epoch, rank, world)]
            groups = [batches[i : i + tc.grad_accum] for i in range(0, len(batches), tc.grad_accum)]
            first_group = state.batch_in_epoch // tc.grad_accum
            for group_index in range(first_group, len(groups)):
                step_began = time.perf_counter()
                loss_value, tokens = _accumulate(accelerator, model, groups[group_index], examples, collate, device)
                if tc.max_grad_norm and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.train_time_s += time.perf_counter() - step_began
                state.global_step += 1
                state.tokens_seen += tokens
                state.loss_sum += loss_value
                state.loss_count += 1
                last_of_epoch = group_index == len(groups) - 1
                state.epoch, state.batch_in_epoch = (
                    (state.epoch + 1, 0) if last_of_epoch else (state.epoch, (group_index + 1) * tc.grad_accum)
                )
                step = state.global_step
                finished = step >= total_steps
                if len(monitor_ids) and (step % interval == 0 or finished):
                    probs = _evaluate(accelerator, model, monitor_ids, tokenizer.pad_token_id, tc.eval_token_budget,
                                      progress)
                    _record(state, step, probs, monitor_labels, scheduler, session_start, wall_at_start)
                    if tc.selection == "inner" and state.history[-1]["eval_loss"] < state.best_eval_loss:
                        state.best_eval_loss, state.best_step = state.history[-1]["eval_loss"], step
                        _save_best(accelerator, model, trainable_names, probs, out_dir, step, state.best_eval_loss,
                                   keep=checkpointed_best)
                    model.train()
                state.wall_time_s = wall_at_start + time.perf_counter() - session_start
                if step % tc.save_every_steps == 0 or finished:
                    _save_checkpoint(accelerator, state, out_dir)
                    checkpointed_best = state.best_step
                    if accelerator.is_main_process:
                        _prune_best(out_dir, keep={state.best_step})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", best=f"{state.best_eval_loss:.4f}")
                if on_step is not None:
                    on_step(step)
                if finished:
                    break

    accelerator.wait_for_everyone()  # best/ is written by the main process
    unwrapped = accelerator.unwrap_model(model)
    if tc.selection == "inner":
        _load_best(unwrapped, out_dir, state.best_step)
        selected_step, selected_loss = state.best_step, state.best_eval_loss
    else:
        selected_step = state.global_step
        last = state.history[-1] if state.history and state.history[-1]["step"] == selected_step else None
        selected_loss = last["eval_loss"] if last else math.nan
    unwrapped.eval()
    # The one score of the reported fold, by the weights that ship.
    val_probs = _evaluate(accelerator, unwrapped, val.input_ids, tokenizer.pad_token_id, tc.eval_token_budget,
                          progress)
    return TrainResult(
        model=unwrapped,
        fold=fold,
        ordering=tc.ordering,
        best_step=selected_step,
        best_eval_loss=selected_loss,
        selection=tc.selection,
        eval_set=eval_set,
        global_step=state.global_step,
        total_steps=total_steps,
        history=state.history,
        val_ids=list(val.ids),
        val_labels=val_labels,
        val_probs=val_probs,
        prior_log_loss=prior,
        train_rows=n_train_rows,
        train_examples=examples_per_epoch(n_train_rows, tc),
        trainable_params=trainable_params,
        total_params=total_params,
        wall_time_s=state.wall_time_s,
        train_time_s=state.train_time_s,
        tokens_seen=state.tokens_seen,
        peak_rss_bytes=memory.peak_rss_bytes,
        peak_cuda_bytes=memory.peak_cuda_bytes,
        resumed_from_step=resumed_from,
        out_dir=out_dir,
    )


def _accumulate(accelerator, model, group, examples: _Examples, collate, device) -> tuple[float, int]:
    """Forward/backward over one accumulation group; gradients sync across processes on its last batch only.

    Returns the step's loss and real tokens over all processes (the same numbers on every process)."""
    total_loss, tokens = 0.0, 0
    for index, rows in enumerate(group):
        batch = collate([{"input_ids": examples.input_ids[row], "labels": int(examples.labels[row])} for row in rows])
        batch = {key: value.to(device) for key, value in batch.items()}
        sync = index == len(group) - 1
        with contextlib.ExitStack() as stack:
            if not sync:
                stack.enter_context(accelerator.no_sync(model))
            with accelerator.autocast():
                loss = model(**batch).loss / len(group)
            accelerator.backward(loss)
        total_loss += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    if accelerator.num_processes > 1:
        # Every process saw its own micro-batches: the step's tokens are their sum, its loss their mean (what
        # DDP's averaged gradient descends), so tokens_seen and tokens/s count the global batch once.
        both = accelerator.reduce(torch.tensor([total_loss, float(tokens)], dtype=torch.float64, device=device),
                                  reduction="sum")
        total_loss, tokens = float(both[0]) / accelerator.num_processes, int(round(float(both[1])))
    return total_loss, tokens


def _evaluate(accelerator, model, input_ids: list[list[int]], pad_token_id: int, token_budget: int,
              progress: bool = False) -> np.ndarray:
    """Held-out probabilities: each process predicts a contiguous share, gathered in order."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    share = -(-len(input_ids) // world)
    local = predict_probs(accelerator.unwrap_model(model), input_ids[rank * share : (rank + 1) * share], pad_token_id,
                          token_budget=token_budget, progress=progress and accelerator.is_main_process)
    if world == 1:
        return local
    return np.concatenate([part for part in gather_object([local]) if len(part)])


def _record(state: _State, step: int, probs, labels, scheduler, session_start: float, wall_at_start: float) -> None:
    state.history.append({
        "step": step,
        "train_loss": state.loss_sum / max(state.loss_count, 1),
        "eval_loss": log_loss(labels, probs),
        "eval_accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "lr": float(scheduler.get_last_lr()[0]),
        "wall_time_s": wall_at_start + time.perf_counter() - session_start,
    })
    state.loss_sum, state.loss_count = 0.0, 0


def _register_trainable_only_checkpoints(accelerator, names: set[str]) -> None:
    """Checkpoints carry only the trainable tensors; loading puts them back into the already-built model."""
    from safetensors.torch import load_file

    # Names as the unwrapped model has them: under DDP the prepared model's parameters are "module."-prefixed
    # but accelerate saves the unwrapped state dict (filtering by the prefixed names kept nothing).
    names = {name.removeprefix("module.") for name in names}

    def save_hook(models, weights, output_dir):
        for index in range(len(weights)):
            weights[index] = {k: v for k, v in weights[index].items() if k.removeprefix("module.") in names}

    def load_hook(models, input_dir):
        for index, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            tensors = {k.removeprefix("module."): v
                       for k, v in load_file(str(file), device=str(_device_of(model))).items()}
            result = model.load_state_dict(tensors, strict=False)
            absent = names - set(tensors)
            if result.unexpected_keys or absent:
                raise UsageError(f"checkpoint {input_dir} does not match the model "
                                 f"(unexpected {result.unexpected_keys[:3]}, missing {sorted(absent)[:3]})")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _save_checkpoint(accelerator, state: _State, out_dir: Path) -> None:
    root = out_dir / CHECKPOINTS_DIR
    final = root / f"step-{state.global_step:07d}"
    staging = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the rename
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _latest_checkpoint(out_dir: Path) -> Path | None:
    complete = [p for p in (out_dir / CHECKPOINTS_DIR).glob("step-*") if (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: p.name) if complete else None


def _best_dir(out_dir: Path, step: int) -> Path:
    return out_dir / BEST_DIR / f"step-{step:07d}"


def _save_best(accelerator, model, names: set[str], probs: np.ndarray, out_dir: Path, step: int, loss: float,
               keep: int) -> None:
    """Write the new best trainable weights (and their held-out probabilities) as best/step-N.

    The best that the latest checkpoint refers to (`keep`) stays until a newer checkpoint supersedes it, so a
    run resumed from that checkpoint finds the weights its state names, whatever happened after it.
    """
    from safetensors.torch import save_file

    if not accelerator.is_main_process:
        return
    target = _best_dir(out_dir, step)
    staging = target.parent / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    unwrapped_names = {name.removeprefix("module.") for name in names}
    tensors = {k: v.detach().contiguous().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()
               if k in unwrapped_names}
    save_file(tensors, str(staging / BEST_WEIGHTS))
    np.save(staging / BEST_PROBS, probs)
    (staging / "best.json").write_text(json.dumps({"step": step, "eval_loss": loss}), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _prune_best(out_dir, keep={step, keep})


def _prune_best(out_dir: Path, keep: set[int], newer_than: int | None = None) -> None:
    """Remove best/step-N directories not in `keep` (with `newer_than`: only those after that step)."""
    for path in (out_dir / BEST_DIR).glob("*step-*"):
        try:
            step = int(path.name.lstrip(".").split("step-")[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if step in keep and path.name.startswith("step-"):
            continue
        if newer_than is None or step > newer_than or not path.name.startswith("step-"):
            shutil.rmtree(path, ignore_errors=True)


def _load_best(model: nn.Module, out_dir: Path, step: int) -> np.ndarray:
    from safetensors.torch import load_file

    best = _best_dir(out_dir, step)
    if not (best / BEST_WEIGHTS).is_file():
        raise UsageError(f"{best} is missing: the best weights of step {step} were not kept (was {out_dir} "
                         "edited while the run was stopped?)")
    tensors = load_file(str(best / BEST_WEIGHTS), device=str(_device_of(model)))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise UsageError(f"{best}: weights do not match the model ({result.unexpected_keys[:3]})")
    return np.load(best / BEST_PROBS)


@contextlib.contextmanager
def _progress(total: int, initial: int, enabled: bool, fold: int) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=f"train fold {fold}", unit="step", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()
