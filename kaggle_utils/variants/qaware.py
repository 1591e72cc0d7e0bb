"""The quantization-aware variants: how each builds its trainable model and what it ships.

Each gives a shipped model and its 16-bit reference, so QiD = log loss(shipped) - log loss(reference)
means the same for every variant (their table: docs/DESIGN_NOTES.md). Importing this module registers them.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.classifier import apply_lora, build_classifier, materialize_base
from kaggle_utils.quant.apiq import ApiQSettings, apiq_initialize, apply_clipping, load_lora_factors
from kaggle_utils.quant.artifacts import load_artifact, save_artifact
from kaggle_utils.quant.backends.bnb import BITSANDBYTES
from kaggle_utils.quant.backends.gptq import GPTQ, gptq_unavailable
from kaggle_utils.quant.backends.int4 import INT4
from kaggle_utils.quant.group_adapters import (
    GroupAdapterSettings,
    GroupPooledAdapterLinear,
    add_group_adapters,
    merge_group_adapters,
)
from kaggle_utils.quant.loftq import apply_loftq
from kaggle_utils.text.encode import encode_rows
from kaggle_utils.variants.registry import VARIANTS, Exported, Variant, merge_lora_fp32, register_variant

HEAD_NAMES = ("score",)


def group_adapter_settings(cfg, kind: str) -> GroupAdapterSettings:
    q = cfg.qaware
    return GroupAdapterSettings(
        kind=kind,
        rank=q.adapter_rank,
        alpha=q.adapter_alpha,
        output_repeat=q.hira_output_repeat,
        dropout=cfg.lora.dropout,
    )


def _fp_classifier(cfg, tokenizer, device) -> nn.Module:
    return build_classifier(
        cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, device=device
    )


def make_group_adapter_builder(kind: str) -> Callable:
    """`build_model` for train_fold: 16-bit base -> group-wise INT4 -> QA-LoRA / QA-HiRA; head in full."""

    def build(cfg, tokenizer, device) -> nn.Module:
        model = _fp_classifier(cfg, tokenizer, device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        INT4.quantize(model, cfg)  # cfg.lora.target_modules -> INT4, cfg.qaware.group_size / int4_method
        add_group_adapters(model, group_adapter_settings(cfg, kind))
        for name, parameter in model.named_parameters():
            if ".lora_" in name or ".hira_" in name or name.split(".")[0] in HEAD_NAMES:
                parameter.requires_grad_(True)
        return model

    return build


def merged_group_adapter_model(trained: nn.Module) -> nn.Module:
    """The shipped model: a copy with every adapter folded into its layer's zero points (plain INT4)."""
    shipped = copy.deepcopy(trained)
    if not merge_group_adapters(shipped):
        raise UsageError("the model has no group-pooled adapters to merge")
    return shipped.eval()


def group_adapter_reference(cfg, trained: nn.Module, tokenizer, device=None) -> nn.Module:
    """16-bit base with each adapter's per-group update added to W and the trained head: the QiD reference."""
    device = device or next(trained.parameters()).device
    reference = _fp_classifier(cfg, tokenizer, device)
    adapters = {
        name: module
        for name, module in trained.named_modules()
        if isinstance(module, GroupPooledAdapterLinear)
    }
    with torch.no_grad():
        for name, adapter in adapters.items():
            linear = reference.get_submodule(name)
            update = adapter.group_update().repeat_interleave(adapter.base.group_size, dim=1)
            linear.weight.add_(update.to(linear.weight))
        for head in HEAD_NAMES:
            reference.get_submodule(head).load_state_dict(trained.get_submodule(head).state_dict())
    return reference.eval()


# -------------------------------------------------------------------------------------------- ApiQ / LoftQ


def apiq_settings(cfg, device) -> object:
    q = cfg.qaware
    return ApiQSettings(
        quantizer="nf4",
        rank=cfg.lora.r,
        alpha=float(cfg.lora.alpha),
        target_modules=tuple(cfg.lora.target_modules),
        epochs=q.apiq_epochs,
        batch_size=q.apiq_batch_size,
        lora_lr=q.apiq_lora_lr,
        clip_lr=q.apiq_clip_lr,
        seed=cfg.train.seed,
        device=str(device),
    )


def make_apiq_builder(calibration_ids: Sequence[Sequence[int]], report: dict | None = None) -> Callable:
    """`build_model` for train_fold: ApiQ fits clipping + LoRA on the 16-bit base block by block, then the
    clipped base is quantized by bitsandbytes (NF4, as QLoRA) and the fitted factors are loaded into peft.
    `report` (optional) receives the per-block errors and the fitting time."""
    if not calibration_ids:
        raise UsageError("ApiQ init needs calibration rows")

    def build(cfg, tokenizer, device) -> nn.Module:
        import dataclasses

        if cfg.lora.frozen_layers:
            raise UsageError("apiq-init fits every decoder block: lora.frozen_layers must be 0")
        fp_model = _fp_classifier(cfg, tokenizer, device).eval()
        result = apiq_initialize(
            fp_model, calibration_ids, tokenizer.pad_token_id, apiq_settings(cfg, device)
        )
        apply_clipping(fp_model, result)
        with tempfile.TemporaryDirectory(prefix="apiq-clipped-") as tmp:
            fp_model.save_pretrained(tmp)
            del fp_model
            base = build_classifier(
                dataclasses.replace(cfg.model, base_model=tmp),
                quant=cfg.quant,
                pad_token_id=tokenizer.pad_token_id,
                device=device,
            )
        model = apply_lora(base, cfg.lora)
        load_lora_factors(model, result)
        if report is not None:
            report["apiq_block_errors"] = result.summary()
            report["apiq_seconds"] = result.seconds
        return model

    return build


def build_loftq_model(cfg, tokenizer, device) -> nn.Module:
    """`build_model` for train_fold: QLoRA (NF4 base) with LoftQ's init, `cfg.qaware.loftq_iterations`
    alternating steps (CPU or CUDA)."""
    import dataclasses

    with tempfile.TemporaryDirectory(prefix="loftq-base-") as tmp:
        base_dir = materialize_base(
            cfg.model, tmp, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
        )
        base = build_classifier(
            dataclasses.replace(cfg.model, base_model=str(base_dir)),
            quant=cfg.quant,
            pad_token_id=tokenizer.pad_token_id,
            device=device,
        )
        model = apply_lora(base, cfg.lora)
        apply_loftq(model, Path(base_dir), iterations=cfg.qaware.loftq_iterations)
    return model


def calibration_rows(train_frame, tokenizer, cfg, n_rows: int, seed: int = 0) -> list[list[int]]:
    """`n_rows` encoded training rows (never held-out ones: the caller passes the training part)."""
    n_rows = min(n_rows, train_frame.height)
    sample = (
        train_frame.sample(n=n_rows, seed=seed, shuffle=True) if n_rows < train_frame.height else train_frame
    )
    return list(encode_rows(sample, tokenizer, cfg.format).input_ids)


# ------------------------------------------------------------------------------------------------ registry


def _configure_scheme(scheme: str) -> Callable:
    def configure(cfg):
        cfg.quant.scheme = scheme
        return cfg

    return configure


def _group_adapter_export(ctx):
    """Merge into the zero points, ship plain INT4, reload it from disk; the unmerged model is scored too, so
    the report shows the merge's exactness (max |p_unmerged - p_shipped|)."""
    cfg, tokenizer, device = ctx.cfg, ctx.fold_ctx.tokenizer, ctx.fold_ctx.device
    trained = ctx.result.model.eval()
    save_artifact(
        ctx.artifact_dir, merged_group_adapter_model(trained), tokenizer, ctx.manifest_fields, cfg.format
    )
    shipped = load_artifact(
        ctx.artifact_dir, device=device, compute_dtype=next(trained.parameters()).dtype, verify_hashes=False
    ).model  # written just above
    reference = group_adapter_reference(cfg, trained, tokenizer, device)
    return Exported(
        artifact_dir=ctx.artifact_dir,
        reference_model=reference,
        shipped_model=shipped,
        extra_models={"unmerged-adapter": trained},
    )


def _configure_gptq(bits: int) -> Callable:
    def configure(cfg):
        cfg.qaware.gptq_bits = bits
        return cfg

    return configure


def _gptq_builder(ctx):
    """The ft-then-quant builder, with GPTQ's group size checked against the model's layer widths before any
    training (a width the group size does not divide would fail only at export, after the whole fold)."""
    build = VARIANTS["ft-then-quant"].builder(ctx)

    def build_checked(cfg, tokenizer, device):
        model = build(cfg, tokenizer, device)
        config = model.config
        heads = getattr(config, "num_attention_heads", 1)
        widths = {
            config.hidden_size,
            getattr(config, "intermediate_size", config.hidden_size),
            heads * (getattr(config, "head_dim", None) or config.hidden_size // heads),
        }
        bad = sorted(width for width in widths if width % cfg.qaware.gptq_group_size)
        if bad:
            raise UsageError(
                f"qaware.gptq_group_size {cfg.qaware.gptq_group_size} must divide every layer's "
                f"in_features (not {bad}): set a divisor, e.g. --set qaware.gptq_group_size=32"
            )
        return model

    return build_checked


def _export_gptq(ctx):
    """Merge the LoRA in fp32, GPTQ a copy calibrated on `qaware.gptq_rows` rows of this fold's training part
    (never held-out rows), ship it; the fp32 merged model is the reference, as for ft-then-quant."""
    cfg, tokenizer, device = ctx.cfg, ctx.fold_ctx.tokenizer, ctx.fold_ctx.device
    merged = merge_lora_fp32(ctx.result.model).eval()
    rows = calibration_rows(
        ctx.fold_ctx.train_frame, tokenizer, cfg, cfg.qaware.gptq_rows, seed=ctx.fold_ctx.seed
    )
    quantized = GPTQ.quantize(
        copy.deepcopy(merged),
        cfg,
        device=device,
        work_dir=ctx.artifact_dir.parent,
        calibration_ids=rows,
        tokenizer=tokenizer,
    )
    ctx.fold_ctx.notes["gptq_calibration_rows"] = len(rows)
    save_artifact(ctx.artifact_dir, quantized, tokenizer, ctx.manifest_fields, cfg.format)
    del quantized
    return Exported(artifact_dir=ctx.artifact_dir, reference_model=merged)


def _configure_full(cfg):
    cfg.train.method = "full"
    return cfg


def _export_full_then_quant(ctx):
    """Fine-tune -> quantize with the merge skipped: the fully trained model itself (fp32) is quantized
    (`quant.scheme`, bitsandbytes) and shipped; that fp32 model is the QiD reference."""
    trained = ctx.result.model
    if hasattr(trained, "peft_config"):
        raise UsageError(
            "full-then-quant expects a fully fine-tuned model (train.method 'full'), got a peft model"
        )
    reference = trained.float().eval()
    quantized = BITSANDBYTES.quantize(
        reference, ctx.cfg, device=ctx.fold_ctx.device, work_dir=ctx.artifact_dir.parent
    )
    save_artifact(ctx.artifact_dir, quantized, ctx.fold_ctx.tokenizer, ctx.manifest_fields, ctx.cfg.format)
    del quantized
    return Exported(artifact_dir=ctx.artifact_dir, reference_model=reference)


def _apiq_builder(ctx):
    rows = calibration_rows(ctx.train_frame, ctx.tokenizer, ctx.cfg, ctx.cfg.qaware.apiq_rows, seed=ctx.seed)
    return make_apiq_builder(rows, ctx.notes)


def _scheme_variants(base_ft: Variant, base_qlora: Variant) -> list[Variant]:
    """Both orderings with each bitsandbytes scheme pinned (int8 / nf4)."""
    variants = []
    for scheme, label in (("int8", "8-bit LLM.int8"), ("nf4", "4-bit NF4")):
        variants.append(
            Variant(
                name=f"ft-then-quant-{scheme}",
                ordering="ft-then-quant",
                description=f"LoRA on the 16-bit base; merge; quantize the merged model to {label} "
                "(bitsandbytes)",
                builder=base_ft.builder,
                export=base_ft.export,
                configure=_configure_scheme(scheme),
                common_reference=base_ft.common_reference,  # the same 16-bit LoRA model, merged in fp32
            )
        )
        variants.append(
            Variant(
                name=f"quant-then-ft-{scheme}",
                ordering="quant-then-ft",
                description=f"QLoRA: LoRA on the {label} bitsandbytes base; ship base + unmerged adapter",
                builder=base_qlora.builder,
                export=base_qlora.export,
                configure=_configure_scheme(scheme),
            )
        )
    return variants


def _init_variants(base_qlora: Variant) -> list[Variant]:
    """QLoRA (NF4) with a fitted start: ApiQ and LoftQ."""
    return [
        Variant(
            name="apiq-init",
            ordering="quant-then-ft",
            description="QLoRA (NF4) whose base clipping and LoRA start are fitted block by block to "
            "reproduce the 16-bit blocks' outputs (ApiQ-style); ship base + unmerged adapter",
            builder=_apiq_builder,
            export=base_qlora.export,
            configure=_configure_scheme("nf4"),
        ),
        Variant(
            name="loftq",
            ordering="quant-then-ft",
            description="QLoRA (NF4) with LoftQ's init: base and LoRA fitted to the 16-bit weights "
            "(qaware.loftq_iterations alternating steps)",
            builder=lambda ctx: build_loftq_model,
            export=base_qlora.export,
            configure=_configure_scheme("nf4"),
        ),
    ]


def _ft_then_quant_variants(base_ft: Variant) -> list[Variant]:
    """Fine-tune -> quantize with GPTQ (8 / 4 bits), and with full fine-tuning instead of LoRA."""
    gptq = [
        Variant(
            name=f"ft-then-quant-gptq{bits}",
            ordering="ft-then-quant",
            description=f"LoRA on the 16-bit base; merge; GPTQ {bits}-bit weights (llmcompressor, "
            "calibrated on the fold's training rows; compressed-tensors artifact)",
            builder=_gptq_builder,
            export=_export_gptq,
            configure=_configure_gptq(bits),
            unavailable=gptq_unavailable,
            common_reference=base_ft.common_reference,
        )
        for bits in (8, 4)
    ]
    full = Variant(
        name="full-then-quant",
        ordering="ft-then-quant",
        description="full fine-tuning (every weight trainable, no adapter); quantize the trained model "
        "(quant.scheme, bitsandbytes)",
        builder=base_ft.builder,
        export=_export_full_then_quant,
        configure=_configure_full,
    )
    return [*gptq, full]


def _group_adapter_variants() -> list[Variant]:
    """QA-LoRA / QA-HiRA on a group-wise INT4 base, folded into the zero points."""
    return [
        Variant(
            name=f"{kind}-merged",
            ordering="quant-then-ft",
            description=f"{kind.upper()} adapter on a group-wise asymmetric INT4 base, folded into the "
            "zero points: ships plain INT4, no adapter",
            builder=lambda ctx, kind=kind: make_group_adapter_builder(kind),
            export=_group_adapter_export,
        )
        for kind in ("qa-lora", "qa-hira")
    ]


def register_all() -> None:
    """Register this module's variants (idempotent: re-registering replaces them)."""
    base_ft, base_qlora = VARIANTS["ft-then-quant"], VARIANTS["quant-then-ft"]
    for variant in (
        *_scheme_variants(base_ft, base_qlora),
        *_init_variants(base_qlora),
        *_ft_then_quant_variants(base_ft),
        *_group_adapter_variants(),
    ):
        register_variant(variant, replace=True)


QAWARE_VARIANTS: tuple[str, ...] = (
    "ft-then-quant-int8",
    "ft-then-quant-nf4",
    "quant-then-ft-int8",
    "quant-then-ft-nf4",
    "apiq-init",
    "loftq",
    "qa-lora-merged",
    "qa-hira-merged",
    "ft-then-quant-gptq8",
    "ft-then-quant-gptq4",
    "full-then-quant",
)


register_all()
