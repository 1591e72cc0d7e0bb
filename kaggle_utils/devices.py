"""Device and dtype choice, shared by model building, quantization backends, artifacts and training.

Kept apart from `modeling` so that the quantization backends and the artifact loader can pick a device and a
compute dtype without importing the model builder (which imports them).
"""

from __future__ import annotations

import torch
from torch import nn

from kaggle_utils.errors import UsageError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(setting: str, device: str | torch.device | None = None) -> torch.dtype:
    """The parameter/compute dtype for `setting` on `device`: explicit settings win; "auto" follows the hardware.

    CUDA: bf16 when the GPU has it natively (``including_emulation=False``: a T4 reports emulated bf16 as
    supported), else fp16. CPU (and anything else): fp32, where the bitsandbytes CPU kernels are exact.
    """
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
    """The first CUDA GPU when there is one, else the CPU (TPU runs go through kaggle_utils.tpu)."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device
