"""The preference classifier: a decoder with a 3-way head on the last non-pad token, plus peft LoRA.

Gemma-2 by default; any family of `SUPPORTED_MODEL_TYPES` (Gemma-3 text, Llama-3, Qwen-2, Mistral) through
``AutoModelForSequenceClassification``, the architecture read from the config's ``model_type``.

`ModelConfig.base_model` names where the backbone comes from:

- ``"tiny"``: `tiny_gemma2_config()` (2 layers, hidden 64) with random weights: tests, the demo, CPU benchmarks.
- a ``*.json`` file, or a directory holding only ``config.json``: that architecture with random weights (the real
  9B shape is ``../shared/reference/gemma-2-9b-config.json``; build it on the ``meta`` device to count parameters).
- a directory with ``config.json`` and weights: a real checkpoint, loaded offline.

Random weights are drawn under `ModelConfig.init_seed`, so every ordering trained from one config starts from the
same backbone. Gemma-2 soft-caps attention logits (50) and final logits (30): the ``eager`` attention
implementation applies the cap exactly, SDPA silently drops it, so eager is the default. The dtype follows the
hardware (`resolve_dtype`): bf16 where the GPU has it natively, fp16 on T4-class GPUs (compute capability < 8.0,
whose bf16 is emulated and about twice as slow), fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    Gemma2Config,
    PretrainedConfig,
    PreTrainedModel,
)

from kaggle_utils.config import LoraSettings, ModelConfig, QuantConfig
from kaggle_utils.errors import UsageError

logger = logging.getLogger(__name__)

TINY_BASE_MODEL = "tiny"
# The classification head AutoModelForSequenceClassification adds to a decoder (absent from causal-LM checkpoints).
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
# The real Gemma-2-9B architecture (config only): `ModelConfig(base_model=str(GEMMA2_9B_CONFIG))` builds it with
# random weights, e.g. on the meta device or for GPU benchmarks.
GEMMA2_9B_CONFIG = Path(__file__).resolve().parent / "resources" / "gemma-2-9b-config.json"
# Config attribute marking a model built here with random weights (kaggle_utils.real_models tells them apart).
RANDOM_WEIGHTS_KEY = "kaggle_utils_random_weights"
_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# Shape of the tiny model: big enough to learn the generated data's signal in a few hundred CPU steps, small
# enough that a test trains it in seconds. head_dim 16 and query_pre_attn_scalar 16 keep Gemma-2's scaling rule.
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
    """A 2-layer Gemma-2 config (random weights when built) with the real model's soft-capping and layer layout."""
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


def resolve_dtype(setting: str, device: str | torch.device | None = None) -> torch.dtype:
    """The parameter/compute dtype for `setting` on `device`: explicit settings win; "auto" follows the hardware.

    CUDA: bf16 when the GPU has it natively (``including_emulation=False``: a T4 reports emulated bf16 as
    supported), else fp16. CPU (and anything else): fp32, where the bitsandbytes CPU kernels are exact.
    """
    if setting != "auto":
        if setting not in _DTYPES:
            raise UsageError(f"model dtype must be one of auto, {', '.join(_DTYPES)}; got {setting!r}")
        return _DTYPES[setting]
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


def base_has_weights(base_model: str) -> bool:
    """True when `base_model` is a checkpoint directory (config + weights), False for config-only sources."""
    if base_model == TINY_BASE_MODEL:
        return False
    path = Path(base_model).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in _WEIGHT_FILES)


def load_model_config(
    model_cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None
) -> PretrainedConfig:
    """The decoder config `model_cfg.base_model` describes, with the label count and pad id this task needs.

    The architecture is read from the config's ``model_type`` (`SUPPORTED_MODEL_TYPES`). `vocab_size` is the
    tokenizer's size: it sets the tiny model's vocabulary and must fit in any other one.
    """
    source = model_cfg.base_model
    if source == TINY_BASE_MODEL:
        if vocab_size is None:
            raise UsageError("base_model='tiny' needs vocab_size (the tokenizer's length) to size its embeddings")
        config = tiny_gemma2_config(vocab_size, model_cfg.num_labels)
    else:
        path = Path(source).expanduser()
        json_path = path / "config.json" if path.is_dir() else path
        if not json_path.is_file():
            raise UsageError(
                f"model.base_model={source!r} is neither 'tiny', a config.json file, nor a directory with config.json"
            )
        config = _read_config(json_path)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise UsageError(
                f"{json_path}: vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens"
            )
    config.num_labels = model_cfg.num_labels
    if pad_token_id is not None:
        config.pad_token_id = int(pad_token_id)
    if config.pad_token_id is None:
        raise UsageError("the classifier pools the last non-pad token, so the model needs a pad_token_id")
    config.use_cache = False
    return config


def _read_config(json_path: Path) -> PretrainedConfig:
    import json

    from transformers import CONFIG_MAPPING

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


def tiny_decoder_config(model_type: str, vocab_size: int, pad_token_id: int | None, bos_token_id: int | None,
                        eos_token_id: int, num_labels: int = 3) -> PretrainedConfig:
    """A 2-layer random-weight config of any supported family (the tiny Gemma-2 shape), for CPU tests."""
    from transformers import CONFIG_MAPPING

    if model_type == "gemma2":
        return tiny_gemma2_config(vocab_size, num_labels, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                                  eos_token_id=eos_token_id)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"model_type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
    shape = {k: v for k, v in TINY_GEMMA2_SHAPE.items() if k != "query_pre_attn_scalar" or model_type == "gemma3_text"}
    if model_type not in ("gemma3_text", "mistral", "qwen2"):
        shape.pop("sliding_window")
    return CONFIG_MAPPING[model_type](**shape, vocab_size=int(vocab_size), num_labels=num_labels,
                                      pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                                      eos_token_id=eos_token_id)


def build_classifier(
    model_cfg: ModelConfig,
    quant: QuantConfig | None = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A sequence classifier (`AutoModelForSequenceClassification`: Gemma-2 by default, or any family of
    `SUPPORTED_MODEL_TYPES` its config names) as `model_cfg` describes; with `quant`, a bitsandbytes base.

    Config sources get random weights drawn under `model_cfg.init_seed`. ``device="meta"`` builds the shape
    without memory (parameter counts for the 9B config). Quantizing a random-weight model goes through a
    checkpoint written to a temporary directory, because transformers quantizes while loading weights.
    """
    device = torch.device(device) if device is not None else default_device()
    if quant is not None:
        from kaggle_utils.quantization import load_quantized_base

        if base_has_weights(model_cfg.base_model):
            return load_quantized_base(model_cfg.base_model, quant, model_cfg, pad_token_id=pad_token_id, device=device)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="random-base-") as tmp:
            # Drawn on the target device in its 16-bit dtype on GPU (a 9B base is 18 GB there, 37 GB in fp32).
            on_gpu = device.type == "cuda"
            materialize_base(model_cfg, tmp, vocab_size=vocab_size, pad_token_id=pad_token_id,
                             device=device if on_gpu else "cpu", dtype=model_cfg.dtype if on_gpu else "float32")
            return load_quantized_base(tmp, quant, model_cfg, pad_token_id=pad_token_id, device=device)

    dtype = resolve_dtype(model_cfg.dtype, device if device.type != "meta" else "cpu")
    if base_has_weights(model_cfg.base_model):
        return _load_pretrained(model_cfg, dtype, pad_token_id, device)
    config = load_model_config(model_cfg, vocab_size=vocab_size, pad_token_id=pad_token_id)
    with _seeded(model_cfg.init_seed, device), torch.device(device):
        model = AutoModelForSequenceClassification.from_config(
            config, attn_implementation=model_cfg.attn_implementation, dtype=dtype
        )
    # Saved with the config (materialize_base, artifacts): random embeddings may be used with any tokenizer.
    setattr(model.config, RANDOM_WEIGHTS_KEY, True)
    return model


def materialize_base(
    model_cfg: ModelConfig,
    out_dir: str | Path,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write the (seeded, random-weight) base as a checkpoint directory that every ordering loads.

    A real checkpoint is returned as it is. By default config sources are built on CPU in fp32, so the 16-bit
    and the quantized base hold exactly the same weights whatever hardware trains them later.
    """
    if base_has_weights(model_cfg.base_model):
        return Path(model_cfg.base_model).expanduser()
    out_dir = Path(out_dir)
    model = build_classifier(dataclasses.replace(model_cfg, dtype=dtype), vocab_size=vocab_size,
                             pad_token_id=pad_token_id, device=device)
    model.save_pretrained(str(out_dir))
    del model
    return out_dir


def _load_pretrained(
    model_cfg: ModelConfig, dtype: torch.dtype, pad_token_id: int | None, device: torch.device
) -> PreTrainedModel:
    path = Path(model_cfg.base_model).expanduser()
    config = load_model_config(model_cfg, pad_token_id=pad_token_id)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            config=config,
            dtype=dtype,
            attn_implementation=model_cfg.attn_implementation,
            device_map={"": str(device)},
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load the base model from {path}: {error}") from error
    model, loading_info = model
    zero_new_score_head(model, loading_info)
    return model


def zero_new_score_head(model: PreTrainedModel, loading_info: dict) -> None:
    """Start a classification head the checkpoint lacks at zero instead of transformers' random draw.

    A pretrained decoder's last hidden states are large (Gemma-3 270M: a random 0.02-std head gave a starting
    loss of 2.7 against 1.10 for uniform), and the draw would differ between the 16-bit and the quantized base
    of the two orderings. A zero head predicts uniform at step 0 and is the same for every ordering; its first
    step moves only the head, then the LoRA gets gradients through it.
    """
    missing = {key.rsplit(".", 1)[0] for key in loading_info.get("missing_keys", ())}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == HEAD_MODULE and name in missing and isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw random weights under `seed` without disturbing the caller's random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def lora_config(lora: LoraSettings, num_hidden_layers: int | None = None):
    """The peft `LoraConfig` for `lora`: all listed linear layers, head in `modules_to_save` (trained in full)."""
    from peft import LoraConfig, TaskType

    layers = None
    if lora.frozen_layers:
        if num_hidden_layers is None or lora.frozen_layers >= num_hidden_layers:
            raise UsageError(f"lora.frozen_layers={lora.frozen_layers} leaves no layer of {num_hidden_layers} to train")
        layers = list(range(lora.frozen_layers, num_hidden_layers))
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        task_type=TaskType.SEQ_CLS,
        bias="none",
    )


def apply_lora(model: PreTrainedModel, lora: LoraSettings):
    """Wrap `model` in a peft LoRA model (in place). A bitsandbytes base is first prepared for k-bit training.

    Gradient checkpointing is switched on by the training loop, not here, so that inference-only users of this
    function (artifact loading) keep the plain forward.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' renamed checkpointing API
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = dataclasses.replace(lora, target_modules=lora_targets(model, lora))
    return get_peft_model(model, lora_config(lora, model.config.num_hidden_layers))


ALL_LINEAR = "all-linear"


def lora_targets(model: nn.Module, lora: LoraSettings) -> tuple[str, ...]:
    """The LoRA target names for `model`: ``("all-linear",)`` = every linear layer of its decoder, whatever the
    architecture calls them; a named list must each match a linear layer (a typo or another family's names
    would otherwise train nothing there)."""
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                           if _is_linear(module) and ".layers." in f".{name}"})
    if tuple(lora.target_modules) == (ALL_LINEAR,):
        return tuple(linear_names)
    unknown = sorted(set(lora.target_modules) - set(linear_names))
    if unknown:
        raise UsageError(f"lora.target_modules {unknown} name no linear layer of {type(model).__name__} "
                         f"(its decoder has {linear_names}); use {ALL_LINEAR!r} for all of them")
    return tuple(lora.target_modules)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and bitsandbytes' 4/8-bit linear layers (subclasses of it)."""
    return isinstance(module, nn.Linear)


def is_quantized(model: nn.Module) -> bool:
    """True for a bitsandbytes-loaded model (4-bit or 8-bit), also when wrapped by peft."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked number of values."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Class probabilities (B, 3), float64, for one padded batch; no gradients, softmax in fp32."""
    device = model_device(model)
    with torch.no_grad(), _quiet_int8_cast():
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
    return torch.softmax(logits.float(), dim=-1).double().cpu().numpy()


def predict_probs(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    token_budget: int = 8192,
    device: str | torch.device | None = None,
    max_rows: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Probabilities (n, 3) for every encoded row, in input order, on one device.

    Rows are grouped into token-budget batches (longest first, little padding); the model is put in eval mode.
    """
    from tqdm.auto import tqdm

    from kaggle_utils.batching import PadCollator, token_budget_batches

    if device is not None:
        model.to(device)
    model.eval()
    lengths = [len(ids) for ids in input_ids]
    out = np.zeros((len(lengths), 3), dtype=np.float64)
    if not lengths:
        return out
    collate = PadCollator(pad_token_id)
    batches = token_budget_batches(lengths, token_budget, max_rows=max_rows)
    for rows in tqdm(batches, desc="predict", unit="batch", disable=not progress, leave=False):
        batch = collate([{"input_ids": list(input_ids[row])} for row in rows])
        out[np.asarray(rows)] = forward_probs(model, batch)
    return out


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


@contextlib.contextmanager
def _quiet_int8_cast() -> Iterator[None]:
    """LLM.int8 on CPU logs on every layer call that fp32 inputs are cast to fp16: expected, and noise."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    notice_filter = _DropInt8CastNotice()
    bnb_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        bnb_logger.removeFilter(notice_filter)
