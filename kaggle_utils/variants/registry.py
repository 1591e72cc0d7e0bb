"""The variant registry compare-orderings runs from, with the two orderings' own variants.

A `Variant` names its ordering and supplies `builder(ctx) -> build_model` and `export(ctx) -> Exported`;
`register_variant(Variant(...))` makes it runnable by name (`variants/qaware.py` adds more).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from peft import PeftModel
from torch import nn

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.registry import Registry
from kaggle_utils.models.classifier import build_classifier
from kaggle_utils.models.quantized import merge_adapter_into_quantized
from kaggle_utils.quant.artifacts import attach_merged_copy, load_artifact, save_artifact
from kaggle_utils.quant.backends.bnb import BITSANDBYTES
from kaggle_utils.train.model_setup import BuildModel, default_build_model
from kaggle_utils.train.results import TrainResult

ORDERINGS: tuple[str, str] = ("ft-then-quant", "quant-then-ft")


@dataclass
class FoldContext:
    """What a variant may use to build its trainable model for one fold."""

    cfg: PipelineConfig
    fold: int
    seed: int
    train_frame: pl.DataFrame  # this fold's training rows only (never the held-out ones)
    tokenizer: Any
    base_dir: Path  # the 16-bit base checkpoint every variant starts from
    device: torch.device
    notes: dict = field(default_factory=dict)  # variant-specific numbers for the report


@dataclass
class ExportContext:
    """What a variant's `export` gets: the fold, the training result and where to write the artifact."""

    fold_ctx: FoldContext
    result: TrainResult
    artifact_dir: Path
    manifest_fields: dict  # ordering, variant, base_model, folds_file_hash, cv_scores, class_prior

    @property
    def cfg(self) -> PipelineConfig:
        return self.fold_ctx.cfg


@dataclass
class Exported:
    """What a variant ships, and the 16-bit model its QiD is measured against."""

    artifact_dir: Path | None
    reference_model: nn.Module
    shipped_model: nn.Module | None = None  # None: loaded back from artifact_dir with artifacts.load_artifact
    extra_models: dict[str, nn.Module] = field(
        default_factory=dict
    )  # scored too, e.g. {"merged-into-nf4": m}


@dataclass(frozen=True)
class Variant:
    """A registry entry: how one variant builds its trainable model per fold and what it ships."""

    name: str
    ordering: str  # "ft-then-quant" | "quant-then-ft"
    description: str
    builder: Callable[[FoldContext], BuildModel]
    export: Callable[[ExportContext], Exported]
    configure: Callable[[PipelineConfig], PipelineConfig] | None = None
    # Why the variant cannot run on this machine, or None when it can. Checked before any training: an
    # unavailable variant is skipped and listed in the report, the others still run.
    unavailable: Callable[[], str | None] | None = None
    # True when the variant trains ft-then-quant's 16-bit LoRA with the default builder and its
    # `Exported.reference_model` is that LoRA merged in fp32: the common reference every variant's shipped
    # loss is compared with (`qid_vs_common`).
    common_reference: bool = False


VARIANTS: Registry[Variant] = Registry("variant")


def register_variant(variant: Variant, replace: bool = False) -> Variant:
    """Make `variant` runnable by name (`compare-orderings --variants`); a same-named one needs `replace`."""
    if variant.ordering not in ORDERINGS:
        raise UsageError(
            f"variant {variant.name!r}: ordering must be one of {ORDERINGS}, got {variant.ordering!r}"
        )
    return VARIANTS.register(variant, replace=replace)


def _default_builder(ctx: FoldContext) -> BuildModel:
    return default_build_model


def merge_lora_fp32(peft_model) -> nn.Module:
    """Fold the LoRA into the base in fp32 and return the merged fp32 model (consumes `peft_model`).

    Adding a small LoRA update to bf16 weights rounds part of it away; this merged model is both what
    ft-then-quant quantizes and the common QiD reference of every variant, so it is merged exactly.
    """
    return peft_model.float().merge_and_unload()


def _export_ft_then_quant(ctx: ExportContext) -> Exported:
    """Merge the LoRA into the 16-bit weights, quantize the merged model (cfg.quant.scheme), ship it."""
    merged = merge_lora_fp32(ctx.result.model)
    quantized = BITSANDBYTES.quantize(
        merged, ctx.cfg, device=ctx.fold_ctx.device, work_dir=ctx.artifact_dir.parent
    )
    save_artifact(ctx.artifact_dir, quantized, ctx.fold_ctx.tokenizer, ctx.manifest_fields, ctx.cfg.format)
    del quantized
    return Exported(artifact_dir=ctx.artifact_dir, reference_model=merged.eval())


def _export_quant_then_ft(ctx: ExportContext) -> Exported:
    """Ship the quantized base exactly as trained on plus the unmerged adapter; optionally a merged copy."""
    tokenizer = ctx.fold_ctx.tokenizer
    save_artifact(ctx.artifact_dir, ctx.result.model, tokenizer, ctx.manifest_fields, ctx.cfg.format)
    base16 = build_classifier(
        dataclasses.replace(ctx.cfg.model, base_model=str(ctx.fold_ctx.base_dir)),
        pad_token_id=tokenizer.pad_token_id,
        device=ctx.fold_ctx.device,
    )
    reference = PeftModel.from_pretrained(
        base16, str(ctx.artifact_dir / "adapter"), is_trainable=False
    ).eval()
    extra = {}
    if ctx.cfg.quant.merge_adapter_into_quantized:
        merged = merge_adapter_into_quantized(
            load_artifact(ctx.artifact_dir, device=ctx.fold_ctx.device).model
        )
        attach_merged_copy(ctx.artifact_dir, merged)
        extra[f"merged-into-{ctx.cfg.quant.scheme}"] = merged.eval()
    return Exported(artifact_dir=ctx.artifact_dir, reference_model=reference, extra_models=extra)


register_variant(
    Variant(
        name="ft-then-quant",
        ordering="ft-then-quant",
        description="LoRA on the 16-bit base; merge; quantize the merged model with bitsandbytes "
        "(quant.scheme)",
        builder=_default_builder,
        export=_export_ft_then_quant,
        common_reference=True,
    )
)
register_variant(
    Variant(
        name="quant-then-ft",
        ordering="quant-then-ft",
        description="QLoRA: LoRA on the bitsandbytes base (NF4, double quant); ship base + unmerged adapter",
        builder=_default_builder,
        export=_export_quant_then_ft,
    )
)


DEFAULT_VARIANTS: tuple[str, ...] = ORDERINGS


def resolve_variants(names: Sequence[str] | None) -> list[Variant]:
    """The registered variants by name (default: the two orderings); unknown or repeated names are refused."""
    names = list(names or DEFAULT_VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}; registered: {sorted(VARIANTS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"variants listed twice: {names}")
    return [VARIANTS[name] for name in names]
