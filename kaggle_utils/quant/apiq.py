"""ApiQ-style init: fit LoRA (and per-group clipping) so each quantized block reproduces the 16-bit one.

`apiq_initialize(...)` fits block by block on calibration rows; `apply_clipping` writes the fitted
clipping and `load_lora_factors` loads the factors into a peft model. The objective: docs/DESIGN_NOTES.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import UsageError
from kaggle_utils.quant.int4 import Int4Weight, fake_quantize_rtn, iter_target_linears, quantize_rtn

Quantizer = Literal["nf4", "int4"]
NF4_BLOCKSIZE = 64


@dataclass
class ApiQSettings:
    """Defaults follow the ApiQ paper's block-wise recipe (lr 5e-4 LoRA / 5e-3 clipping, 20 epochs)."""

    quantizer: Quantizer = "nf4"
    group_size: int = 64  # int4 group; nf4 uses bitsandbytes' blocksize 64
    rank: int = 64
    alpha: float = 16.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    epochs: int = 20
    batch_size: int = 8
    lora_lr: float = 5e-4
    clip_lr: float = 5e-3
    learn_clipping: bool = True
    min_clip: float = 0.5
    seed: int = 0
    device: str | None = None  # None: where the model is


@dataclass
class BlockError:
    """Relative squared error ||out_q - out_16||^2 / ||out_16||^2 of block `block` over non-pad tokens.

    `default` / `apiq`: each model fed by its own quantized blocks (what inference sees).
    `isolated_before` / `isolated_after`: the same input (ApiQ's stream), before and after fitting this block.
    """

    block: int
    default: float
    apiq: float
    isolated_before: float
    isolated_after: float


@dataclass
class ApiQResult:
    settings: ApiQSettings
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (A (r, in), B (out, r))
    clip: dict[str, tuple[Tensor, ...]] = field(
        default_factory=dict
    )  # name -> (upper[, lower]) per group/block
    block_errors: list[BlockError] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[dict[str, float]]:
        return [vars(error) for error in self.block_errors]


def _nf4_code(device: torch.device) -> Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.get_4bit_type("nf4", device=device).to(torch.float32)


def fake_quantize_nf4(weight: Tensor, clip: Tensor | None = None, blocksize: int = NF4_BLOCKSIZE) -> Tensor:
    """Differentiable bitsandbytes NF4 (no double quant): nearest NF4 level of W / absmax per flat block."""
    if weight.numel() % blocksize:
        raise UsageError(f"nf4 blocksize {blocksize} must divide the weight size {tuple(weight.shape)}")
    code = _nf4_code(weight.device)
    blocks = weight.to(torch.float32).reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1, keepdim=True)
    if clip is not None:
        absmax = absmax * clip.reshape(-1, 1)
    absmax = absmax.clamp(min=1e-12)
    normalized = (blocks / absmax).clamp(-1, 1)
    index = torch.bucketize(normalized.detach(), (code[1:] + code[:-1]) / 2)
    levels = normalized + (code[index] - normalized).detach()
    return (levels * absmax).reshape(weight.shape)


def clip_nf4_weight(weight: Tensor, clip: Tensor, blocksize: int = NF4_BLOCKSIZE) -> Tensor:
    """16-bit weight clamped to each block's clipped absmax: bitsandbytes then quantizes it as fitted."""
    blocks = weight.reshape(-1, blocksize)
    bound = blocks.abs().amax(-1, keepdim=True) * clip.reshape(-1, 1).to(weight.dtype)
    return torch.maximum(torch.minimum(blocks, bound), -bound).reshape(weight.shape)


class _FittedLinear(nn.Module):
    """A linear layer during fitting: fake-quantized frozen weight + LoRA + clipping factors."""

    def __init__(self, linear: nn.Linear, settings: ApiQSettings, generator: torch.Generator) -> None:
        super().__init__()
        weight = linear.weight.detach().to(torch.float32)
        self.register_buffer("weight", weight)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.float32)
        self.quantizer = settings.quantizer
        self.group_size = settings.group_size
        out_features, in_features = weight.shape
        rank = settings.rank
        self.scaling = settings.alpha / rank
        bound = 1 / math.sqrt(
            in_features
        )  # peft's kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(in), 1/sqrt(in))
        self.lora_A = nn.Parameter(
            (torch.rand(rank, in_features, generator=generator) * 2 - 1).mul_(bound).to(weight.device)
        )
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        if self.quantizer == "nf4":
            self.clip = nn.ParameterList(
                [nn.Parameter(torch.ones(weight.numel() // NF4_BLOCKSIZE, device=weight.device))]
            )
        else:
            groups = in_features // self.group_size
            self.clip = nn.ParameterList(
                [nn.Parameter(torch.ones(out_features, groups, device=weight.device)) for _ in range(2)]
            )
        self.quantize_only = False  # True: the default init (unclipped quantizer, no LoRA)

    def quantized_weight(self) -> Tensor:
        if self.quantizer == "nf4":
            clip = None if self.quantize_only else self.clip[0]
            return fake_quantize_nf4(self.weight, clip)
        upper, lower = (None, None) if self.quantize_only else (self.clip[0], self.clip[1])
        return fake_quantize_rtn(self.weight, self.group_size, upper, lower)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.quantized_weight(), self.bias)
        if not self.quantize_only:
            out = out + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return out

    @torch.no_grad()
    def project_clipping(self, min_clip: float) -> None:
        for parameter in self.clip:
            parameter.clamp_(min_clip, 1.0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers model (the longest ModuleList named `layers`)."""
    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"
    ]
    if not candidates:
        raise UsageError(
            f"cannot find decoder layers in {type(model).__name__} (no ModuleList named 'layers')"
        )
    return max(candidates, key=len)


def pad_batches(
    input_ids: Sequence[Sequence[int]], batch_size: int, pad_token_id: int, device: torch.device | str
) -> list[dict[str, Tensor]]:
    """Right-padded batches of calibration rows (rows sorted by length to waste little padding)."""
    if not input_ids:
        raise UsageError("ApiQ needs at least one calibration row")
    order = sorted(range(len(input_ids)), key=lambda index: len(input_ids[index]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [list(input_ids[index]) for index in order[start : start + batch_size]]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for position, row in enumerate(rows):
            ids[position, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[position, : len(row)] = 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return batches


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: list[dict[str, Tensor]]
) -> tuple[list[Tensor], list[list[dict[str, Any]]]]:
    """Block 0's input hidden states per batch, and every block's keyword arguments (masks, rotary)."""
    layers = decoder_layers(model)
    first_inputs: list[Tensor] = []
    kwargs_per_layer: list[list[dict[str, Any]]] = [[] for _ in layers]

    def hook(index: int):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                first_inputs.append(hidden.detach())
            # A KV cache would grow with every replay of the block: calibration never uses one.
            kept = {
                key: value
                for key, value in kwargs.items()
                if key not in ("hidden_states", "cache", "past_key_values", "past_key_value")
            }
            kwargs_per_layer[index].append(kept)

        return record

    handles = [
        layer.register_forward_pre_hook(hook(index), with_kwargs=True) for index, layer in enumerate(layers)
    ]
    try:
        for batch in batches:
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return first_inputs, kwargs_per_layer


def _block_output(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _relative_error(outputs: list[Tensor], targets: list[Tensor], masks: list[Tensor]) -> float:
    num = den = 0.0
    for out, target, mask in zip(outputs, targets, masks, strict=True):
        weight = mask.unsqueeze(-1).to(torch.float32)
        num += float((((out.float() - target.float()) ** 2) * weight).sum())
        den += float(((target.float() ** 2) * weight).sum())
    return num / max(den, 1e-30)


def _wrap_targets(
    block: nn.Module, settings: ApiQSettings, generator: torch.Generator
) -> dict[str, _FittedLinear]:
    wrapped = {}
    for name, linear in iter_target_linears(block, settings.target_modules):
        fitted = _FittedLinear(linear, settings, generator)
        parent_name, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, fitted)
        wrapped[name] = fitted
    if not wrapped:
        raise UsageError(f"no linear layer named any of {list(settings.target_modules)} in a decoder block")
    return wrapped


def _set_quantize_only(fitted: dict[str, _FittedLinear], value: bool) -> None:
    for module in fitted.values():
        module.quantize_only = value


def apiq_initialize(
    model: nn.Module,
    calibration_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    settings: ApiQSettings | None = None,
) -> ApiQResult:
    """Fit LoRA factors and clipping block by block; `model` (16-bit, any dtype) is left unchanged."""
    import time

    settings = settings or ApiQSettings()
    start = time.perf_counter()
    device = torch.device(settings.device) if settings.device else next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    batches = pad_batches(calibration_ids, settings.batch_size, pad_token_id, device)
    masks = [batch["attention_mask"] for batch in batches]
    first_inputs, kwargs_per_layer = capture_block_inputs(model, batches)
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    result = ApiQResult(settings=settings)

    fp_inputs = first_inputs
    apiq_inputs = [hidden.to(torch.float32) for hidden in first_inputs]
    default_inputs = list(apiq_inputs)
    for index, layer in enumerate(layers):
        kwargs = kwargs_per_layer[index]
        with torch.no_grad():
            targets = [
                _block_output(layer, hidden, kw).to(torch.float32)
                for hidden, kw in zip(fp_inputs, kwargs, strict=True)
            ]
        block = copy.deepcopy(layer).to(device=device, dtype=torch.float32)
        for parameter in block.parameters():
            parameter.requires_grad_(False)
        fitted = _wrap_targets(block, settings, generator)
        kwargs32 = [_to_float32(kw) for kw in kwargs]

        with torch.no_grad():
            _set_quantize_only(fitted, True)
            default_outputs = [
                _block_output(block, h, kw) for h, kw in zip(default_inputs, kwargs32, strict=True)
            ]
            isolated_before = _relative_error(
                [_block_output(block, h, kw) for h, kw in zip(apiq_inputs, kwargs32, strict=True)],
                targets,
                masks,
            )
            _set_quantize_only(fitted, False)

        _fit_block(block, fitted, apiq_inputs, kwargs32, targets, masks, settings, index, len(layers))

        with torch.no_grad():
            apiq_outputs = [_block_output(block, h, kw) for h, kw in zip(apiq_inputs, kwargs32, strict=True)]
        result.block_errors.append(
            BlockError(
                block=index,
                default=_relative_error(default_outputs, targets, masks),
                apiq=_relative_error(apiq_outputs, targets, masks),
                isolated_before=isolated_before,
                isolated_after=_relative_error(apiq_outputs, targets, masks),
            )
        )
        for name, module in fitted.items():
            qualified = f"{prefix}.{index}.{name}"
            result.lora[qualified] = (
                module.lora_A.detach().cpu().clone(),
                module.lora_B.detach().cpu().clone(),
            )
            result.clip[qualified] = tuple(p.detach().cpu().clone() for p in module.clip)
        fp_inputs = [target.to(hidden.dtype) for target, hidden in zip(targets, fp_inputs, strict=True)]
        apiq_inputs, default_inputs = apiq_outputs, default_outputs
        del block, fitted

    model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _to_float32(kwargs: dict[str, Any]) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.to(torch.float32)
        if isinstance(value, tuple):
            return tuple(convert(item) for item in value)
        return value

    return {key: convert(value) for key, value in kwargs.items()}


def _fit_block(
    block: nn.Module,
    fitted: dict[str, _FittedLinear],
    inputs: list[Tensor],
    kwargs: list[dict[str, Any]],
    targets: list[Tensor],
    masks: list[Tensor],
    settings: ApiQSettings,
    index: int,
    n_blocks: int,
) -> None:
    lora = [p for module in fitted.values() for p in (module.lora_A, module.lora_B)]
    groups = [{"params": lora, "lr": settings.lora_lr, "weight_decay": 0.0}]
    if settings.learn_clipping:
        clips = [p for module in fitted.values() for p in module.clip]
        groups.append({"params": clips, "lr": settings.clip_lr, "weight_decay": 0.0})
    else:
        for module in fitted.values():
            module.clip.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups)
    order_generator = torch.Generator().manual_seed(settings.seed + index)
    block.train()
    progress = progress_bar(range(settings.epochs), desc=f"ApiQ block {index + 1}/{n_blocks}", leave=False)
    for _ in progress:
        total = 0.0
        for batch_index in torch.randperm(len(inputs), generator=order_generator).tolist():
            mask = masks[batch_index].unsqueeze(-1).to(torch.float32)
            out = _block_output(block, inputs[batch_index], kwargs[batch_index])
            loss = (((out - targets[batch_index]) ** 2) * mask).sum() / (mask.sum() * out.shape[-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for module in fitted.values():
                module.project_clipping(settings.min_clip)
            total += loss.item()
        progress.set_postfix(mse=f"{total / len(inputs):.3g}")
    block.eval()


def apply_clipping(model: nn.Module, result: ApiQResult) -> dict[str, Int4Weight] | None:
    """Write the fitted clipping into `model` so quantizing it gives the fitted codes.

    nf4: clamps the 16-bit weights in place (bitsandbytes quantizes them afterwards) and returns None.
    int4: returns the INT4 weights per layer name (the 16-bit model is not changed).
    """
    quantized: dict[str, Int4Weight] = {}
    for name, clip in result.clip.items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            if result.settings.quantizer == "nf4":
                linear.weight.copy_(clip_nf4_weight(linear.weight.data, clip[0].to(linear.weight.device)))
            else:
                quantized[name] = quantize_rtn(
                    linear.weight.data, result.settings.group_size, clip[0], clip[1]
                )
    return None if result.settings.quantizer == "nf4" else quantized


def load_lora_factors(peft_model: nn.Module, result: ApiQResult, adapter_name: str = "default") -> int:
    """Copy the fitted A, B into a peft LoRA model (names matched by suffix); returns the layers loaded."""
    loaded = 0
    modules = dict(peft_model.named_modules())
    for name, (lora_a, lora_b) in result.lora.items():
        matches = [
            module
            for key, module in modules.items()
            if (key == name or key.endswith("." + name)) and hasattr(module, "lora_A")
        ]
        if len(matches) != 1:
            raise UsageError(f"ApiQ layer {name}: found {len(matches)} peft LoRA layers with that name")
        module = matches[0]
        a_weight, b_weight = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        if a_weight.shape != lora_a.shape or b_weight.shape != lora_b.shape:
            raise UsageError(
                f"ApiQ layer {name}: LoRA shapes {tuple(a_weight.shape)}/{tuple(b_weight.shape)} "
                f"differ from the fitted {tuple(lora_a.shape)}/{tuple(lora_b.shape)} (rank mismatch?)"
            )
        expected = result.settings.alpha / result.settings.rank
        if not math.isclose(float(module.scaling[adapter_name]), expected, rel_tol=1e-6):
            raise UsageError(
                f"ApiQ layer {name}: peft scaling {module.scaling[adapter_name]} != alpha/r {expected}"
            )
        with torch.no_grad():
            a_weight.copy_(lora_a.to(a_weight))
            b_weight.copy_(lora_b.to(b_weight))
        loaded += 1
    return loaded


@torch.no_grad()
def block_output_errors(
    reference: nn.Module,
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 8,
) -> list[float]:
    """Per decoder block, ||out_model - out_reference||^2 / ||out_reference||^2 over non-pad tokens, each
    model fed by its own earlier blocks (as at inference); plain, bitsandbytes and peft-wrapped models."""

    def outputs_of(network: nn.Module) -> list[list[Tensor]]:
        layers = decoder_layers(network)
        captured: list[list[Tensor]] = [[] for _ in layers]
        handles = [
            layer.register_forward_hook(
                lambda module, args, out, index=index: captured[index].append(
                    (out[0] if isinstance(out, tuple) else out).detach().float().cpu()
                )
            )
            for index, layer in enumerate(layers)
        ]
        device = next(network.parameters()).device
        was_training = network.training
        network.eval()
        try:
            for batch in pad_batches(input_ids, batch_size, pad_token_id, device):
                network(**batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            network.train(was_training)
        return captured

    masks = [
        batch["attention_mask"].cpu() for batch in pad_batches(input_ids, batch_size, pad_token_id, "cpu")
    ]
    reference_outputs, model_outputs = outputs_of(reference), outputs_of(model)
    return [
        _relative_error(mine, theirs, masks)
        for mine, theirs in zip(model_outputs, reference_outputs, strict=True)
    ]
