"""Which decoder a `ModelConfig` describes: the tiny test shape, a config file, or a checkpoint directory.

Apart from `classifier` because the quantization backends need the config too and `classifier` builds
quantized bases through them. Usage: `config = load_model_config(ModelConfig(base_model="tiny"), vocab_size)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CONFIG_MAPPING, Gemma2Config, PretrainedConfig

from kaggle_utils.core.config import ModelConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import file_sha256

TINY_BASE_MODEL = "tiny"
# The classification head AutoModelForSequenceClassification adds to a decoder (absent from causal-LM
# checkpoints).
HEAD_MODULE = "score"
# Decoder backbones the classifier is built from (config.model_type -> family), all through
# AutoModelForSequenceClassification: last non-pad token pooled into a linear `score` head.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "gemma2": "Gemma-2",
    "gemma3_text": "Gemma-3 (text)",
    "llama": "Llama-3",
    "qwen2": "Qwen-2",
    "mistral": "Mistral",
}
# The real Gemma-2-9B architecture (config only): `ModelConfig(base_model=str(GEMMA2_9B_CONFIG))` builds it
# with random weights, e.g. on the meta device or for GPU benchmarks.
GEMMA2_9B_CONFIG = Path(__file__).resolve().parents[1] / "resources" / "gemma-2-9b-config.json"
# Config attribute marking a model built here with random weights (kaggle_utils.models.real tells them apart).
RANDOM_WEIGHTS_KEY = "kaggle_utils_random_weights"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Shape of the tiny model: learns the generated data's signal in a few hundred CPU steps, trains in seconds.
# head_dim 16 and query_pre_attn_scalar 16 keep Gemma-2's scaling rule.
TINY_GEMMA2_SHAPE: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "max_position_embeddings": 8192,
    "sliding_window": 4096,
}


def tiny_gemma2_config(vocab_size: int, num_labels: int = 3, **overrides) -> Gemma2Config:
    """A 2-layer Gemma-2 config (random weights when built) with the real model's soft-capping and layers."""
    values = {
        **TINY_GEMMA2_SHAPE,
        "vocab_size": int(vocab_size),
        "num_labels": num_labels,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        **overrides,
    }
    return Gemma2Config(**values)


def base_has_weights(base_model: str) -> bool:
    """True when `base_model` is a checkpoint directory (config + weights), False for config-only sources."""
    if base_model == TINY_BASE_MODEL:
        return False
    path = Path(base_model).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in _WEIGHT_FILES)


def load_model_config(
    model_cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None
) -> PretrainedConfig:
    """The decoder config `model_cfg.base_model` describes, with this task's label count and pad id.
    `vocab_size` (the tokenizer's) sizes the tiny model and must fit in any other one."""
    source = model_cfg.base_model
    if source == TINY_BASE_MODEL:
        if vocab_size is None:
            raise UsageError(
                "base_model='tiny' needs vocab_size (the tokenizer's length) to size its embeddings"
            )
        config = tiny_gemma2_config(vocab_size, model_cfg.num_labels)
    else:
        path = Path(source).expanduser()
        json_path = path / "config.json" if path.is_dir() else path
        if not json_path.is_file():
            raise UsageError(
                f"model.base_model={source!r} is neither 'tiny', a config.json file, "
                "nor a directory with config.json"
            )
        config = _read_config(json_path)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise UsageError(
                f"{json_path}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                f"{vocab_size} tokens"
            )
    config.num_labels = model_cfg.num_labels
    if pad_token_id is not None:
        config.pad_token_id = int(pad_token_id)
    if config.pad_token_id is None:
        raise UsageError("the classifier pools the last non-pad token, so the model needs a pad_token_id")
    config.use_cache = False
    return config


def _read_config(json_path: Path) -> PretrainedConfig:
    try:
        model_type = json.loads(json_path.read_text(encoding="utf-8")).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UsageError(
                f"{json_path}: model_type is {model_type!r}; this pipeline builds decoder classifiers for "
                f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED_MODEL_TYPES.items())}"
            )
        return CONFIG_MAPPING[model_type].from_json_file(str(json_path))
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(f"{json_path}: not a readable model config ({error})") from error


def tiny_decoder_config(
    model_type: str,
    vocab_size: int,
    pad_token_id: int | None,
    bos_token_id: int | None,
    eos_token_id: int,
    num_labels: int = 3,
) -> PretrainedConfig:
    """A 2-layer random-weight config of any supported family (the tiny Gemma-2 shape), for CPU tests."""
    if model_type == "gemma2":
        return tiny_gemma2_config(
            vocab_size,
            num_labels,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"model_type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
    shape = {
        k: v
        for k, v in TINY_GEMMA2_SHAPE.items()
        if k != "query_pre_attn_scalar" or model_type == "gemma3_text"
    }
    if model_type not in ("gemma3_text", "mistral", "qwen2"):
        shape.pop("sliding_window")
    return CONFIG_MAPPING[model_type](
        **shape,
        vocab_size=int(vocab_size),
        num_labels=num_labels,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def zero_new_score_head(model: nn.Module, loading_info: dict) -> None:
    """Start a classification head the checkpoint lacks at zero instead of transformers' random draw: it
    predicts uniform at step 0 and is the same for every ordering (docs/DESIGN_NOTES.md)."""
    missing = {key.rsplit(".", 1)[0] for key in loading_info.get("missing_keys", ())}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == HEAD_MODULE and name in missing and isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def describe_checkpoint(checkpoint_dir: str | Path, source: str, init_seed: int | None = None) -> dict:
    """Which model a report is about, from the checkpoint every ordering starts from: architecture, parameter
    count, vocabulary, stored dtype, weight sha256s and where the weights came from (GGUF or random init).
    """
    root = Path(checkpoint_dir)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    weight_files = sorted(root.glob("*.safetensors"))
    parameters = 0
    for path in weight_files:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for size in entry["shape"]:
                    count *= size
                parameters += count
    description = {
        "source": source,
        "model_type": config.get("model_type"),
        "parameters": parameters,
        "vocab_size": config.get("vocab_size", text.get("vocab_size")),
        "hidden_size": config.get("hidden_size", text.get("hidden_size")),
        "layers": config.get("num_hidden_layers", text.get("num_hidden_layers")),
        "stored_dtype": config.get("dtype") or config.get("torch_dtype"),
        "weights_sha256": {path.name: file_sha256(path) for path in weight_files},
    }
    fetched = root / "fetch.json"
    if fetched.is_file():
        record = json.loads(fetched.read_text(encoding="utf-8"))
        description["origin"] = (
            f"fetch-model {record.get('name')}: {record.get('gguf_file')} "
            f"(sha256 {record.get('gguf_sha256')}, {record.get('quantization')})"
        )
    elif not base_has_weights(source):
        description["origin"] = f"random weights from the config (model.init_seed {init_seed})"
    else:
        description["origin"] = "a checkpoint folder (no fetch-model record)"
    return description
