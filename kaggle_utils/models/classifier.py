"""The preference classifier: a decoder with a 3-way head on the last non-pad token, plus peft LoRA.

Gemma-2 by default; any family of `SUPPORTED_MODEL_TYPES` (Gemma-3 text, Llama-3, Qwen-2, Mistral) through
``AutoModelForSequenceClassification``, the architecture read from the config's ``model_type``.

`ModelConfig.base_model` is ``"tiny"`` (2 layers, random weights), a ``config.json`` (that architecture,
random weights under `ModelConfig.init_seed`) or a checkpoint directory (loaded offline).
Usage: ``model = apply_lora(build_classifier(ModelConfig(base_model="tiny")), LoraSettings())``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from kaggle_utils.core.config import LoraSettings, ModelConfig, QuantConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.devices import default_device, model_device, resolve_dtype
from kaggle_utils.models.model_config import (  # re-exported: modeling's API names the backbones it builds
    GEMMA2_9B_CONFIG,
    HEAD_MODULE,
    RANDOM_WEIGHTS_KEY,
    SUPPORTED_MODEL_TYPES,
    TINY_BASE_MODEL,
    TINY_GEMMA2_SHAPE,
    base_has_weights,
    load_model_config,
    tiny_decoder_config,
    tiny_gemma2_config,
    zero_new_score_head,
)
from kaggle_utils.models.quantized import load_quantized_base
from kaggle_utils.text.batching import PadCollator, token_budget_batches

logger = logging.getLogger(__name__)
__all__ = [
    "GEMMA2_9B_CONFIG",
    "HEAD_MODULE",
    "RANDOM_WEIGHTS_KEY",
    "SUPPORTED_MODEL_TYPES",
    "TINY_BASE_MODEL",
    "TINY_GEMMA2_SHAPE",
    "base_has_weights",
    "load_model_config",
    "tiny_decoder_config",
    "tiny_gemma2_config",
    "zero_new_score_head",
    "build_classifier",
    "materialize_base",
    "lora_config",
    "apply_lora",
    "lora_targets",
    "is_quantized",
    "count_parameters",
    "forward_probs",
    "predict_probs",
    "ALL_LINEAR",
]


def build_classifier(
    model_cfg: ModelConfig,
    quant: QuantConfig | None = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A sequence classifier as `model_cfg` describes (random weights under `init_seed` for config sources);
    with `quant`, a bitsandbytes base. ``device="meta"`` builds the shape without memory.
    """
    device = torch.device(device) if device is not None else default_device()
    if quant is not None:
        # transformers quantizes while loading: a random-weight base goes through a temporary checkpoint
        if base_has_weights(model_cfg.base_model):
            return load_quantized_base(
                model_cfg.base_model, quant, model_cfg, pad_token_id=pad_token_id, device=device
            )
        with tempfile.TemporaryDirectory(prefix="random-base-") as tmp:
            # Drawn on the target device in its 16-bit dtype on GPU (a 9B base is 18 GB there, 37 GB in fp32).
            on_gpu = device.type == "cuda"
            materialize_base(
                model_cfg,
                tmp,
                vocab_size=vocab_size,
                pad_token_id=pad_token_id,
                device=device if on_gpu else "cpu",
                dtype=model_cfg.dtype if on_gpu else "float32",
            )
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
    """Write the seeded random-weight base as a checkpoint directory every ordering loads (a real checkpoint
    is returned as it is); built on CPU in fp32 by default, so every later base holds the same weights."""
    if base_has_weights(model_cfg.base_model):
        return Path(model_cfg.base_model).expanduser()
    out_dir = Path(out_dir)
    model = build_classifier(
        dataclasses.replace(model_cfg, dtype=dtype),
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        device=device,
    )
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


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw random weights under `seed` without disturbing the caller's random state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def lora_config(lora: LoraSettings, num_hidden_layers: int | None = None):
    """The peft `LoraConfig` for `lora`: the listed linear layers, the head in `modules_to_save` (trained)."""
    layers = None
    if lora.frozen_layers:
        if num_hidden_layers is None or lora.frozen_layers >= num_hidden_layers:
            raise UsageError(
                f"lora.frozen_layers={lora.frozen_layers} leaves no layer of {num_hidden_layers} to train"
            )
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
    """Wrap `model` in a peft LoRA model (in place); a bitsandbytes base is first prepared for k-bit training.
    Gradient checkpointing is left to the training loop (artifact loading keeps the plain forward)."""
    if is_quantized(model):
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # peft calls transformers' renamed checkpointing API
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = dataclasses.replace(lora, target_modules=lora_targets(model, lora))
    return get_peft_model(model, lora_config(lora, model.config.num_hidden_layers))


ALL_LINEAR = "all-linear"


def lora_targets(model: nn.Module, lora: LoraSettings) -> tuple[str, ...]:
    """The LoRA target names for `model`: ``("all-linear",)`` = every linear layer of its decoder; each name
    of a named list must match a linear layer (a typo would otherwise train nothing there)."""
    linear_names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if _is_linear(module) and ".layers." in f".{name}"
        }
    )
    if tuple(lora.target_modules) == (ALL_LINEAR,):
        return tuple(linear_names)
    unknown = sorted(set(lora.target_modules) - set(linear_names))
    if unknown:
        raise UsageError(
            f"lora.target_modules {unknown} name no linear layer of {type(model).__name__} "
            f"(its decoder has {linear_names}); use {ALL_LINEAR!r} for all of them"
        )
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
    """Probabilities (n, 3) for every encoded row, in input order, on one device, in token-budget batches
    (longest first); the model is put in eval mode."""
    if device is not None:
        model.to(device)
    model.eval()
    lengths = [len(ids) for ids in input_ids]
    out = np.zeros((len(lengths), 3), dtype=np.float64)
    if not lengths:
        return out
    collate = PadCollator(pad_token_id)
    batches = token_budget_batches(lengths, token_budget, max_rows=max_rows)
    for rows in progress_bar(batches, desc="predict", unit="batch", enabled=progress, leave=False):
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
