"""TPU inference (Kaggle v3-8 / v5e-8): the artifact dequantized to plain bf16 on the CPU (bitsandbytes has
no TPU kernels), sharded by torch_xla SPMD over a (data, model) mesh, batches padded to a few static shapes
so XLA compiles each once. Tested under torch_xla's CPU device (`make tpu-check`); see docs/DESIGN_NOTES.md.

    loaded = load_plain(artifact_dir)
    forward = make_forward(loaded.model, pad_token_id, cfg)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.quant.artifacts import load_artifact

# Layers whose weight is split by output rows (column-parallel) / by input columns (row-parallel).
_SPLIT_OUTPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens")
_SPLIT_INPUT = ("o_proj", "down_proj")


def load_plain(artifact_dir: str | Path, verify_hashes: bool = True) -> Any:
    """The artifact as a plain bf16 model on the CPU (bnb layers dequantized, adapter merged): what XLA runs.
    Delegates to `artifacts.load_artifact(dequantize=True)`, the one loader for both orderings."""
    return load_artifact(
        artifact_dir, compute_dtype=torch.bfloat16, dequantize=True, verify_hashes=verify_hashes
    )


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a plain model, refusing any bitsandbytes leftovers (which XLA cannot run)."""
    state = model.state_dict()
    leftovers = [
        name
        for name, module in model.named_modules()
        if type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params")
    ]
    if leftovers or any(".lora_" in key for key in state):
        raise UsageError(
            f"model still has quantized or adapter layers for TPU: {(leftovers or list(state))[:5]}"
        )
    return state


def choose_mesh(n_devices: int, weight_bytes: int, device_bytes: float, fill: float = 0.6) -> tuple[int, int]:
    """(data, model) axis sizes: the narrowest model axis (a power of two dividing n_devices) whose weight
    shard uses at most `fill` of one device's memory (the rest is activations)."""
    model_axis = 1
    while model_axis <= n_devices:
        if n_devices % model_axis == 0 and weight_bytes / model_axis <= fill * device_bytes:
            return n_devices // model_axis, model_axis
        model_axis *= 2
    raise UsageError(
        f"model weights ({weight_bytes / 2**30:.1f} GiB) do not fit {n_devices} TPU devices of "
        f"{device_bytes / 2**30:.0f} GiB even fully sharded"
    )


def partition_spec(name: str, shape: tuple[int, ...], model_axis: int) -> tuple[str | None, ...] | None:
    """SPMD partition spec for one parameter, or None to replicate it (1-D tensors, the head, or a dimension
    the model axis does not divide)."""
    if model_axis <= 1 or len(shape) != 2:
        return None
    module = name.split(".")[-2] if "." in name else name
    if module in _SPLIT_OUTPUT and shape[0] % model_axis == 0:
        return ("model", None)
    if module in _SPLIT_INPUT and shape[1] % model_axis == 0:
        return (None, "model")
    return None


def static_shape(
    max_length: int, token_budget: int, length_bucket: int, row_multiple: int
) -> tuple[int, int]:
    """(rows, padded length) for a batch whose longest row has `max_length` tokens: the length rounded up to
    the bucket, rows = the token budget at that length, a multiple of the data axis (each core gets the same
    number of rows), at least one row per core."""
    length = max(length_bucket, math.ceil(max_length / length_bucket) * length_bucket)
    rows = max(row_multiple, (token_budget // length) // row_multiple * row_multiple)
    return rows, length


def pad_static(
    seqs: list[list[int]], rows: int, length: int, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (rows, length) ids and mask; missing rows repeat the first row (their output is dropped;
    an all-padding row would be a degenerate attention input)."""
    if not seqs or len(seqs) > rows or max(len(seq) for seq in seqs) > length:
        raise ValueError(
            f"cannot pad {len(seqs)} rows (longest {max(map(len, seqs), default=0)}) into {rows}x{length}"
        )
    ids = np.full((rows, length), pad_token_id, dtype=np.int64)
    mask = np.zeros((rows, length), dtype=np.int64)
    for i in range(rows):
        seq = seqs[i] if i < len(seqs) else seqs[0]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask


def make_forward(
    model: nn.Module,  # plain bf16 model from `load_plain`
    pad_token_id: int,
    cfg: InferenceConfig,
    length_bucket: int = 256,
    device_memory_gb: float = 16.0,
) -> Callable[[list[list[int]]], np.ndarray]:
    """A forward over all TPU cores (SPMD) for the inference engine. Needs torch_xla; tested under its CPU
    device (`make tpu-check`): after one call per static shape, nothing compiles again."""
    import torch_xla
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    n_devices = xr.global_runtime_device_count()
    plain_state_dict(model)  # refuses bnb / LoRA leftovers before anything goes to the device
    plain = model.to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    data_axis, model_axis = choose_mesh(n_devices, weight_bytes, device_memory_gb * 2**30)
    mesh = xs.Mesh(np.arange(n_devices), (data_axis, model_axis), ("data", "model"))
    device = torch_xla.device()
    plain.to(device)
    # Every weight and buffer gets an explicit sharding, replicated where no split applies: left unannotated,
    # a replicated tensor is annotated only after the first execution, so the second batch compiled again.
    for name, tensor in [*plain.named_parameters(), *plain.named_buffers()]:
        spec = partition_spec(name, tuple(tensor.shape), model_axis)
        xs.mark_sharding(tensor, mesh, spec if spec is not None else (None,) * tensor.dim())

    def forward(seqs: list[list[int]]) -> np.ndarray:
        rows, length = static_shape(max(len(seq) for seq in seqs), cfg.token_budget, length_bucket, data_axis)
        outputs = []
        for start in range(0, len(seqs), rows):
            chunk = seqs[start : start + rows]
            ids, mask = pad_static(chunk, rows, length, pad_token_id)
            ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
            xs.mark_sharding(ids_t, mesh, ("data", None))
            xs.mark_sharding(mask_t, mesh, ("data", None))
            with torch.no_grad():
                logits = plain(input_ids=ids_t, attention_mask=mask_t).logits
            probs = torch.softmax(logits.float(), dim=-1)
            # Replicated inside the graph: a row-sharded output is gathered by a small extra program that
            # torch_xla compiled anew on every `.cpu()` (one compilation per batch).
            xs.mark_sharding(probs, mesh, (None, None))
            probs = probs.cpu().numpy().astype(np.float64)
            outputs.append(probs[: len(chunk)])
        return np.concatenate(outputs)

    return forward
