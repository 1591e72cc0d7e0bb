"""Typed configuration for every stage: the one place where defaults live.

Defaults follow the winners' published settings where they are known (COMPETITION.md): LoRA r64/alpha16 on all
linear layers with no frozen layers (public ladder 0.913 -> 0.903), lr 1e-4 for QLoRA (3rd place), max length
2048 with the end of the conversation kept (ladder 0.895 -> 0.885), swap augmentation and swap TTA, 5 grouped
folds. Each stage reads only its own section; `PipelineConfig` bundles them for the CLI and YAML front.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kaggle_utils.core.errors import ConfigError

# The Kaggle image build-wheels targets (Python, platform, the torch it ships), written once: in this JSON file.
KAGGLE_IMAGE_FILE = Path(__file__).resolve().parents[1] / "resources" / "kaggle_image.json"
KAGGLE_IMAGE: dict[str, Any] = json.loads(KAGGLE_IMAGE_FILE.read_text(encoding="utf-8"))

LABEL_COLUMNS: tuple[str, str, str] = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_NAMES: tuple[str, str, str] = ("a", "b", "tie")


@dataclass
class DataConfig:
    """Where the competition files are and which dialect they speak."""

    def __post_init__(self) -> None:
        validate_section(self)

    # "lmsys": CSV with JSON-list columns and one-hot winner columns (lmsys-chatbot-arena,
    # llm-classification-finetuning). "wsdm": parquet with plain-string columns and `winner` = model_a|model_b.
    # The name of a registered competition dialect (kaggle_utils/data/dialects.py): it also fixes the metric and the
    # submission file, and training records it in the artifact's manifest. A plain string, not a Literal, so a
    # new dialect is one registration; an unregistered name fails when the data is read (dialects.get_dialect).
    format: str = "lmsys"
    train_path: str | None = None
    test_path: str | None = None
    # Rows whose turns cannot be recovered at all are dropped and reported by id (never silently); with
    # strict=True they raise instead.
    strict: bool = False


@dataclass
class FoldConfig:
    """Stratified K-fold grouped by normalised prompt (2nd place's scheme; row folds leak)."""

    def __post_init__(self) -> None:
        validate_section(self)

    n_folds: int = 5
    seed: int = 42


@dataclass
class BaselineConfig:
    """Feature baseline (lengths, turns, formatting -> scikit-learn): the sanity check (~1.065 on real data)
    and inference's cheap fallback predictor."""

    def __post_init__(self) -> None:
        validate_section(self)

    model: Literal["hgb", "logreg"] = "hgb"
    max_iter: int = 100
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 40
    l2_regularization: float = 1.0
    # Train on each row and its A/B-swapped copy, predict as the mean of both orders (position symmetry).
    swap_augmentation: bool = True
    seed: int = 42
    # OpenMP/BLAS threads while fitting and predicting (None: the libraries' default, all cores). The fits are
    # small; on a shared 2-core box OpenMP's busy-waiting made them about 10x slower than one thread.
    n_threads: int | None = 1


@dataclass
class FormatConfig:
    """Conversation -> text -> tokens. Changing the template must change `template_version`."""

    def __post_init__(self) -> None:
        validate_section(self)

    template: Literal["gemma", "llama3", "chatml", "plain", "auto"] = "gemma"  # auto: the tokenizer's family
    max_length: int = 2048
    # Which turns survive when a conversation is too long: last first, first first, or alternating ends.
    truncation: Literal["keep_end", "keep_start", "head_tail"] = "keep_end"
    # A cut piece keeps this share of its kept tokens from its start and the rest from its end (0 < x < 1:
    # both its first and last token survive; 0: only the end, 1: only the start).
    head_fraction: float = 0.5
    # Pieces of a cut turn that fit an equal share are kept whole; the pieces that must be cut split the rest
    # in proportion to their lengths (each keeps at least half an equal share; the longer response keeps more,
    # so the length signal survives) or equally ("equal": both cut responses keep the same amount).
    cut_split: Literal["proportional", "equal"] = "proportional"
    truncation_marker: str = " [...] "
    tokenizer_path: str | None = None  # local Gemma tokenizer dir; None -> the locally trained demo tokenizer


@dataclass
class ModelConfig:
    """Backbone and head. `base_model` is a local HF directory or a config.json (random weights)."""

    def __post_init__(self) -> None:
        validate_section(self)

    base_model: str = "tiny"  # "tiny" -> built-in 2-layer Gemma-2 config; a path -> local weights or config
    num_labels: int = 3
    # Gemma-2 soft-caps attention logits; eager is exact, SDPA ignores the cap.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 native, fp16 T4, fp32 CPU
    gradient_checkpointing: bool = True
    init_seed: int = (
        0  # random-weight bases (tiny / config.json): every ordering starts from the same weights
    )


@dataclass
class LoraSettings:
    """peft LoRA; winners: r64 / alpha16 on all linear layers, nothing frozen, head trained in full."""

    def __post_init__(self) -> None:
        validate_section(self)

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    modules_to_save: tuple[str, ...] = ("score",)
    frozen_layers: int = 0


@dataclass
class QuantConfig:
    """Quantization of the shipped model."""

    def __post_init__(self) -> None:
        validate_section(self)

    # ft-then-quant: scheme applied to the merged model; quant-then-ft: base loaded in nf4 for QLoRA.
    scheme: Literal["nf4", "int8"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    merge_adapter_into_quantized: bool = False  # quant-then-ft: also ship a merged copy and measure its error


@dataclass
class TrainConfig:
    """Training loop. Effective batch = per_device_batch_size * grad_accum * world size."""

    def __post_init__(self) -> None:
        validate_section(self)

    ordering: Literal["ft-then-quant", "quant-then-ft"] = "quant-then-ft"
    backend: Literal["hf", "unsloth"] = "hf"
    # lora: peft adapters on a frozen base; full: every weight trains (no peft), ft-then-quant only: the trained
    # model is quantized as a whole (`training.full_finetune_memory` states what that costs for a 9B model).
    method: Literal["lora", "full"] = "lora"
    learning_rate: float = 1e-4
    head_learning_rate: float | None = None  # None -> same as learning_rate
    epochs: float = 1.0
    per_device_batch_size: int = 1
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # A/B-swap augmentation. "double": every row in both orders each epoch (an epoch is twice the rows);
    # "random": every row once per epoch, in an order drawn per row and epoch from a seeded RNG (resumable);
    # "none": original order only. "double" measured better for quant-then-ft on the demo (README, "Training
    # choices"); "random" costs half the steps per epoch.
    swap_augment: Literal["none", "double", "random"] = "double"
    # Which weights ship. "final": the last step's (what the winners did after one epoch). "inner": the best
    # evaluation on an inner holdout carved from the training part (whole prompt groups, like the folds). Never
    # the reported held-out fold: that fold is scored exactly once, by the shipped weights.
    selection: Literal["final", "inner"] = "final"
    inner_holdout_fraction: float = (
        0.05  # "inner": share of the training rows held out (capped by eval_rows_cap)
    )
    # Rows scored at each evaluation during training: the inner holdout ("inner"), or a fixed seeded sample of
    # the held-out fold used only to draw the learning curve ("final"; 0: no evaluation during training).
    eval_rows_cap: int = 512
    evals_per_run: int = 10  # evaluations during training, evenly spaced (the last at the final step)
    eval_every_steps: int | None = None  # explicit interval instead of evals_per_run
    save_every_steps: int = 200
    optimizer: Literal["auto", "adamw", "adamw_8bit"] = "auto"  # auto: 8-bit on CUDA, torch AdamW on CPU
    seed: int = 42
    max_steps: int | None = None  # cap for demos and tests
    eval_token_budget: int = 8192  # tokens per evaluation batch (rows x padded length)
    cv_folds: tuple[int, ...] | None = (
        None  # folds compare-orderings trains (None: all); `train --fold` is one
    )
    # Folds whose rows the experiment never uses, neither trained on nor scored: a teacher for students held out
    # on those folds (nested folds: its OOF comes from models that never saw the students' held-out rows).
    exclude_folds: tuple[int, ...] | None = None
    # Soft targets (losses.distillation_loss, teacher.py). A teacher is an OOF-format parquet (id, p_a, p_b,
    # p_tie[, name]; e.g. a larger backbone's oof.parquet): its probabilities become each training row's soft
    # target. loss = distill_weight * T^2 * KL(teacher^(1/T) || softmax(logits / T))
    #        + (1 - distill_weight) * CE(logits, hard label smoothed by label_smoothing).
    # No teacher and label_smoothing > 0: plain label-smoothed cross-entropy (the teacher-free case).
    teacher_path: str | None = None
    teacher_name: str | None = None  # which `name` of the teacher file (optional when it holds one)
    # A teacher (or pseudo-labels) must be shown to have left out the fold the student is scored on (teacher.py,
    # pseudo_labels.py); true uses one that saw it, or whose file cannot tell, anyway: only to measure the leak
    # (reports/regenerate.sh levers). The train summary's `fold_check` says what was allowed.
    teacher_allow_leak: bool = False
    distill_weight: float = 0.5  # alpha in [0, 1]: 1 = teacher only, 0 = hard labels only
    distill_temperature: float = 1.0  # T > 0, on the teacher's probabilities and the student's logits
    label_smoothing: float = 0.0  # eps in [0, 1): hard targets (1 - eps) * one-hot + eps / classes
    # Pseudo-labelled rows (pseudo_labels.save_pseudo_labels) added to every fold's training part only; rows
    # sharing a prompt group with that fold's held-out (or inner holdout) rows are dropped, counted.
    pseudo_path: str | None = None


@dataclass
class QAwareConfig:
    """Quantization-aware variants (kaggle_utils.variants.qaware): group-wise INT4 base, QA-LoRA / QA-HiRA, ApiQ init."""

    def __post_init__(self) -> None:
        validate_section(self)

    group_size: int = 64  # INT4 group along the input dim; must divide every target layer's in_features
    int4_method: Literal["rtn", "hqq"] = "hqq"  # rtn: integer zero points; hqq: HQQ's optimised float ones
    adapter_rank: int = 16  # QA-LoRA rank (a foldable update has rank <= in_features / group_size)
    adapter_alpha: float = 16.0
    hira_output_repeat: int | None = None  # QA-HiRA: None -> QA-LoRA rank's parameter count
    apiq_rows: int = 128  # calibration rows (the ApiQ paper: 128 samples)
    apiq_epochs: int = 20
    apiq_batch_size: int = 8
    apiq_lora_lr: float = 5e-4
    apiq_clip_lr: float = 5e-3
    loftq_iterations: int = 1  # LoftQ alternating steps (1: peft's one-step init; the paper uses up to 5)
    gptq_bits: Literal[4, 8] = 8  # GPTQ (quant_backends.gptq, llmcompressor): weight bits, symmetric int
    gptq_group_size: int = (
        128  # GPTQ group along the input dim; must divide every quantized layer's in_features
    )
    gptq_rows: int = 128  # GPTQ calibration rows, drawn from the fold's training part


@dataclass
class InferenceConfig:
    """Offline prediction under Kaggle's limits."""

    def __post_init__(self) -> None:
        validate_section(self)

    token_budget: int = 8192  # tokens per batch (rows * padded length), per device
    max_rows_per_batch: int | None = 64  # cap on rows per batch whatever the budget (short rows)
    tta_swap: bool = True
    # shared_queue: every device pulls the next longest batch (original order first, then swapped).
    # view_per_device: the winners' 2-GPU layout (original on GPU0, swapped on GPU1); a device whose view is
    # done helps with the other, so both stay busy to the end.
    layout: Literal["shared_queue", "view_per_device"] = "shared_queue"
    # An ensemble artifact (ensembles.py) predicts member by member. sequential: each member on every device,
    # cheapest first, so the time guard cuts the most expensive member's remaining rows first.
    # member_per_device: the winners' 2-GPU layout, one member per device side by side (needs as many devices
    # as model members; otherwise sequential, said in the report).
    ensemble_layout: Literal["sequential", "member_per_device"] = "sequential"
    device: Literal["auto", "cuda", "cpu", "tpu"] = "auto"
    num_gpus: int | None = None  # None -> all visible
    # thread: one worker thread per device, all replicas in this process. process: one spawned worker process
    # per device, each loading its own replica, the scheduler staying here; a worker that dies (killed, CUDA
    # fault) has its batch redone by the others instead of taking the run down (kaggle_utils/inference/workers.py).
    worker_backend: Literal["thread", "process"] = "thread"
    cpu_replicas: int = 1  # on CPU: model replicas (workers) to run side by side; stand-ins for GPUs in tests
    # process backend: a batch with no answer after this many seconds is a hung device; its process is killed
    # and the batch redone by another worker. None: only the deadline does that (a thread cannot be killed).
    batch_timeout_s: float | None = None
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 native, fp16 T4
    deadline_hours: float = 9.0  # Kaggle's limit, counted from the notebook's start
    safety_margin_hours: float = 0.75  # kept free for loading, the fallback and writing
    warmup_batches: int = 3  # per device, excluded from the rate used for the projection
    max_consecutive_failures: int = 3  # a device that fails this many batches in a row is retired
    # False: batch errors are logged and their rows served by the fallback, and predict() returns normally
    # (on Kaggle any exception fails the submission). True: re-raise after the valid file is written.
    raise_after_write: bool = False
    progress: bool = True
    # Check every artifact file against its manifest sha256 before loading. hashlib sha256 ran at 0.65-0.97
    # GB/s on a shared 2-core EPYC with SHA-NI: ~10-15 s for an 8-bit 9B artifact (~9.5 GB), ~6-9 s for a
    # 4-bit one (~5.5 GB). False skips it: only for an artifact you just checked.
    verify_hashes: bool = True


@dataclass
class KaggleConfig:
    """Kaggle accounts, slugs and kernel settings for `python -m kaggle_utils kaggle ...` (kaggle_cli.py)."""

    def __post_init__(self) -> None:
        validate_section(self)

    owner: str | None = (
        None  # None -> the authenticated user (KAGGLE_USERNAME, kaggle.json or the token's user)
    )
    competition: str = "llm-classification-finetuning"
    submission_kernel: str = "arena-preference-submission"  # kernel slug; the title is derived from it
    artifact_dataset: str = "arena-preference-artifact"
    wheels_dataset: str = "kaggle-utils-wheels"  # third-party wheels the Kaggle image lacks
    package_dataset: str | None = (
        "kaggle-utils-package"  # the kaggle_utils wheel alone; None -> in the wheels
    )
    machine_shape: str = "NvidiaTeslaT4"  # two T4s, the GPU a code-competition submission runs on
    # Kaggle model the training kernels attach (owner/model/framework/variation/version), e.g. a Gemma-2 9B
    # checkpoint; None: none attached (the notebooks then train the config-built model).
    base_model_source: str | None = None
    is_private: bool = True
    build_dir: str = "build/kaggle"
    # Wheels for an offline notebook: these packages at the versions installed here, plus their dependencies
    # minus `wheel_exclude` (what Kaggle's image already ships and must keep: torch and its CUDA stack).
    wheel_packages: tuple[str, ...] = (
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "tokenizers",
        "safetensors",
        "huggingface-hub",
        "polars",
    )
    wheel_exclude: tuple[str, ...] = (
        "torch",
        "triton",
        "nvidia-*",
        "numpy",
        "sympy",
        "mpmath",
        "networkx",
        "jinja2",
        "markupsafe",
        "filelock",
        "fsspec",
        "typing-extensions",
        "setuptools",
        "pip",
        "wheel",
    )
    # Kaggle's image, as resources/kaggle_image.json states it (with the torch it ships): Python, and the platform
    # (Ubuntu 22.04, glibc 2.35; every older manylinux tag of the same architecture fits too).
    wheel_python_version: str = KAGGLE_IMAGE["python"]
    wheel_platform: str = KAGGLE_IMAGE["platform"]


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
        kwargs = {}
        for f in dataclasses.fields(cls):
            section_cls = type(getattr(cls(), f.name))
            kwargs[f.name] = _build_section(section_cls, raw.get(f.name) or {}, f.name)
        return cls(**kwargs)

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

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False), encoding="utf-8")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}); keep one"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_unique(stream: Any) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is a ConfigError naming the key and its lines."""
    loader = _UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------------------------ validation

# Ranges beyond the types. A predicate per `section.field` (the YAML's names); None values of optional fields are not checked.
_POSITIVE: Callable[[Any], bool] = lambda v: v > 0  # noqa: E731
_AT_LEAST_ONE: Callable[[Any], bool] = lambda v: v >= 1  # noqa: E731
_NON_NEGATIVE: Callable[[Any], bool] = lambda v: v >= 0  # noqa: E731
_OPEN_UNIT: Callable[[Any], bool] = lambda v: 0 < v < 1  # noqa: E731
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "folds.n_folds": (lambda v: v >= 2, ">= 2"),
    "baseline.max_iter": (_AT_LEAST_ONE, ">= 1"),
    "baseline.learning_rate": (_POSITIVE, "> 0"),
    "baseline.max_leaf_nodes": (lambda v: v >= 2, ">= 2"),
    "baseline.min_samples_leaf": (_AT_LEAST_ONE, ">= 1"),
    "baseline.l2_regularization": (_NON_NEGATIVE, ">= 0"),
    "baseline.n_threads": (_AT_LEAST_ONE, ">= 1"),
    "format.max_length": (_AT_LEAST_ONE, ">= 1 (encode_rows names the template's real minimum)"),
    "format.head_fraction": (
        lambda v: 0 <= v <= 1,
        "in [0, 1] (0: only the end survives, 1: only the start)",
    ),
    "model.num_labels": (lambda v: v >= 2, ">= 2"),
    "lora.r": (_AT_LEAST_ONE, ">= 1"),
    "lora.alpha": (_POSITIVE, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.frozen_layers": (_NON_NEGATIVE, ">= 0"),
    "train.learning_rate": (_POSITIVE, "> 0"),
    "train.head_learning_rate": (_POSITIVE, "> 0"),
    "train.epochs": (_POSITIVE, "> 0"),
    "train.per_device_batch_size": (_AT_LEAST_ONE, ">= 1"),
    "train.grad_accum": (_AT_LEAST_ONE, ">= 1"),
    "train.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.weight_decay": (_NON_NEGATIVE, ">= 0"),
    "train.max_grad_norm": (_POSITIVE, "> 0"),
    "train.inner_holdout_fraction": (_OPEN_UNIT, "strictly between 0 and 1"),
    "train.eval_rows_cap": (_NON_NEGATIVE, ">= 0"),
    "train.evals_per_run": (_NON_NEGATIVE, ">= 0"),
    "train.eval_every_steps": (_AT_LEAST_ONE, ">= 1"),
    "train.save_every_steps": (_AT_LEAST_ONE, ">= 1"),
    "train.max_steps": (_AT_LEAST_ONE, ">= 1"),
    "train.eval_token_budget": (_AT_LEAST_ONE, ">= 1"),
    "train.distill_weight": (lambda v: 0 <= v <= 1, "in [0, 1] (the teacher's share of the loss)"),
    "train.distill_temperature": (_POSITIVE, "> 0"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.teacher_path": (lambda v: v.strip() != "", "a parquet path (or null for no teacher)"),
    "train.pseudo_path": (lambda v: v.strip() != "", "a parquet path (or null for no pseudo-labels)"),
    "qaware.group_size": (_AT_LEAST_ONE, ">= 1"),
    "qaware.adapter_rank": (_AT_LEAST_ONE, ">= 1"),
    "qaware.adapter_alpha": (_POSITIVE, "> 0"),
    "qaware.hira_output_repeat": (_AT_LEAST_ONE, ">= 1"),
    "qaware.apiq_rows": (_AT_LEAST_ONE, ">= 1"),
    "qaware.apiq_epochs": (_AT_LEAST_ONE, ">= 1"),
    "qaware.apiq_batch_size": (_AT_LEAST_ONE, ">= 1"),
    "qaware.apiq_lora_lr": (_POSITIVE, "> 0"),
    "qaware.apiq_clip_lr": (_POSITIVE, "> 0"),
    "qaware.loftq_iterations": (_AT_LEAST_ONE, ">= 1"),
    "qaware.gptq_group_size": (_AT_LEAST_ONE, ">= 1"),
    "qaware.gptq_rows": (_AT_LEAST_ONE, ">= 1"),
    "inference.token_budget": (_AT_LEAST_ONE, ">= 1"),
    "inference.max_rows_per_batch": (_AT_LEAST_ONE, ">= 1"),
    "inference.num_gpus": (_AT_LEAST_ONE, ">= 1"),
    "inference.cpu_replicas": (_AT_LEAST_ONE, ">= 1"),
    "inference.batch_timeout_s": (_POSITIVE, "> 0"),
    "inference.deadline_hours": (_POSITIVE, "> 0"),
    "inference.safety_margin_hours": (_NON_NEGATIVE, ">= 0"),
    "inference.warmup_batches": (_NON_NEGATIVE, ">= 0"),
    "inference.max_consecutive_failures": (_AT_LEAST_ONE, ">= 1"),
}


def validate_section(section: Any) -> None:
    """Check every field of a config section against its annotation (Literal choices, bool/int/float/str,
    optional, tuples) and `_RANGES`, at construction: a typo in a YAML file or a notebook's OVERRIDES fails
    here, naming `section.field`, not hours later deep inside training. Two repairs, both lossless: an int
    where a float is expected becomes that float, and a numeric string for a float field (PyYAML reads `1e-4`
    as text) becomes the number. Lists become tuples."""
    cls = type(section)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(section):
        where = f"{_SECTION_NAMES.get(cls.__name__, cls.__name__)}.{f.name}"
        value = _checked(where, getattr(section, f.name), hints[f.name])
        object.__setattr__(section, f.name, value)
        check = _RANGES.get(where)
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"config {where} must be {check[1]}, got {value!r}")
    if isinstance(section, InferenceConfig) and section.safety_margin_hours >= section.deadline_hours:
        raise ConfigError(
            f"config inference.safety_margin_hours ({section.safety_margin_hours}) must be below "
            f"deadline_hours ({section.deadline_hours}): no time would be left to predict"
        )


def _checked(where: str, value: Any, annotation: Any) -> Any:
    """`value` if it fits `annotation` (after the repairs `validate_section` names), else ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _checked(where, value, option)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"config {where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config {where} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_checked(f"{where}[{i}]", item, item_type) for i, item in enumerate(value))
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config {where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config {where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"config {where}: no check for the annotation {annotation!r}")


# Section class -> its key in PipelineConfig / the YAML, for messages.
_SECTION_NAMES: dict[str, str] = {
    typing.get_type_hints(PipelineConfig)[f.name].__name__: f.name for f in dataclasses.fields(PipelineConfig)
}


def _build_section(section_cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(
            f"unknown keys in config section '{name}': {sorted(unknown)} (known: {sorted(known)})"
        )
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return section_cls(**coerced)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
