"""Full fine-tuning (`train.method: full`): every weight trains, the trained model is quantized and shipped;
its memory for Gemma-2-9B from the config's shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Gemma2ForSequenceClassification

from kaggle_utils.core.config import FoldConfig, PipelineConfig, TrainConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.data.folds import make_folds
from kaggle_utils.models import classifier as modeling
from kaggle_utils.models.model_config import tiny_gemma2_config
from kaggle_utils.quant import artifacts
from kaggle_utils.train import loop as training
from kaggle_utils.train.full_finetune import (
    full_finetune_memory,
    gemma2_parameter_count,
    lora_parameter_count,
)
from kaggle_utils.train.model_setup import default_build_model
from kaggle_utils.variants import qaware as _qaware_variants  # noqa: F401  (registers the variants)
from kaggle_utils.variants.registry import VARIANTS, ExportContext, FoldContext

GEMMA2_9B = Path("/work/shared/reference/gemma-2-9b-config.json")
# The checked-in shape of google/gemma-2-9b (the fields the count uses), so the test runs
# without /work/shared.
GEMMA2_9B_SHAPE = {
    "vocab_size": 256000,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def test_gemma2_9b_parameter_count_from_its_shape():
    counts = gemma2_parameter_count(GEMMA2_9B_SHAPE, num_labels=3)
    embeddings = 256000 * 3584
    attention = 3584 * 4096 + 2 * 3584 * 2048 + 4096 * 3584  # q, k and v (8 KV heads of 256), o
    mlp = 3 * 3584 * 14336
    per_layer = attention + mlp + 4 * 3584
    assert counts["per_layer"] == per_layer == 198_195_200
    assert counts["backbone"] == embeddings + 42 * per_layer + 3584 == 9_241_705_984
    assert counts["total"] == 9_241_705_984 + 3 * 3584
    assert abs(counts["backbone"] / 9.24e9 - 1) < 0.001
    if GEMMA2_9B.is_file():  # the reference file says the same shape
        assert gemma2_parameter_count(json.loads(GEMMA2_9B.read_text()))["total"] == counts["total"]


def test_the_count_formula_matches_a_built_gemma2_classifier():
    config = tiny_gemma2_config(vocab_size=512)
    model = Gemma2ForSequenceClassification(config)
    assert gemma2_parameter_count(config.to_dict())["total"] == sum(p.numel() for p in model.parameters())


def test_full_finetune_memory_for_9b_beside_lora_r16():
    report = full_finetune_memory(GEMMA2_9B_SHAPE, lora_r=16)
    n = report["parameters"]
    assert report["full_mixed_precision"]["total"] == report["full_fp32"]["total"] == 16 * n
    assert report["full_mixed_precision"]["master_weights_fp32"] == 4 * n
    n_lora = lora_parameter_count(GEMMA2_9B_SHAPE, 16)
    assert (
        report["lora_trainable_parameters"]
        == n_lora
        == 42 * 16 * (2 * (3584 + 4096) + 2 * (3584 + 2048) + 3 * (3584 + 14336)) + 3 * 3584
    )
    assert report["lora"]["total"] == 2 * n + 16 * n_lora
    assert 137 < report["full_mixed_precision"]["total"] / 1024**3 < 138  # ~137.7 GiB before activations


def _full_config(base_dir) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model.base_model = str(base_dir)
    cfg.model.gradient_checkpointing = False
    cfg.format.max_length = 128
    cfg.train = TrainConfig(
        ordering="ft-then-quant",
        method="full",
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=4,
        grad_accum=1,
        max_steps=2,
        save_every_steps=1000,
        eval_rows_cap=8,
        evals_per_run=1,
    )
    cfg.quant.scheme = "int8"
    return cfg


def test_full_method_makes_every_weight_trainable_without_peft(demo_tokenizer, demo_base_dir):
    model = default_build_model(_full_config(demo_base_dir), demo_tokenizer, torch.device("cpu"))
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())


def test_quant_then_ft_with_full_method_is_refused(demo_tokenizer, demo_base_dir):
    cfg = _full_config(demo_base_dir)
    cfg.train.ordering = "quant-then-ft"
    with pytest.raises(UsageError, match="train.method 'full' needs train.ordering 'ft-then-quant'"):
        default_build_model(cfg, demo_tokenizer, torch.device("cpu"))


def test_full_then_quant_trains_every_weight_and_ships_a_loadable_artifact(
    train_data, demo_tokenizer, demo_base_dir, tmp_path
):
    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = _full_config(demo_base_dir)
    before = modeling.build_classifier(
        cfg.model, vocab_size=len(demo_tokenizer), pad_token_id=demo_tokenizer.pad_token_id, device="cpu"
    ).state_dict()
    result = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "run", progress=False)
    assert result.trainable_params == result.total_params
    after = dict(result.model.named_parameters())
    assert set(after) == set(before)
    unchanged = [name for name, param in after.items() if torch.equal(param.detach().cpu(), before[name])]
    assert not unchanged, unchanged  # every parameter moved: embeddings, norms, projections and the head

    variant = VARIANTS["full-then-quant"]
    assert variant.ordering == "ft-then-quant" and variant.configure(PipelineConfig()).train.method == "full"
    fold_ctx = FoldContext(
        cfg=cfg,
        fold=0,
        seed=0,
        train_frame=frame,
        tokenizer=demo_tokenizer,
        base_dir=Path(demo_base_dir),
        device=torch.device("cpu"),
    )
    fields = {
        "ordering": "ft-then-quant",
        "variant": "full-then-quant",
        "base_model": str(demo_base_dir),
        "folds_file_hash": "0" * 64,
        "cv_scores": {"fold_0": 1.0},
    }
    exported = variant.export(
        ExportContext(fold_ctx=fold_ctx, result=result, artifact_dir=tmp_path / "art", manifest_fields=fields)
    )
    loaded = artifacts.load_artifact(exported.artifact_dir, device="cpu", compute_dtype=torch.float32)
    assert loaded.manifest["quant_scheme"] == "int8" and not loaded.manifest["has_adapter"]
    rows = [[2, 7, 9, 11, 13, 40], [2, 5, 6, 8, 30, 31, 32, 33]]
    pad = demo_tokenizer.pad_token_id
    shipped = modeling.predict_probs(loaded.model, rows, pad, token_budget=128)
    reference = modeling.predict_probs(exported.reference_model, rows, pad, token_budget=128)
    np.testing.assert_allclose(shipped.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(shipped - reference).max() < 0.05  # int8 of the trained weights, not the untrained base
