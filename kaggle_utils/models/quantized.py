"""bitsandbytes quantization for both orderings: NF4 / LLM.int8 loading, quantizing a merged model, dequantizing.

- quantize -> fine-tune (QLoRA): `load_quantized_base` loads the base in 4-bit NF4 with double quantization
  (or LLM.int8) and the adapter trains on top of it.
- fine-tune -> quantize: `quantize_merged` takes the merged 16-bit model, writes it as a checkpoint and reloads it
  through `BitsAndBytesConfig`, which is how transformers quantizes (it quantizes while loading weights).
- TPU (no bitsandbytes there): `dequantize_model` turns a bnb model back into plain 16-bit `nn.Linear` layers.

The classification head (`score`, 3 x hidden) always stays in full precision.

CPU caveat, measured with bitsandbytes 0.50 on a CPU with AVX512-BF16: the first no-grad eval forward of a
`Linear4bit` repacks its weight in place into a CPU-only layout with bf16 block scales. That changes the numbers
(scales rounded to bf16), a checkpoint saved afterwards is re-quantized again (error grows), and a training step
after it silently drops the gradients through the layer (the packed kernel has no autograd). Every quantized
model made here therefore has the repacking switched off (`disable_cpu_weight_repacking`).
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
    """Load a 16-bit checkpoint directory quantized on the fly (the QLoRA base, or the ft-then-quant export)."""
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
    """bitsandbytes when something already imported it, else None. A model with bitsandbytes layers cannot exist
    before it is imported, so the checks below never import it for a plain model (its import probes the CPU
    backend, which asks the Hugging Face Hub for a kernel; a runtime without it, a TPU, has no such model)."""
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
    """Compute dtype of every 4-bit layer (stored in the checkpoint's config; overridable per device at load)."""
    bnb = _bnb_if_imported()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = True


def dequantize_model(model: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Replace every bitsandbytes layer by a plain `nn.Linear` holding the dequantized weights, cast to `dtype`.

    This is exact with respect to the quantized model (the same values, in a float layout): the form a TPU or
    any runtime without bitsandbytes needs. A plain model is only cast.
    """
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
