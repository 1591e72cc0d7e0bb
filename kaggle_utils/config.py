"""Typed configuration for every stage: the one place where defaults live.

Defaults follow the winners' published settings where they are known (COMPETITION.md): LoRA r64/alpha16 on all
linear layers with no frozen layers (public ladder 0.913 -> 0.903), lr 1e-4 for QLoRA (3rd place), max length
2048 with the end of the conversation kept (ladder 0.895 -> 0.885), swap augmentation and swap TTA, 5 grouped
folds. Each stage reads only its own section; `PipelineConfig` bundles them for the CLI and YAML front.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

LABEL_COLUMNS: tuple[str, str, str] = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_NAMES: tuple[str, str, str] = ("a", "b", "tie")


@dataclass
class DataConfig:
    """Where the competition files are and which dialect they speak."""

    # "lmsys": CSV with JSON-list columns and one-hot winner columns (lmsys-chatbot-arena,
    # llm-classification-finetuning). "wsdm": parquet with plain-string columns and `winner` = model_a|model_b.
    format: Literal["lmsys", "wsdm"] = "lmsys"
    train_path: str | None = None
    test_path: str | None = None
    # Rows whose turns cannot be recovered at all are dropped and reported by id (never silently); with
    # strict=True they raise instead.
    strict: bool = False


@dataclass
class FoldConfig:
    """Stratified K-fold grouped by normalised prompt (2nd place's scheme; row folds leak)."""

    n_folds: int = 5
    seed: int = 42
    folds_path: str = "folds.parquet"


@dataclass
class FormatConfig:
    """Conversation -> text -> tokens. Changing the template must change `template_version`."""

    template: Literal["gemma", "plain"] = "gemma"
    max_length: int = 2048
    truncation: Literal["keep_end", "keep_start", "head_tail"] = "keep_end"
    # Each of prompt / response A / response B is guaranteed at least this fraction of the content budget
    # whenever it has that much text (a long response cannot starve the others).
    floor_share: float = 0.2
    truncation_marker: str = " [...] "
    tokenizer_path: str | None = None  # local Gemma tokenizer dir; None -> the locally trained demo tokenizer


@dataclass
class ModelConfig:
    """Backbone and head. `base_model` is a local HF directory or a config.json (random weights)."""

    base_model: str = "tiny"  # "tiny" -> built-in 2-layer Gemma-2 config; a path -> local weights or config
    num_labels: int = 3
    # Gemma-2 soft-caps attention logits; eager is exact, SDPA ignores the cap.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 native, fp16 T4, fp32 CPU
    gradient_checkpointing: bool = True


@dataclass
class LoraSettings:
    """peft LoRA; winners: r64 / alpha16 on all linear layers, nothing frozen, head trained in full."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules_to_save: tuple[str, ...] = ("score",)
    frozen_layers: int = 0


@dataclass
class QuantConfig:
    """Quantization of the shipped model."""

    # ft-then-quant: scheme applied to the merged model; quant-then-ft: base loaded in nf4 for QLoRA.
    scheme: Literal["nf4", "int8"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    merge_adapter_into_quantized: bool = False  # quant-then-ft: also ship a merged copy and measure its error


@dataclass
class TrainConfig:
    """Training loop. Effective batch = per_device_batch_size * grad_accum * world size."""

    ordering: Literal["ft-then-quant", "quant-then-ft"] = "quant-then-ft"
    backend: Literal["hf", "unsloth"] = "hf"
    learning_rate: float = 1e-4
    head_learning_rate: float | None = None  # None -> same as learning_rate
    epochs: float = 1.0
    per_device_batch_size: int = 1
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    swap_augmentation: bool = True
    eval_every_steps: int = 200
    save_every_steps: int = 200
    optimizer: Literal["auto", "adamw", "adamw_8bit"] = "auto"  # auto: 8-bit on CUDA, torch AdamW on CPU
    seed: int = 42
    fold: int = 0
    output_dir: str = "runs/train"
    max_steps: int | None = None  # cap for demos and tests


@dataclass
class InferenceConfig:
    """Offline prediction under Kaggle's limits."""

    token_budget: int = 8192  # tokens per batch (rows * padded length), per device
    tta_swap: bool = True
    device: Literal["auto", "cuda", "cpu", "tpu"] = "auto"
    num_gpus: int | None = None  # None -> all visible
    deadline_hours: float = 9.0
    safety_margin_hours: float = 0.75
    warmup_batches: int = 3


@dataclass
class PipelineConfig:
    """Everything, for YAML/CLI. Sections are independent; each stage takes only its own."""

    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PipelineConfig:
        raw = raw or {}
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = type(getattr(cls(), f.name))
            kwargs[f.name] = _build_section(section_cls, raw.get(f.name) or {}, f.name)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(yaml.safe_load(handle))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False), encoding="utf-8")


def _build_section(section_cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown keys in config section '{name}': {sorted(unknown)}")
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return section_cls(**coerced)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
