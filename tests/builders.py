"""Builders shared by several test folders: tiny artifacts of both orderings, predict's test config, a fake
clock, an artifact-shaped folder. Import them as `from builders import ...` (tests/ is on sys.path)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import polars as pl
import torch

from kaggle_utils.core.config import FormatConfig, InferenceConfig, LoraSettings, ModelConfig, QuantConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


ORDERINGS = ("ft-then-quant", "quant-then-ft")


CLASS_PRIOR = [0.35, 0.34, 0.31]


def build_tiny_artifacts(out_dir: Path, tokenizer, max_length: int = 256) -> dict[str, Path]:
    """ft-then-quant: a random tiny classifier quantized to int8; quant-then-ft: an nf4 base + a LoRA adapter
    with non-zero weights (so the adapter changes predictions)."""
    from kaggle_utils.models import classifier as modeling
    from kaggle_utils.models import quantized as quantization
    from kaggle_utils.quant import artifacts

    model_cfg = ModelConfig()
    fmt = FormatConfig(max_length=max_length)
    common = {
        "variant": "test",
        "base_model": "tiny",
        "folds_file_hash": "none",
        "cv_scores": {},
        "class_prior": CLASS_PRIOR,
    }
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    merged = modeling.build_classifier(model_cfg, vocab_size=vocab, pad_token_id=pad, device="cpu")
    quantized = quantization.quantize_merged(merged, QuantConfig(scheme="int8"), model_cfg, device="cpu")
    paths = {
        "ft-then-quant": artifacts.save_artifact(
            out_dir / "ftq", quantized, tokenizer, {**common, "ordering": "ft-then-quant"}, fmt
        )
    }
    base = modeling.build_classifier(
        model_cfg, quant=QuantConfig(scheme="nf4"), vocab_size=vocab, pad_token_id=pad, device="cpu"
    )
    adapted = modeling.apply_lora(base, LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    paths["quant-then-ft"] = artifacts.save_artifact(
        out_dir / "qft", adapted, tokenizer, {**common, "ordering": "quant-then-ft"}, fmt
    )
    return paths


def predict_cfg(**overrides) -> InferenceConfig:
    values = {
        "device": "cpu",
        "token_budget": 2048,
        "max_rows_per_batch": 16,
        "warmup_batches": 1,
        "progress": False,
    }
    return InferenceConfig(**{**values, **overrides})


def read_probs(path) -> np.ndarray:
    return pl.read_csv(path).select("winner_model_a", "winner_model_b", "winner_tie").to_numpy()


def make_artifact(folder: Path, with_manifest: bool = True) -> Path:
    """A folder shaped like an artifact (subfolders included) whose manifest.json lists its files; the model
    files themselves are stand-ins (the upload never loads them)."""
    from kaggle_utils.quant.artifacts import LAYOUT_VERSION
    from kaggle_utils.quant.manifest import REQUIRED_FIELDS, file_table
    from kaggle_utils.text.template import TEMPLATE_VERSION

    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 64}')
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 128)
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"\x01" * 256)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "notes.txt").write_text("trained on fold 0")
    if with_manifest:
        manifest = dict(
            ordering="quant-then-ft",
            variant="quant-then-ft",
            base_model="tiny",
            quant_scheme="nf4",
            dtype="float32",
            max_length=128,
            template_version=TEMPLATE_VERSION,
            format_config={},
            folds_file_hash="0" * 64,
            cv_scores={},
            package_version="0",
            created_at="2026-11-28T00:00:00+00:00",
            layout_version=LAYOUT_VERSION,
            has_adapter=True,
            has_merged=False,
            files=file_table(folder),
        )
        assert set(manifest) >= set(REQUIRED_FIELDS)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def turns_frame(
    rows: list[list[tuple[str, str, str]]], labels: list[int | None] | None = None
) -> pl.DataFrame:
    """A frame in `load_competition`'s shape from rows of (prompt, response_a, response_b) turns."""
    data = {
        "id": list(range(100, 100 + len(rows))),
        "prompt": [[turn[0] for turn in row] for row in rows],
        "response_a": [[turn[1] for turn in row] for row in rows],
        "response_b": [[turn[2] for turn in row] for row in rows],
    }
    schema = {"id": pl.Int64, "prompt": pl.List(pl.String), "response_a": pl.List(pl.String),
              "response_b": pl.List(pl.String)}  # fmt: skip
    if labels is not None:
        data["label"] = labels
        schema["label"] = pl.Int8
    return pl.DataFrame(data, schema=schema)


def overconfident_rows(n: int = 600, temperature: float = 3.0, signal: float = 1.0, seed: int = 0):
    """(labels, over-sharpened probs, true probs, prompt groups) of `n` rows whose true class
    probabilities are softmax(N(0, signal)); `temperature` > 1 makes the predictions overconfident (what
    calibration fixes)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, signal, size=(n, 3))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in true])
    sharp = np.exp(logits * temperature)
    groups = rng.integers(0, n // 3, size=n)  # prompts shared by ~3 rows
    return labels, sharp / sharp.sum(axis=1, keepdims=True), true, groups
