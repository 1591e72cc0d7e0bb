"""bitsandbytes backend (LLM.int8 and 4-bit NF4) and the plain 16-bit one, both loaded through transformers;
the bitsandbytes primitives themselves are in `kaggle_utils.models.quantized`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import ArtifactError
from kaggle_utils.models.classifier import build_classifier
from kaggle_utils.models.quantized import (
    QUANT_SCHEMES,
    dequantize_model,
    disable_cpu_weight_repacking,
    load_quantized_base,
    quant_scheme_of,
    quantize_merged,
    set_compute_dtype,
)
from kaggle_utils.quant.backends.registry import LoadOptions, QuantBackend, register_backend
from kaggle_utils.quant.layout import ADAPTER_DIR, MERGED_DIR, MODEL_DIR


class TransformersCheckpoint(QuantBackend):
    """Loading shared by every backend whose `model/` is a transformers checkpoint (its config says how the
    weights are quantized; transformers rebuilds the layers)."""

    def load_artifact(self, root: Path, manifest: dict, options: LoadOptions) -> nn.Module:
        model_dir = root / (MERGED_DIR if options.use_merged else MODEL_DIR)
        try:
            model, loading_info = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir),
                dtype=options.dtype,
                attn_implementation=manifest.get("attn_implementation") or "eager",
                device_map={"": str(options.device)},
                local_files_only=True,
                output_loading_info=True,
            )
        except (OSError, ValueError, RuntimeError) as error:
            raise ArtifactError(f"{model_dir}: could not load the model ({error})") from error
        # transformers only logs weights it had to initialise at random; a shipped model must have none.
        missing = list(loading_info.get("missing_keys") or [])
        if missing:
            raise ArtifactError(
                f"{model_dir}: weights missing from the checkpoint, would be random: "
                f"{missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        disable_cpu_weight_repacking(model)
        if str(manifest["quant_scheme"]) not in ("none", "int8"):
            set_compute_dtype(model, options.dtype)
        if options.dequantize:
            model = dequantize_model(model, options.dtype)
        if manifest["has_adapter"] and not options.use_merged:
            model = PeftModel.from_pretrained(model, str(root / ADAPTER_DIR), is_trainable=False)
            if options.dequantize:
                model = model.merge_and_unload()
        if options.dequantize:
            model = model.to(options.dtype)
        return model


class BitsAndBytesBackend(TransformersCheckpoint):
    name = "bitsandbytes"
    description = "bitsandbytes LLM.int8 (int8) and 4-bit NF4 (nf4, double quant as configured)"

    def accepts_scheme(self, scheme: str) -> bool:
        return scheme in QUANT_SCHEMES

    def owns_model(self, model: nn.Module) -> bool:
        return quant_scheme_of(model) is not None

    def manifest_fields(self, model: nn.Module) -> dict:
        return {"quant_scheme": quant_scheme_of(model)}

    def quantize(
        self,
        merged_model: nn.Module,
        cfg: PipelineConfig,
        device: str | torch.device | None = None,
        work_dir: str | Path | None = None,
    ) -> nn.Module:
        return quantize_merged(merged_model, cfg.quant, cfg.model, device=device, work_dir=work_dir)

    def load_base(
        self,
        path: str | Path,
        cfg: PipelineConfig,
        pad_token_id: int | None = None,
        device: str | torch.device | None = None,
    ) -> nn.Module:
        return load_quantized_base(path, cfg.quant, cfg.model, pad_token_id=pad_token_id, device=device)


class PlainBackend(TransformersCheckpoint):
    """No quantization: the 16-bit model ships as it is (the fallback for any model no backend claims)."""

    name = "none"
    description = "no quantization: 16-bit weights"
    fallback = True

    def accepts_scheme(self, scheme: str) -> bool:
        return scheme == "none"

    def owns_model(self, model: nn.Module) -> bool:
        return True

    def manifest_fields(self, model: nn.Module) -> dict:
        return {"quant_scheme": "none"}

    def quantize(
        self,
        merged_model: nn.Module,
        cfg: PipelineConfig,
        device: str | torch.device | None = None,
        work_dir: str | Path | None = None,
    ) -> nn.Module:
        return merged_model if device is None else merged_model.to(device)

    def load_base(
        self,
        path: str | Path,
        cfg: PipelineConfig,
        pad_token_id: int | None = None,
        device: str | torch.device | None = None,
    ) -> nn.Module:
        return build_classifier(
            dataclasses.replace(cfg.model, base_model=str(path)), pad_token_id=pad_token_id, device=device
        )


BITSANDBYTES = register_backend(BitsAndBytesBackend())
PLAIN = register_backend(PlainBackend())
