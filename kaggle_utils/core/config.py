"""Typed configuration for every stage: the one place where defaults live.

Each field states its default, one-line help and allowed range beside it (`setting`); a section checks itself
when built (`validate_section`). Each stage reads only its own section; `PipelineConfig` bundles them for the
CLI and YAML, and `save_resolved` writes the config a run used next to its outputs.

    cfg = PipelineConfig.from_yaml("configs/demo.yaml").with_overrides({"train": {"max_steps": 2}})
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kaggle_utils.core.config_loading import build_section, check_value, load_yaml_unique, plain, setting
from kaggle_utils.core.errors import ConfigError
from kaggle_utils.core.fileio import atomic_write_bytes

# The Kaggle image build-wheels targets (Python, platform, the torch it ships), written once: in this file.
KAGGLE_IMAGE_FILE = Path(__file__).resolve().parents[1] / "resources" / "kaggle_image.json"
KAGGLE_IMAGE: dict[str, Any] = json.loads(KAGGLE_IMAGE_FILE.read_text(encoding="utf-8"))

LABEL_COLUMNS: tuple[str, str, str] = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_NAMES: tuple[str, str, str] = ("a", "b", "tie")
RESOLVED_CONFIG_NAME = "resolved_config.yaml"


@dataclass
class DataConfig:
    """Where the competition files are and which dialect they speak."""

    def __post_init__(self) -> None:
        validate_section(self)

    # A plain string, not a Literal: a new dialect is one registration; an unknown name fails on reading.
    format: str = setting(
        "lmsys", "registered competition dialect (data/dialects.py): files, metric, submission"
    )
    train_path: str | None = setting(None, "competition training file, CSV or parquet")
    test_path: str | None = setting(None, "competition test file, CSV or parquet")
    strict: bool = setting(False, "raise on rows whose turns cannot be recovered (default: drop them, by id)")


@dataclass
class FoldConfig:
    """Stratified K-fold grouped by normalised prompt (row folds leak)."""

    def __post_init__(self) -> None:
        validate_section(self)

    n_folds: int = setting(5, "number of folds", ge=2)
    seed: int = setting(42, "fold assignment seed")


@dataclass
class BaselineConfig:
    """Feature baseline (lengths, turns, formatting -> scikit-learn): the sanity check and inference's cheap
    fallback predictor."""

    def __post_init__(self) -> None:
        validate_section(self)

    model: Literal["hgb", "logreg"] = setting("hgb", "hist gradient boosting or logistic regression")
    max_iter: int = setting(100, "boosting / solver iterations", ge=1)
    learning_rate: float = setting(0.05, "boosting learning rate", gt=0)
    max_leaf_nodes: int = setting(15, "leaves per boosted tree", ge=2)
    min_samples_leaf: int = setting(40, "rows per leaf at least", ge=1)
    l2_regularization: float = setting(1.0, "L2 penalty", ge=0)
    swap_augmentation: bool = setting(True, "train on both A/B orders, predict the mean of both")
    seed: int = setting(42, "model seed")
    n_threads: int | None = setting(1, "OpenMP/BLAS threads (None: the libraries' default)", ge=1)


@dataclass
class FormatConfig:
    """Conversation -> text -> tokens. Changing the template must change `template_version`."""

    def __post_init__(self) -> None:
        validate_section(self)

    template: Literal["gemma", "llama3", "chatml", "plain", "auto"] = setting(
        "gemma", "prompt template (auto: the tokenizer's family)"
    )
    max_length: int = setting(
        2048, "tokens per row", ge=1, note="encode_rows names the template's real minimum"
    )
    truncation: Literal["keep_end", "keep_start", "head_tail"] = setting(
        "keep_end", "which turns survive a too-long conversation: last, first or alternating ends"
    )
    head_fraction: float = setting(
        0.5,
        "share of a cut piece kept from its start, the rest from its end",
        ge=0,
        le=1,
        note="0: only the end survives, 1: only the start",
    )
    cut_split: Literal["proportional", "equal"] = setting(
        "proportional", "how cut responses share the room: by their lengths, or equally"
    )
    truncation_marker: str = setting(" [...] ", "text put where a piece was cut")
    tokenizer_path: str | None = setting(None, "tokenizer directory (None: the demo tokenizer)")


@dataclass
class ModelConfig:
    """Backbone and head. `base_model` is a local HF directory or a config.json (random weights)."""

    def __post_init__(self) -> None:
        validate_section(self)

    base_model: str = setting("tiny", "'tiny' (2-layer Gemma-2), a config.json or a checkpoint directory")
    num_labels: int = setting(3, "classifier outputs", ge=2)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = setting(
        "eager", "attention kernel (Gemma-2 soft-caps logits: eager is exact, SDPA ignores the cap)"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "auto", "weights dtype (auto: bf16 where native, fp16 on T4, fp32 on CPU)"
    )
    gradient_checkpointing: bool = setting(True, "recompute activations in backward to save memory")
    init_seed: int = setting(0, "seed of random-weight bases, the same for every ordering")


@dataclass
class LoraSettings:
    """peft LoRA: r64 / alpha16 on all linear layers, nothing frozen, head trained in full."""

    def __post_init__(self) -> None:
        validate_section(self)

    r: int = setting(64, "LoRA rank", ge=1)
    alpha: int = setting(16, "LoRA alpha (scale alpha / r)", gt=0)
    dropout: float = setting(0.05, "LoRA dropout", ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "linear layers that get adapters",
    )
    modules_to_save: tuple[str, ...] = setting(("score",), "modules trained in full (the head)")
    frozen_layers: int = setting(0, "first decoder layers left without adapters", ge=0)


@dataclass
class QuantConfig:
    """Quantization of the shipped model."""

    def __post_init__(self) -> None:
        validate_section(self)

    scheme: Literal["nf4", "int8"] = setting(
        "nf4", "ft-then-quant: applied to the merged model; quant-then-ft: the QLoRA base"
    )
    double_quant: bool = setting(True, "NF4 double quantization")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "auto", "4-bit layers' compute dtype"
    )
    merge_adapter_into_quantized: bool = setting(
        False, "quant-then-ft: also ship a merged copy and measure its error"
    )


@dataclass
class TrainConfig:
    """Training loop. Effective batch = per_device_batch_size * grad_accum * world size."""

    def __post_init__(self) -> None:
        validate_section(self)

    ordering: Literal["ft-then-quant", "quant-then-ft"] = setting("quant-then-ft", "which comes first")
    backend: Literal["hf", "unsloth"] = setting("hf", "training backend")
    method: Literal["lora", "full"] = setting(
        "lora", "lora: adapters on a frozen base; full: every weight trains (ft-then-quant only)"
    )
    learning_rate: float = setting(1e-4, "peak learning rate", gt=0)
    head_learning_rate: float | None = setting(None, "head's learning rate (None: learning_rate)", gt=0)
    epochs: float = setting(1.0, "passes over the training part", gt=0)
    per_device_batch_size: int = setting(1, "rows per device per step", ge=1)
    grad_accum: int = setting(8, "micro-batches per optimizer step", ge=1)
    warmup_ratio: float = setting(0.05, "share of steps warming up the learning rate", ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", gt=0)
    swap_augment: Literal["none", "double", "random"] = setting(
        "double", "A/B swap: double: both orders each epoch; random: one seeded order per row and epoch"
    )
    selection: Literal["final", "inner"] = setting(
        "final", "weights shipped: the last step's, or the best on an inner holdout (never the held-out fold)"
    )
    inner_holdout_fraction: float = setting(
        0.05, "inner: share of training rows held out (capped by eval_rows_cap)", gt=0, lt=1
    )
    eval_rows_cap: int = setting(512, "rows per evaluation during training (0: none in 'final')", ge=0)
    evals_per_run: int = setting(10, "evaluations during training, evenly spaced", ge=0)
    eval_every_steps: int | None = setting(None, "explicit interval instead of evals_per_run", ge=1)
    save_every_steps: int = setting(200, "checkpoint interval", ge=1)
    optimizer: Literal["auto", "adamw", "adamw_8bit"] = setting(
        "auto", "auto: 8-bit AdamW on CUDA, torch AdamW on CPU"
    )
    seed: int = setting(42, "training seed")
    max_steps: int | None = setting(None, "step cap for demos and tests", ge=1)
    eval_token_budget: int = setting(8192, "tokens per evaluation batch (rows x padded length)", ge=1)
    cv_folds: tuple[int, ...] | None = setting(None, "folds compare-orderings trains (None: all)")
    exclude_folds: tuple[int, ...] | None = setting(
        None, "folds never used, neither trained on nor scored (a teacher for nested folds)"
    )
    teacher_path: str | None = setting(
        None,
        "OOF-format parquet whose probabilities are soft targets (train/teacher.py)",
        nonblank=True,
        note="a parquet path (or null for no teacher)",
    )
    teacher_name: str | None = setting(None, "which `name` of the teacher file (optional when it holds one)")
    teacher_allow_leak: bool = setting(
        False, "use a teacher or pseudo-labels that saw the scored fold anyway (only to measure the leak)"
    )
    distill_weight: float = setting(
        0.5,
        "teacher's share of the loss (1: teacher only)",
        ge=0,
        le=1,
        note="the teacher's share of the loss",
    )
    distill_temperature: float = setting(1.0, "temperature T on teacher and student", gt=0)
    label_smoothing: float = setting(0.0, "eps: hard targets (1 - eps) * one-hot + eps / classes", ge=0, lt=1)
    pseudo_path: str | None = setting(
        None,
        "pseudo-labelled rows added to every fold's training part",
        nonblank=True,
        note="a parquet path (or null for no pseudo-labels)",
    )


@dataclass
class QAwareConfig:
    """Quantization-aware variants (variants/qaware.py): INT4 base, QA-LoRA / QA-HiRA, ApiQ, LoftQ, GPTQ."""

    def __post_init__(self) -> None:
        validate_section(self)

    group_size: int = setting(64, "INT4 group along the input dim (divides in_features)", ge=1)
    int4_method: Literal["rtn", "hqq"] = setting("hqq", "rtn: integer zero points; hqq: optimised float ones")
    adapter_rank: int = setting(16, "QA-LoRA rank", ge=1)
    adapter_alpha: float = setting(16.0, "QA-LoRA alpha", gt=0)
    hira_output_repeat: int | None = setting(
        None, "QA-HiRA repeat (None: QA-LoRA rank's parameter count)", ge=1
    )
    apiq_rows: int = setting(128, "ApiQ calibration rows", ge=1)
    apiq_epochs: int = setting(20, "ApiQ epochs per block", ge=1)
    apiq_batch_size: int = setting(8, "ApiQ batch size", ge=1)
    apiq_lora_lr: float = setting(5e-4, "ApiQ LoRA learning rate", gt=0)
    apiq_clip_lr: float = setting(5e-3, "ApiQ clipping learning rate", gt=0)
    loftq_iterations: int = setting(1, "LoftQ alternating steps (1: peft's one-step init)", ge=1)
    gptq_bits: Literal[4, 8] = setting(8, "GPTQ weight bits (symmetric int)")
    gptq_group_size: int = setting(128, "GPTQ group along the input dim (divides in_features)", ge=1)
    gptq_rows: int = setting(128, "GPTQ calibration rows from the fold's training part", ge=1)


@dataclass
class InferenceConfig:
    """Offline prediction under Kaggle's limits."""

    def __post_init__(self) -> None:
        validate_section(self)

    token_budget: int = setting(8192, "tokens per batch (rows x padded length), per device", ge=1)
    max_rows_per_batch: int | None = setting(64, "rows per batch at most, whatever the budget", ge=1)
    tta_swap: bool = setting(True, "also predict the A/B-swapped rows and average")
    layout: Literal["shared_queue", "view_per_device"] = setting(
        "shared_queue", "shared_queue: devices pull the next longest batch; view_per_device: one view each"
    )
    ensemble_layout: Literal["sequential", "member_per_device"] = setting(
        "sequential", "ensemble members one after another (cheapest first), or one member per device"
    )
    device: Literal["auto", "cuda", "cpu", "tpu"] = setting("auto", "where to predict")
    num_gpus: int | None = setting(None, "GPUs to use (None: all visible)", ge=1)
    worker_backend: Literal["thread", "process"] = setting(
        "thread", "one worker thread per device, or one process (a dying one has its batch redone)"
    )
    cpu_replicas: int = setting(1, "model replicas side by side on CPU", ge=1)
    batch_timeout_s: float | None = setting(
        None, "process backend: seconds before a silent batch's worker is killed", gt=0
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "auto", "auto: bf16 where native, fp16 on T4"
    )
    deadline_hours: float = setting(9.0, "Kaggle's limit, from the notebook's start", gt=0)
    safety_margin_hours: float = setting(0.75, "kept free for loading, fallback and writing", ge=0)
    warmup_batches: int = setting(3, "batches per device left out of the rate projection", ge=0)
    max_consecutive_failures: int = setting(3, "failed batches in a row that retire a device", ge=1)
    raise_after_write: bool = setting(False, "re-raise batch errors after the valid file is written")
    progress: bool = setting(True, "progress bar")
    verify_hashes: bool = setting(True, "check every artifact file's sha256 before loading")


@dataclass
class KaggleConfig:
    """Kaggle accounts, slugs and kernel settings for `python -m kaggle_utils kaggle ...`."""

    def __post_init__(self) -> None:
        validate_section(self)

    owner: str | None = setting(None, "Kaggle user (None: the authenticated one)")
    competition: str = setting("llm-classification-finetuning", "competition slug")
    submission_kernel: str = setting("arena-preference-submission", "kernel slug; its title is derived")
    artifact_dataset: str = setting("arena-preference-artifact", "dataset holding the artifact")
    wheels_dataset: str = setting("kaggle-utils-wheels", "dataset of third-party wheels the image lacks")
    package_dataset: str | None = setting(
        "kaggle-utils-package", "dataset of the kaggle_utils wheel alone (None: in the wheels)"
    )
    machine_shape: str = setting("NvidiaTeslaT4", "kernel accelerator (two T4s, as a submission runs)")
    base_model_source: str | None = setting(
        None, "Kaggle model the training kernels attach (owner/model/framework/variation/version)"
    )
    is_private: bool = setting(True, "kernels and datasets private")
    build_dir: str = setting("build/kaggle", "where kernels and datasets are assembled")
    wheel_packages: tuple[str, ...] = setting(
        ("transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "safetensors", "huggingface-hub",
         "polars"),
        "packages whose installed versions (and dependencies) become wheels",
    )  # fmt: skip
    wheel_exclude: tuple[str, ...] = setting(
        ("torch", "triton", "nvidia-*", "numpy", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
         "filelock", "fsspec", "typing-extensions", "setuptools", "pip", "wheel"),
        "what Kaggle's image ships and must keep (torch and its CUDA stack)",
    )  # fmt: skip
    wheel_python_version: str = setting(KAGGLE_IMAGE["python"], "Kaggle image's Python")
    wheel_platform: str = setting(KAGGLE_IMAGE["platform"], "Kaggle image's platform tag")


@dataclass
class PipelineConfig:
    """Everything, for YAML/CLI. Sections are independent; each stage takes only its own."""

    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    qaware: QAwareConfig = field(default_factory=QAwareConfig)
    kaggle: KaggleConfig = field(default_factory=KaggleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PipelineConfig:
        raw = raw or {}
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(
            **{
                f.name: build_section(hints[f.name], raw.get(f.name) or {}, f.name)
                for f in dataclasses.fields(cls)
            }
        )

    def with_overrides(self, overrides: dict[str, dict[str, Any]] | None) -> PipelineConfig:
        """A copy with some fields of some sections replaced (a notebook's OVERRIDES parameter), the other
        fields kept; unknown sections or keys are refused as `from_dict` refuses them."""
        merged = self.to_dict()
        for section, values in (overrides or {}).items():
            if section not in merged:
                raise ValueError(f"unknown config sections: {[section]}")
            if not isinstance(values, dict):
                raise ValueError(
                    f"config overrides for section '{section}' must be a mapping, got {values!r}"
                )
            merged[section].update(values)
        return type(self).from_dict(merged)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(load_yaml_unique(handle))

    def to_yaml_text(self) -> str:
        return yaml.safe_dump(plain(self.to_dict()), sort_keys=False)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml_text(), encoding="utf-8")


def save_resolved(cfg: PipelineConfig, out_dir: str | Path) -> Path:
    """Write every value `cfg` holds (defaults included) to `<out_dir>/resolved_config.yaml`, atomically, so a
    run's outputs say how they were made; `PipelineConfig.from_yaml` reads it back."""
    return atomic_write_bytes(Path(out_dir) / RESOLVED_CONFIG_NAME, cfg.to_yaml_text().encode("utf-8"))


def validate_section(section: Any) -> None:
    """Check every field of a config section against its annotation (Literal choices, bool/int/float/str,
    optional, tuples) and its `setting` range, at construction (and again by callers that change fields):
    a bad value fails here naming `section.field`. Repairs are lossless (`config_loading.check_value`)."""
    cls = type(section)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(section):
        where = f"{_SECTION_NAMES.get(cls.__name__, cls.__name__)}.{f.name}"
        value = check_value(where, getattr(section, f.name), hints[f.name])
        object.__setattr__(section, f.name, value)
        bound = f.metadata.get("range")
        if bound is not None and value is not None and not bound.allows(value):
            raise ConfigError(f"config {where} must be {bound.describe()}, got {value!r}")
    if isinstance(section, InferenceConfig) and section.safety_margin_hours >= section.deadline_hours:
        raise ConfigError(
            f"config inference.safety_margin_hours ({section.safety_margin_hours}) must be below "
            f"deadline_hours ({section.deadline_hours}): no time would be left to predict"
        )


# Section class -> its key in PipelineConfig / the YAML, for messages.
_SECTION_NAMES: dict[str, str] = {
    typing.get_type_hints(PipelineConfig)[f.name].__name__: f.name for f in dataclasses.fields(PipelineConfig)
}
