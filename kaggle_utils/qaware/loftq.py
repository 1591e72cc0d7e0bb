"""LoftQ initialisation through peft, for the quantize -> fine-tune ordering.

LoftQ picks LoRA factors so that Q + scaling * B A approximates the 16-bit weight W (a weight-space fit, unlike
ApiQ's activation fit). peft offers it two ways: `init_lora_weights="loftq"` on a 16-bit model, and
`replace_lora_weights_loftq(peft_model, model_path)` on an already bitsandbytes-4bit peft model, which is what
the QLoRA pipeline has; this module uses the latter. In peft 0.21 both compute on CUDA or XPU only
(`peft.utils.loftq_utils` moves the weights to `compute_device = "xpu" if is_xpu_available() else "cuda"`), so
without such a device the variant is skipped with `LOFTQ_SKIP_MESSAGE`, never silently.

Scaling: peft writes the SVD factors of the residual W - Q straight into lora_A / lora_B and does not divide
by the LoRA scaling alpha / r (peft issue #1982, open question upstream). With r64 / alpha16 the adapter would
then start at a quarter of the residual. `apply_loftq` rescales B by 1 / scaling so that the initial adapter is
the residual's rank-r approximation, which is LoftQ's objective.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kaggle_utils.errors import UsageError


class LoftQUnavailable(UsageError):
    """LoftQ cannot run on this machine (peft computes it on CUDA / XPU only)."""


def loftq_device() -> str | None:
    """The device peft's LoftQ would compute on here, or None when it has none."""
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return None


def loftq_skip_message() -> str:
    import peft

    return (f"LoftQ skipped: peft {peft.__version__} computes LoftQ on CUDA or XPU only "
            "(peft.utils.loftq_utils uses compute_device='cuda'/'xpu') and this machine has neither; "
            "run this variant on a GPU")


def rescale_for_lora_scaling(peft_model: nn.Module, adapter_name: str = "default") -> int:
    """Divide every lora_B by its layer's scaling, so scaling * B A equals the B A that LoftQ computed."""
    count = 0
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and adapter_name in getattr(module, "lora_B", {}):
            scaling = float(module.scaling[adapter_name])
            if scaling <= 0:
                raise UsageError(f"LoRA scaling {scaling} cannot be compensated")
            with torch.no_grad():
                module.lora_B[adapter_name].weight.div_(scaling)
            count += 1
    return count


def apply_loftq(peft_model: nn.Module, base_checkpoint_dir: str | Path, adapter_name: str = "default") -> int:
    """Replace the LoRA factors of a bitsandbytes-4bit peft model by LoftQ's (from the 16-bit safetensors in
    `base_checkpoint_dir`); returns the layers changed. Raises LoftQUnavailable without CUDA/XPU."""
    if loftq_device() is None:
        raise LoftQUnavailable(loftq_skip_message())
    from peft import replace_lora_weights_loftq

    weights = Path(base_checkpoint_dir) / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"LoftQ needs the 16-bit weights as {weights} (a single safetensors file)")
    replace_lora_weights_loftq(peft_model, model_path=str(weights), adapter_name=adapter_name)
    return rescale_for_lora_scaling(peft_model, adapter_name)
