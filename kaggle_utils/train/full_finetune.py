"""What full fine-tuning (`train.method: full`) costs in memory, from a model's shape, beside LoRA.

Bytes per parameter for weights, gradients and AdamW's two moments (activations, the CUDA context and
allocator slack are workload-dependent and NOT included):

    full, mixed precision: bf16 weights 2 + bf16 gradients 2 + fp32 master weights 4 + AdamW m, v 4 + 4 = 16
    full, fp32 (`model_setup.upcast_trainable`: trainable weights in fp32, no master copy): 4 + 4 + 4 + 4 = 16
    LoRA: frozen bf16 base 2 x all parameters + (adapters + head) x (fp32 weights, gradients, m, v: 16)

Gemma-2 classifier parameters (tied embeddings, no biases; `score` replaces the tied LM head):
    vocab*hidden + layers * (attention + mlp + 4 norms) + final norm + hidden*num_labels
    attention = hidden*q_out [q] + 2*hidden*kv_out [k, v; GQA] + q_out*hidden [o], q_out = heads*head_dim
    mlp = 3 * hidden*intermediate [gate, up, down]; norms = 4 * hidden (pre/post attention and MLP norms)

Run `python -m kaggle_utils.train.full_finetune /path/to/config.json` to print the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 1024**3
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shape(config: dict) -> dict[str, int]:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "vocab": int(config["vocab_size"]),
        "hidden": hidden,
        "layers": int(config["num_hidden_layers"]),
        "q_out": heads * head_dim,
        "kv_out": int(config.get("num_key_value_heads", heads)) * head_dim,
        "intermediate": int(config["intermediate_size"]),
    }


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder layer's linear projections."""
    s = _shape(config)
    h, i = s["hidden"], s["intermediate"]
    return {
        "q_proj": (h, s["q_out"]),
        "k_proj": (h, s["kv_out"]),
        "v_proj": (h, s["kv_out"]),
        "o_proj": (s["q_out"], h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def gemma2_parameter_count(config: dict, num_labels: int = 3) -> dict[str, int]:
    """Exact parameter count of a Gemma-2 sequence classifier from its config (see the module docstring)."""
    s = _shape(config)
    h = s["hidden"]
    embeddings = s["vocab"] * h
    per_layer_linear = sum(i * o for i, o in linear_shapes(config).values())
    per_layer = per_layer_linear + 4 * h
    decoder = s["layers"] * per_layer + h  # + the final norm
    head = h * num_labels
    return {
        "embeddings": embeddings,
        "per_layer": per_layer,
        "decoder": decoder,
        "head": head,
        "backbone": embeddings + decoder,
        "total": embeddings + decoder + head,
    }


def lora_parameter_count(
    config: dict, r: int = 16, targets: tuple[str, ...] = LORA_TARGETS, num_labels: int = 3
) -> int:
    """Trainable parameters of LoRA rank `r` on `targets` in every layer (A: r x in, B: out x r) plus the
    head, which the package trains in full (`lora.modules_to_save = ("score",)`)."""
    shapes = linear_shapes(config)
    per_layer = sum(r * (shapes[name][0] + shapes[name][1]) for name in targets)
    return _shape(config)["layers"] * per_layer + _shape(config)["hidden"] * num_labels


def full_finetune_memory(config_json: str | Path | dict, lora_r: int = 16, num_labels: int = 3) -> dict:
    """Bytes that full fine-tuning needs for weights, gradients and AdamW states of a Gemma-2 classifier of
    this shape, beside LoRA rank `lora_r`; activations excluded (they depend on batch and sequence length)."""
    config = (
        config_json if isinstance(config_json, dict) else json.loads(Path(config_json).read_text("utf-8"))
    )
    n = gemma2_parameter_count(config, num_labels)["total"]
    n_lora = lora_parameter_count(config, lora_r, num_labels=num_labels)
    full_mixed = {
        "weights_bf16": 2 * n,
        "gradients_bf16": 2 * n,
        "master_weights_fp32": 4 * n,
        "adam_m_fp32": 4 * n,
        "adam_v_fp32": 4 * n,
    }
    full_fp32 = {"weights_fp32": 4 * n, "gradients_fp32": 4 * n, "adam_m_fp32": 4 * n, "adam_v_fp32": 4 * n}
    lora = {
        "frozen_weights_bf16": 2 * n,
        "trainable_weights_fp32": 4 * n_lora,
        "gradients_fp32": 4 * n_lora,
        "adam_m_fp32": 4 * n_lora,
        "adam_v_fp32": 4 * n_lora,
    }
    return {
        "parameters": n,
        "lora_r": lora_r,
        "lora_trainable_parameters": n_lora,
        "full_mixed_precision": {**full_mixed, "total": sum(full_mixed.values())},
        "full_fp32": {**full_fp32, "total": sum(full_fp32.values())},
        "lora": {**lora, "total": sum(lora.values())},
        "formula": "full: 16 B/param (bf16 w 2 + bf16 grad 2 + fp32 master 4 + Adam m 4 + v 4; or fp32 w, "
        "grad, m, v 4 each); lora: 2 B/param frozen + 16 B/trainable param; activations excluded",
    }


def format_memory(report: dict) -> str:
    """A short table of `full_finetune_memory`'s result in GiB."""
    lines = [
        f"parameters: {report['parameters']:,}; LoRA r={report['lora_r']} trainable: "
        f"{report['lora_trainable_parameters']:,}"
    ]
    for mode in ("full_mixed_precision", "full_fp32", "lora"):
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in report[mode].items())
        lines.append(f"{mode} (GiB): {parts}")
    lines.append(report["formula"])
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_memory(full_finetune_memory(sys.argv[1])))
