"""The trainable model, its optimizer and schedule, and the accelerator they are prepared by.

`default_build_model` builds the ordering's LoRA / QLoRA model (or the full model, `train.method: full`;
unsloth with `train.backend: unsloth`); `make_accelerator` and `prepare_model` set up a run;
`distributed_state` and `finish_distributed` let callers coordinate processes under ``accelerate launch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig, TrainConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.classifier import apply_lora, base_has_weights, build_classifier
from kaggle_utils.models.devices import resolve_dtype

HEAD_MARKER = "modules_to_save"  # peft's name for the fully trained copy of the head

BuildModel = Callable[[PipelineConfig, Any, torch.device], nn.Module]


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


def upcast_trainable(model: nn.Module) -> None:
    """fp32 master copies of what trains (LoRA, head): a 16-bit head cannot be unscaled by the fp16 grad
    scaler and loses small updates in bf16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the head may get its own learning rate; 8-bit on CUDA."""
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


def mixed_precision_for(model: nn.Module, device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    if torch.float16 in dtypes:
        return "fp16"
    if torch.bfloat16 in dtypes:
        return "bf16"
    return "no"


def make_accelerator(cfg: PipelineConfig):
    """CPU or this process's GPU; autocast to the base model's 16-bit dtype on CUDA."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(cfg.model.dtype, "cuda" if cuda else "cpu")
    return Accelerator(
        cpu=not cuda,
        mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if cuda else "no",
        step_scheduler_with_optimizer=False,
    )


def prepare_model(
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


def distributed_state():
    """accelerate's process state (rank, world size, main process, barriers), initialised as `train_fold`'s
    Accelerator will be: under ``accelerate launch`` / ``torchrun`` the process group exists from here on, so
    callers can let the main process alone write the shared files (folds, tokenizer, base, artifacts)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def finish_distributed() -> None:
    """Every process waits for the others, then leaves the process group. A rank that exits while the group is
    still alive (the non-main ranks return as soon as training ends, while the main one exports) can abort at
    interpreter shutdown ("terminate called without an active exception", SIGABRT), failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
