"""LoftQ initialisation of a QLoRA (bitsandbytes NF4) model, with the paper's alternating iterations.

`apply_loftq(peft_model, base_checkpoint_dir, iterations=...)` sets each 4-bit layer's base to the fitted Q
and its LoRA to the rank-r remainder, on CPU or CUDA. Why not peft's own LoftQ: docs/DESIGN_NOTES.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kaggle_utils.core.errors import UsageError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class LoftQUnavailable(UsageError):
    """LoftQ cannot run here (bitsandbytes missing, or the model has no 4-bit LoRA layers)."""


class SafetensorsCheckpoint:
    """Tensors of a checkpoint folder by name, one at a time, from `model.safetensors` or from the shards
    that `model.safetensors.index.json` maps each name to."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self._open = safe_open
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UsageError(f"{index}: not a safetensors index with a weight_map ({error})") from None
            missing = sorted({shard for shard in weight_map.values() if not (self.folder / shard).is_file()})
            if missing:
                raise UsageError(f"{index}: lists shards that are not in {self.folder}: {missing}")
            self.files = {name: self.folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt", device="cpu") as handle:
                self.files = dict.fromkeys(handle.keys(), single)
        else:
            raise UsageError(
                f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}; LoftQ needs the 16-bit safetensors"
            )

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (memory-mapped; only this tensor is materialised)."""
        if name not in self.files:
            raise UsageError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        with self._open(str(self.files[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)


@dataclass
class NF4Settings:
    """How a layer's 4-bit weight was quantized; Q_t is quantized the same way."""

    blocksize: int = 64
    quant_type: str = "nf4"
    compress_statistics: bool = True
    dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8


def nf4_quantizer(settings: NF4Settings) -> Callable[[torch.Tensor], tuple[torch.Tensor, tuple]]:
    """x -> (dequantized x in float32, (packed, quant_state)) with bitsandbytes, on x's device."""
    import bitsandbytes.functional as bnbf

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        packed, state = bnbf.quantize_4bit(
            x.to(settings.dtype),
            blocksize=settings.blocksize,
            compress_statistics=settings.compress_statistics,
            quant_type=settings.quant_type,
            quant_storage=settings.quant_storage,
        )
        return bnbf.dequantize_4bit(packed, state).float(), (packed, state)

    return quantize


@dataclass
class LoftQFactors:
    """One layer's LoftQ result: B (out x r) and A (r x in) with B A ~ W - Q, the quantized Q, and the error
    ||W - (Q + B A)||_F after each iteration."""

    b: torch.Tensor
    a: torch.Tensor
    dequantized: torch.Tensor
    quantized: tuple
    errors: list[float] = field(default_factory=list)
    best_iteration: int = 1


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factorisation B A of `matrix` (truncated SVD; sqrt(S) split between factors)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor,
    rank: int,
    iterations: int,
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, tuple]],
) -> LoftQFactors:
    """`iterations` alternating steps Q = quant(W - B A); B, A = SVD_rank(W - Q).

    Quantizing also re-derives each block's scale, so it is not an exact minimiser and the error need not
    fall at every step: the iterate with the lowest error is kept."""
    if iterations < 1:
        raise UsageError(f"LoftQ iterations must be >= 1, got {iterations}")
    if weight.dim() != 2:
        raise UsageError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    correction = torch.zeros_like(w)
    best: LoftQFactors | None = None
    errors = []
    for step in range(1, iterations + 1):
        dequantized, quantized = quantize(w - correction)
        b, a = low_rank(w - dequantized, rank)
        correction = b @ a
        errors.append(float(torch.linalg.matrix_norm(w - dequantized - correction)))
        if best is None or errors[-1] < min(errors[:-1]):
            best = LoftQFactors(b, a, dequantized, quantized, best_iteration=step)
    assert best is not None
    best.errors = errors
    return best


def _lora_4bit_layers(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    import bitsandbytes as bnb

    layers = []
    for name, module in peft_model.named_modules():
        lora = adapter_name in getattr(module, "lora_A", {}) and hasattr(module, "get_base_layer")
        if lora and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            layers.append((name, module))
    return layers


def _checkpoint_name(module_name: str, checkpoint: SafetensorsCheckpoint) -> str:
    """The checkpoint key of a peft module's base weight (peft prefixes `base_model.model.`; a causal-LM
    checkpoint of the same backbone uses the same `model.layers...` names)."""
    name = module_name.removeprefix("base_model.model.") + ".weight"
    if name in checkpoint.files:
        return name
    raise UsageError(f"{checkpoint.folder}: the checkpoint has no {name!r} for LoRA layer {module_name}")


@dataclass
class LoftQReport:
    layers: int
    iterations: int
    errors: dict[str, list[float]]  # per layer, ||W - (Q + B A)||_F after each iteration

    def summary(self) -> dict:
        first = sum(errors[0] for errors in self.errors.values())
        best = sum(min(errors) for errors in self.errors.values())
        return {
            "layers": self.layers,
            "iterations": self.iterations,
            "error_first": first,
            "error_best": best,
        }


@torch.no_grad()
def apply_loftq(
    peft_model: nn.Module, base_checkpoint_dir: str | Path, adapter_name: str = "default", iterations: int = 1
) -> LoftQReport:
    """LoftQ-initialise every 4-bit LoRA layer of a bitsandbytes-NF4 peft model from the 16-bit safetensors in
    `base_checkpoint_dir` (single file or sharded): lora_A / lora_B so that scaling * B A is the fitted rank-r
    term, the layer's 4-bit weight the fitted Q. Runs on the layers' device (CPU or CUDA)."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise LoftQUnavailable(f"LoftQ needs bitsandbytes ({error})") from None
    checkpoint = SafetensorsCheckpoint(base_checkpoint_dir)
    layers = _lora_4bit_layers(peft_model, adapter_name)
    if not layers:
        raise LoftQUnavailable("LoftQ found no bitsandbytes 4-bit LoRA layers in the model")
    errors: dict[str, list[float]] = {}
    for name, module in layers:
        base = module.get_base_layer()
        current = base.weight
        state = current.quant_state
        settings = NF4Settings(
            state.blocksize,
            state.quant_type,
            bool(state.nested),
            state.dtype,
            getattr(current, "quant_storage", torch.uint8),
        )
        device = current.device
        weight = checkpoint.get(_checkpoint_name(name, checkpoint)).to(device)
        if tuple(weight.shape) != tuple(state.shape):
            raise UsageError(
                f"{checkpoint.folder}: {name} has shape {tuple(weight.shape)} in the checkpoint, "
                f"{tuple(state.shape)} in the model"
            )
        factors = loftq_decompose(weight, int(module.r[adapter_name]), iterations, nf4_quantizer(settings))
        packed, new_state = factors.quantized  # the Q the factors were fitted to (T = 1: quant(W), as loaded)
        base.weight = bnb.nn.Params4bit(
            data=packed,
            requires_grad=False,
            quant_state=new_state,
            blocksize=new_state.blocksize,
            compress_statistics=bool(new_state.nested),
            quant_type=new_state.quant_type,
            quant_storage=settings.quant_storage,
            module=base,
            bnb_quantized=True,
        )
        scaling = float(module.scaling[adapter_name])
        if scaling <= 0:
            raise UsageError(f"LoRA scaling {scaling} cannot be compensated")
        lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        lora_a.data = factors.a.to(lora_a.dtype).contiguous()
        lora_b.data = (factors.b / scaling).to(lora_b.dtype).contiguous()
        errors[name] = factors.errors
    return LoftQReport(len(layers), iterations, errors)


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
