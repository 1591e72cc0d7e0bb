"""Group-wise asymmetric INT4 weights: W_deq = scale * (q - zero), one (scale, zero) per (row, input group).

`quantize_linears(model, ...)` swaps target layers for `Int4Linear` (plain-PyTorch dequantize: CPU, T4, TPU);
`save_int4_model` / `load_int4_model` write and read the checkpoint. Why this layout: docs/DESIGN_NOTES.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from kaggle_utils.core.errors import UsageError

QMAX = 15  # 4 bits, codes 0..15
SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.float32
# Smallest normal fp16: a group whose range is below 15x this keeps this step (error still < 3.1e-5).
MIN_SCALE = 2.0**-14

QuantMethod = Literal["rtn", "hqq"]


@dataclass
class Int4Weight:
    """Unpacked INT4 weight: `codes` uint8 (out, in) in 0..15, `scale`/`zero` (out, in // group_size)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size, dtype)


def check_group_size(in_features: int, group_size: int, where: str = "") -> int:
    """Number of groups; a clear error when the group size does not tile the input dimension."""
    if group_size <= 0 or in_features % group_size or group_size % 2:
        raise UsageError(
            f"int4 group_size={group_size} must be even and divide in_features={in_features}"
            + (f" (layer {where})" if where else "")
        )
    return in_features // group_size


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """scale * (codes - zero), computed in float32 and cast once (exact fold, any device)."""
    out_features, in_features = codes.shape
    groups = in_features // group_size
    grouped = codes.to(torch.float32).view(out_features, groups, group_size)
    weight = (grouped - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return weight.view(out_features, in_features).to(dtype)


def pack_codes(codes: Tensor) -> Tensor:
    """(out, in) uint8 codes -> (out, in // 2) bytes: column 2j in the low nibble, 2j+1 in the high nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(packed: Tensor) -> Tensor:
    out_features, half = packed.shape
    codes = torch.empty(out_features, half * 2, dtype=torch.uint8, device=packed.device)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes


def _group_min_max(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    out_features, in_features = weight.shape
    grouped = weight.to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    return grouped, grouped.amin(-1), grouped.amax(-1)


def quantize_rtn(
    weight: Tensor, group_size: int, clip_upper: Tensor | None = None, clip_lower: Tensor | None = None
) -> Int4Weight:
    """Round-to-nearest min-max INT4, integer zero points; `clip_*` (out, groups) shrink group ranges."""
    check_group_size(weight.shape[1], group_size)
    grouped, low, high = _group_min_max(weight, group_size)
    if clip_upper is not None:
        high = high * clip_upper.to(high)
    if clip_lower is not None:
        low = low * clip_lower.to(low)
    low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    scale = ((high - low) / QMAX).clamp(min=MIN_SCALE).to(SCALE_DTYPE).to(torch.float32)
    zero = torch.round(-low / scale).clamp(0, QMAX)
    codes = (torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, QMAX)
    return Int4Weight(
        codes=codes.reshape(weight.shape).to(torch.uint8),
        scale=scale.to(SCALE_DTYPE),
        zero=zero.to(ZERO_DTYPE),
        group_size=group_size,
    )


def quantize_hqq(weight: Tensor, group_size: int) -> Int4Weight:
    """HQQ's half-quadratic optimiser (float zero points, no calibration data) converted to this layout."""
    from hqq.core.quantize import Quantizer

    out_features, in_features = weight.shape
    groups = check_group_size(in_features, group_size)
    codes, meta = Quantizer.quantize(
        weight.detach().to(torch.float32).cpu(),
        nbits=4,
        group_size=group_size,
        axis=1,  # groups run along the input dimension: one (scale, zero) per (row, input group)
        optimize=True,
        bitpack=False,
        compute_dtype=torch.float32,
        device="cpu",
    )
    scale = meta["scale"].reshape(out_features, groups).clamp(min=MIN_SCALE)
    zero = meta["zero"].reshape(out_features, groups)
    return Int4Weight(
        codes=codes.reshape(out_features, in_features)
        .round()
        .clamp(0, QMAX)
        .to(torch.uint8)
        .to(weight.device),
        scale=scale.to(SCALE_DTYPE).to(weight.device),
        zero=zero.to(ZERO_DTYPE).to(weight.device),
        group_size=group_size,
    )


def quantize_weight(weight: Tensor, group_size: int, method: QuantMethod = "rtn") -> Int4Weight:
    if method == "rtn":
        return quantize_rtn(weight, group_size)
    if method == "hqq":
        return quantize_hqq(weight, group_size)
    raise UsageError(f"unknown int4 quantization method {method!r}; expected 'rtn' or 'hqq'")


def _round_ste(value: Tensor) -> Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return value + (torch.round(value) - value).detach()


def fake_quantize_rtn(
    weight: Tensor, group_size: int, clip_upper: Tensor | None = None, clip_lower: Tensor | None = None
) -> Tensor:
    """Differentiable `quantize_rtn(...).dequantize()`: gradients reach the clipping factors (and the weight).

    Matches `quantize_rtn` value for value, so what ApiQ optimises is what gets stored.
    """
    out_features, in_features = weight.shape
    grouped, low, high = _group_min_max(weight, group_size)
    if clip_upper is not None:
        high = high * clip_upper
    if clip_lower is not None:
        low = low * clip_lower
    low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
    scale = ((high - low) / QMAX).clamp(min=MIN_SCALE)
    scale = scale + (scale.to(SCALE_DTYPE).to(torch.float32) - scale).detach()
    zero = _round_ste(-low / scale).clamp(0, QMAX)
    codes = (_round_ste(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, QMAX)
    return ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_features, in_features)


class Int4Linear(nn.Module):
    """A frozen linear layer stored as group-wise INT4; dequantizes on the fly in plain PyTorch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        groups = check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=ZERO_DTYPE, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_weight(cls, quantized: Int4Weight, bias: Tensor | None = None) -> Int4Linear:
        out_features, in_features = quantized.shape
        layer = cls(
            in_features,
            out_features,
            quantized.group_size,
            bias=bias is not None,
            device=quantized.codes.device,
        )
        layer.set_weight(quantized)
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, method: QuantMethod = "rtn") -> Int4Linear:
        return cls.from_weight(quantize_weight(linear.weight.data, group_size, method), linear.bias)

    def set_weight(self, quantized: Int4Weight) -> None:
        self.qweight.copy_(pack_codes(quantized.codes))
        self.scale.copy_(quantized.scale.to(SCALE_DTYPE))
        self.zero.copy_(quantized.zero.to(ZERO_DTYPE))

    def int4_weight(self) -> Int4Weight:
        return Int4Weight(unpack_codes(self.qweight), self.scale, self.zero, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(unpack_codes(self.qweight), self.scale, self.zero, self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` moves the stored tensors; `.to(dtype)` / `.half()` must not round codes, scales or
        zero points (a model-wide bf16 cast would destroy a folded zero): their storage dtypes are kept."""
        for name in ("qweight", "scale", "zero"):
            buffer = self._buffers[name]
            target_device = fn(torch.empty(0, dtype=torch.float32, device=buffer.device)).device
            self._buffers[name] = buffer.to(target_device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def iter_target_linears(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """(qualified name, layer) for every nn.Linear whose last name component is in `target_modules`."""
    targets = set(target_modules)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


def replace_module(model: nn.Module, qualified_name: str, new_module: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def quantize_linears(
    model: nn.Module, group_size: int, target_modules: Iterable[str], method: QuantMethod = "rtn"
) -> list[str]:
    """Replace the targeted nn.Linear layers by Int4Linear in place; their names (for the manifest)."""
    names = []
    for name, linear in iter_target_linears(model, target_modules):
        check_group_size(linear.in_features, group_size, name)
        replace_module(model, name, Int4Linear.from_linear(linear, group_size, method))
        names.append(name)
    if not names:
        raise UsageError(f"no nn.Linear named any of {sorted(set(target_modules))} to quantize")
    return names


FORMAT_NAME = "kaggle_utils.int4-asym-group"
FORMAT_VERSION = 1
LAYERS_FILE = "int4_layers.json"
WEIGHTS_FILE = "model.safetensors"


def int4_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Int4Linear)]


def save_int4_model(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a classifier with Int4Linear target layers: config.json, model.safetensors, int4_layers.json.

    Refuses a model that still carries adapters (merge first): the shipped file holds plain INT4 only.
    """
    layers = int4_layer_names(model)
    if not layers:
        raise UsageError("save_int4_model: the model has no Int4Linear layers")
    leftover = [name for name, module in model.named_modules() if is_adapter_module(module)]
    if leftover:
        raise UsageError(
            f"save_int4_model: unmerged adapter layers remain ({leftover[:3]}...): merge them first"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    model.config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "int4_format": FORMAT_NAME})
    group_sizes = {name: model.get_submodule(name).group_size for name in layers}
    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dequantize": "W[o, i] = scale[o, i // group_size] * (code[o, i] - zero[o, i // group_size])",
        "packing": "qweight uint8 (out, in/2): column 2j low nibble, 2j+1 high nibble",
        "scale_dtype": str(SCALE_DTYPE).removeprefix("torch."),
        "zero_dtype": str(ZERO_DTYPE).removeprefix("torch."),
        "layers": group_sizes,
    }
    (out_dir / LAYERS_FILE).write_text(json.dumps(description, indent=2), encoding="utf-8")
    return out_dir


def is_adapter_module(module: nn.Module) -> bool:
    return hasattr(module, "merged") and any(isinstance(child, Int4Linear) for child in module.children())


def int4_layers_in_state(state: dict[str, Tensor]) -> dict[str, int]:
    """{layer name: group size} for every INT4 layer in a state dict (keys `<name>.qweight/.scale/.zero`)."""
    layers = {}
    for key, value in state.items():
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            scale = state.get(f"{name}.scale")
            if scale is None or f"{name}.zero" not in state:
                raise UsageError(f"INT4 layer {name}: qweight without scale/zero in the checkpoint")
            layers[name] = value.shape[1] * 2 // scale.shape[1]
    return layers


def load_int4_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Rebuild the classifier from a checkpoint directory with INT4 layers (config.json + model.safetensors)
    on any device: non-quantized tensors in `dtype`, INT4 layers dequantized to `dtype` on the fly in plain
    PyTorch (no CUDA kernel needed: CPU, T4 fp16, TPU). The INT4 layers are found from their tensor names."""
    model_dir = Path(model_dir)
    layers_path = model_dir / LAYERS_FILE
    if layers_path.is_file():
        description = json.loads(layers_path.read_text(encoding="utf-8"))
        if description.get("format") != FORMAT_NAME or description.get("version") != FORMAT_VERSION:
            raise UsageError(
                f"{layers_path}: format {description.get('format')} v{description.get('version')}, "
                f"this code reads {FORMAT_NAME} v{FORMAT_VERSION}"
            )
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{model_dir}: no {WEIGHTS_FILE}")
    state = load_file(str(weights), device=str(device))
    layers = int4_layers_in_state(state)
    if not layers:
        raise UsageError(f"{weights}: no INT4 layers (no '<layer>.qweight' tensors); not an INT4 checkpoint")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    for name, group_size in layers.items():
        shape = state[f"{name}.qweight"].shape
        shell = Int4Linear(shape[1] * 2, shape[0], group_size, bias=f"{name}.bias" in state, device=device)
        replace_module(model, name, shell)
    for key, value in state.items():
        if key.endswith((".scale", ".zero")) and key.rsplit(".", 1)[0] in layers:
            state[key] = value.to(SCALE_DTYPE if key.endswith(".scale") else ZERO_DTYPE)
        elif value.is_floating_point():
            state[key] = value.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [key for key in missing if not key.endswith("inv_freq")]:
        raise UsageError(
            f"{model_dir}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    model.to(device)
    return model.eval()


def int4_storage_bits_per_weight(group_size: int) -> float:
    """Bits per weight of this layout: 4 for the code + fp16 scale and fp32 zero shared by the group."""
    return 4 + (16 + 32) / group_size


# Manifest `quant_scheme` of an INT4 artifact: this prefix and the group size (quant/backends/int4.py).
INT4_SCHEME_PREFIX = "int4-asym-g"
