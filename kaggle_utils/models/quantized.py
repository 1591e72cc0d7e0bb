"""bitsandbytes quantization for both orderings: NF4 / LLM.int8 loading, merged-model quantization.

`load_quantized_base` (quantize -> fine-tune, QLoRA), `quantize_merged` (fine-tune -> quantize: save and
reload through `BitsAndBytesConfig`), `dequantize_model` (plain `nn.Linear` layers for a TPU). The `score`
head stays in full precision; CPU weight repacking is switched off (docs/DESIGN_NOTES.md).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, PreTrainedModel

from kaggle_utils.core.config import ModelConfig, QuantConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.devices import default_device, resolve_dtype
from kaggle_utils.models.model_config import load_model_config, zero_new_score_head

logger = logging.getLogger(__name__)

QUANT_SCHEMES: tuple[str, ...] = ("nf4", "int8")
# Never quantized: the 3-way head is tiny and every logit goes through it.
SKIP_MODULES: tuple[str, ...] = ("score",)


def bnb_config(quant: QuantConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The `BitsAndBytesConfig` for `quant.scheme`: NF4 (double quant as configured) or LLM.int8."""
    if quant.scheme == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(SKIP_MODULES),
        )
    if quant.scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    raise UsageError(f"quant.scheme must be one of {QUANT_SCHEMES}; got {quant.scheme!r}")


def load_quantized_base(
    source: str | Path,
    quant: QuantConfig,
    model_cfg: ModelConfig,
    pad_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a 16-bit checkpoint directory quantized on the fly (QLoRA base or the ft-then-quant export)."""
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = resolve_dtype(
        quant.compute_dtype if quant.compute_dtype != "auto" else model_cfg.dtype, device
    )
    config = load_model_config(
        dataclasses.replace(model_cfg, base_model=str(source)), pad_token_id=pad_token_id
    )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(source),
            config=config,
            quantization_config=bnb_config(quant, compute_dtype),
            dtype=compute_dtype,
            attn_implementation=model_cfg.attn_implementation,
            device_map={"": str(device)},
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load {source} quantized as {quant.scheme}: {error}") from error
    model, loading_info = model
    zero_new_score_head(model, loading_info)
    disable_cpu_weight_repacking(model)
    return model


def quantize_merged(
    model: PreTrainedModel,
    quant: QuantConfig,
    model_cfg: ModelConfig,
    device: str | torch.device | None = None,
    work_dir: str | Path | None = None,
) -> PreTrainedModel:
    """Quantize a merged (LoRA already folded in) 16-bit classifier: save it, reload it through bitsandbytes.

    `work_dir` holds the temporary 16-bit checkpoint (default: a system temp dir); it is removed afterwards.
    """
    if is_bnb_quantized(model):
        raise UsageError("quantize_merged got a model that is already bitsandbytes-quantized")
    if hasattr(model, "peft_config"):
        raise UsageError(
            "quantize_merged needs the merged model: call merge_and_unload() on the peft model first"
        )
    if device is None:
        device = next(model.parameters()).device
    pad_token_id = model.config.pad_token_id
    with tempfile.TemporaryDirectory(prefix="merged-16bit-", dir=work_dir) as tmp:
        model.save_pretrained(tmp)
        return load_quantized_base(tmp, quant, model_cfg, pad_token_id=pad_token_id, device=device)


def is_bnb_quantized(model: nn.Module) -> bool:
    return quant_scheme_of(model) is not None


def _bnb_if_imported() -> Any:
    """bitsandbytes when something already imported it, else None: a bnb model cannot exist before, and the
    import itself probes the Hub for a CPU kernel, so checks on a plain model never import it."""
    return sys.modules.get("bitsandbytes")


def quant_scheme_of(model: nn.Module) -> str | None:
    """ "nf4", "fp4", "int8" for a bitsandbytes model (peft-wrapped or not), None for a plain one."""
    bnb = _bnb_if_imported()
    if bnb is None:
        return None
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return str(module.weight.quant_type)
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "int8"
    return None


def disable_cpu_weight_repacking(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' canonical 4-bit layout on CPU (see the module docstring for why it matters)."""
    bnb = _bnb_if_imported()
    if bnb is None:
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Compute dtype of every 4-bit layer (stored in the checkpoint's config; overridable at load)."""
    bnb = _bnb_if_imported()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = True


def dequantize_model(model: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Replace every bitsandbytes layer by a plain `nn.Linear` with the dequantized weights (exactly the
    quantized values), cast to `dtype`; a plain model is only cast. For runtimes without bitsandbytes."""
    if is_bnb_quantized(model):
        model = model.dequantize(dtype=dtype)
    return model.to(dtype)


def merge_adapter_into_quantized(peft_model) -> PreTrainedModel:
    """Fold a LoRA adapter into its 4-bit base (peft dequantizes, adds, re-quantizes): one more rounding step,
    whose cost the quant-then-ft comparison measures. Consumes `peft_model`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")
        merged = peft_model.merge_and_unload()
    return disable_cpu_weight_repacking(merged)
