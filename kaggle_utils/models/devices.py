"""Device and dtype choice, shared by model building, quantization backends, artifacts and training.

Apart from `classifier`, so backends and the artifact loader need not import the model builder.
Usage: `dtype = resolve_dtype("auto", default_device())`.
"""

from __future__ import annotations

import torch
from torch import nn

from kaggle_utils.core.errors import UsageError

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def resolve_dtype(setting: str, device: str | torch.device | None = None) -> torch.dtype:
    """The parameter/compute dtype for `setting` on `device`; "auto": bf16 on a GPU that has it natively
    (a T4 only emulates it), else fp16 on CUDA, fp32 elsewhere (exact bitsandbytes CPU kernels)."""
    if setting != "auto":
        if setting not in DTYPES:
            raise UsageError(f"model dtype must be one of auto, {', '.join(DTYPES)}; got {setting!r}")
        return DTYPES[setting]
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_native_bf16(device) else torch.float16
    return torch.float32


def _cuda_native_bf16(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU (TPU runs go through kaggle_utils.inference.tpu)."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


class DtypeRangeError(UsageError):
    """A model whose hidden states leave its dtype's range (fp16 overflow): it would predict NaN."""


FP16_MAX = float(torch.finfo(torch.float16).max)  # 65,504
# A preflight sees a few rows and others may run larger, so half the range is refused (docs/RESULTS.md:
# Gemma 3 reaches 68,407, inf in fp16; SmolLM2-135M 25,177, finite).
FP16_PREFLIGHT_LIMIT = FP16_MAX / 2


def check_dtype_range(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    setting: str = "model.dtype",
) -> dict:
    """Run one batch; each float16 decoder layer's output must be finite and below `FP16_PREFLIGHT_LIMIT`,
    else `DtypeRangeError`. Returns {"checked_layers", "float16_layers", "max_abs", "layer"}.
    """
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__.endswith("DecoderLayer")
    ]
    seen: list[tuple[str, torch.dtype, float, bool]] = []

    def watch(name: str):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
                values = hidden.detach().float()
                seen.append(
                    (
                        name,
                        hidden.dtype,
                        float(values.abs().nan_to_num(posinf=float("inf")).max()),
                        bool(torch.isfinite(values).all()),
                    )
                )

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    half = [entry for entry in seen if entry[1] == torch.float16]
    summary = {"checked_layers": len(seen), "float16_layers": len(half), "max_abs": None, "layer": None}
    if half:
        name, _, largest, _ = max(half, key=lambda entry: (not entry[3], entry[2]))
        summary.update(max_abs=largest, layer=name)
        broken = next((entry for entry in half if not entry[3] or entry[2] >= FP16_PREFLIGHT_LIMIT), None)
        if broken is not None:
            what = "turn non-finite" if not broken[3] else f"reach {broken[2]:,.0f}"
            raise DtypeRangeError(
                f"{setting} float16: hidden states {what} at {broken[0]} on {input_ids.shape[0]} "
                f"preflight rows (float16 holds up to {FP16_MAX:,.0f}; refused above "
                f"{FP16_PREFLIGHT_LIMIT:,.0f}): this model would predict NaN in float16; "
                "use float32 (or bfloat16 on a GPU that has it)"
            )
    return summary
