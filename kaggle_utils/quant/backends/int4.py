"""Group-wise asymmetric INT4 backend (`kaggle_utils.quant.int4`), HQQ or round-to-nearest rounding.

`model/` holds each layer's qweight/scale/zero plus `int4_layers.json`; the forward is plain PyTorch, so the
same model serves CPU, CUDA and TPU (`LoadOptions.dequantize` changes nothing).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import ArtifactError, UsageError
from kaggle_utils.models.classifier import build_classifier
from kaggle_utils.quant.backends.registry import LoadOptions, QuantBackend, register_backend
from kaggle_utils.quant.int4 import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INT4_SCHEME_PREFIX,
    Int4Linear,
    int4_layer_names,
    is_adapter_module,
    load_int4_model,
    quantize_linears,
)
from kaggle_utils.quant.layout import MODEL_DIR


class Int4Backend(QuantBackend):
    name = "int4"
    description = "group-wise asymmetric INT4 (qaware.int4), HQQ or RTN rounding, plain-PyTorch dequantize"
    # INT4 artifacts were never checked against their tokenizer (their loader predates the registry); kept so,
    # as switching it on refuses INT4 classifiers built without `modeling`'s random-weights marker.
    checks_tokenizer = False

    def accepts_scheme(self, scheme: str) -> bool:
        return scheme.startswith(INT4_SCHEME_PREFIX)

    def owns_model(self, model: nn.Module) -> bool:
        return any(isinstance(module, Int4Linear) for module in model.modules())

    def manifest_fields(self, model: nn.Module) -> dict:
        """Refuses a model with unmerged adapters (the artifact holds plain INT4) or mixed group sizes."""
        leftover = [name for name, module in model.named_modules() if is_adapter_module(module)]
        if leftover:
            raise UsageError(
                f"INT4 artifact: unmerged adapter layers remain ({leftover[:3]}): merge them first"
            )
        group_sizes = {model.get_submodule(name).group_size for name in int4_layer_names(model)}
        if len(group_sizes) != 1:
            raise UsageError(f"INT4 artifact: expected one group size, found {sorted(group_sizes)}")
        return {
            "quant_scheme": f"{INT4_SCHEME_PREFIX}{group_sizes.pop()}",
            "int4_format": FORMAT_NAME,
            "int4_format_version": FORMAT_VERSION,
        }

    def quantize(
        self,
        merged_model: nn.Module,
        cfg: PipelineConfig,
        device: str | torch.device | None = None,
        work_dir: str | Path | None = None,
    ) -> nn.Module:
        """In place: `cfg.lora.target_modules` -> Int4Linear (`cfg.qaware.group_size`, `.int4_method`)."""
        if device is not None:
            merged_model.to(device)
        quantize_linears(merged_model, cfg.qaware.group_size, cfg.lora.target_modules, cfg.qaware.int4_method)
        return merged_model

    def load_base(
        self,
        path: str | Path,
        cfg: PipelineConfig,
        pad_token_id: int | None = None,
        device: str | torch.device | None = None,
    ) -> nn.Module:
        model = build_classifier(
            dataclasses.replace(cfg.model, base_model=str(path)), pad_token_id=pad_token_id, device=device
        )
        return self.quantize(model, cfg)

    def load_artifact(self, root: Path, manifest: dict, options: LoadOptions) -> nn.Module:
        if manifest.get("int4_format") != FORMAT_NAME:
            raise ArtifactError(
                f"{root}: not an INT4 artifact (manifest int4_format={manifest.get('int4_format')!r})"
            )
        return load_int4_model(root / MODEL_DIR, device=options.device, dtype=options.dtype)


INT4 = register_backend(Int4Backend())
