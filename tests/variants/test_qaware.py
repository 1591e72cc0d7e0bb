"""The quantization-aware variants train through training.train_fold and ship what they promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_utils.core.config import PipelineConfig, TrainConfig
from kaggle_utils.data.folds import make_folds
from kaggle_utils.quant.group_adapters import GroupPooledAdapterLinear
from kaggle_utils.quant.int4 import Int4Linear
from kaggle_utils.variants import qaware as variants
from kaggle_utils.variants.registry import resolve_variants


@pytest.fixture(scope="module")
def folds(train_data):
    from kaggle_utils.core.config import FoldConfig

    return make_folds(train_data.frame, FoldConfig(n_folds=4, seed=0))


def short_config(ordering: str = "quant-then-ft") -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model.gradient_checkpointing = False
    cfg.format.max_length = 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.0
    cfg.qaware.group_size, cfg.qaware.adapter_rank = 16, 4
    cfg.qaware.apiq_epochs, cfg.qaware.apiq_rows = 2, 16
    cfg.train = TrainConfig(
        ordering=ordering,
        learning_rate=2e-3,
        max_steps=3,
        per_device_batch_size=8,
        grad_accum=1,
        eval_every_steps=3,
        save_every_steps=100,
    )
    return cfg


def held_out_ids(result, train_data, tokenizer, cfg):
    import polars as pl

    from kaggle_utils.text.encode import encode_rows

    return encode_rows(
        train_data.frame.filter(pl.col("id").is_in(result.val_ids)), tokenizer, cfg.format
    ).input_ids


@pytest.mark.parametrize("kind", ["qa-lora", "qa-hira"])
def test_group_adapter_variant_trains_merges_exactly_and_has_a_16bit_reference(
    kind, train_data, folds, demo_tokenizer, tmp_path
):
    from kaggle_utils.models.classifier import predict_probs
    from kaggle_utils.train.loop import train_fold

    torch.set_num_threads(2)
    cfg = short_config()
    result = train_fold(
        cfg,
        train_data.frame,
        folds,
        demo_tokenizer,
        tmp_path,
        fold=0,
        build_model=variants.make_group_adapter_builder(kind),
        progress=False,
    )
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".hira_" in n or n.startswith("score.") for n in trainable)
    assert any(n.startswith("score.") for n in trainable)
    val_ids = held_out_ids(result, train_data, demo_tokenizer, cfg)
    pad = demo_tokenizer.pad_token_id
    trained = predict_probs(result.model, val_ids, pad)
    np.testing.assert_allclose(trained, result.val_probs, atol=1e-6)

    shipped = variants.merged_group_adapter_model(result.model)
    assert not any(isinstance(m, GroupPooledAdapterLinear) for m in shipped.modules())
    assert sum(isinstance(m, Int4Linear) for m in shipped.modules()) == 14
    np.testing.assert_allclose(predict_probs(shipped, val_ids, pad), trained, atol=1e-6)

    reference = variants.group_adapter_reference(cfg, result.model, demo_tokenizer)
    assert not any(isinstance(m, Int4Linear) for m in reference.modules())
    reference_probs = predict_probs(reference, val_ids, pad)
    difference = float(np.abs(reference_probs - trained).max())
    assert 0 < difference < 0.2  # the same adapter, only the base's quantization differs


def test_apiq_variant_builds_a_qlora_model_with_fitted_factors(train_data, demo_tokenizer):
    import bitsandbytes as bnb

    cfg = short_config()
    report: dict = {}
    rows = variants.calibration_rows(train_data.frame.head(64), demo_tokenizer, cfg, 16)
    assert len(rows) == 16
    model = variants.make_apiq_builder(rows, report)(cfg, demo_tokenizer, torch.device("cpu"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # default init: zeros
    errors = report["apiq_block_errors"]
    assert len(errors) == 2 and all(e["apiq"] < e["default"] for e in errors)


def test_loftq_variant_trains_on_cpu_and_its_artifact_reloads(train_data, folds, demo_tokenizer, tmp_path):
    """LoftQ runs on CPU (bitsandbytes NF4 on CPU tensors); the fitted 4-bit base survives the artifact."""
    import bitsandbytes as bnb

    from kaggle_utils.models.classifier import predict_probs
    from kaggle_utils.quant.artifacts import load_artifact, save_artifact
    from kaggle_utils.train.loop import train_fold

    cfg = short_config()
    cfg.qaware.loftq_iterations = 2
    (loftq,) = resolve_variants(["loftq"])
    assert loftq.unavailable is None or loftq.unavailable() is None
    result = train_fold(
        cfg,
        train_data.frame,
        folds,
        demo_tokenizer,
        tmp_path / "run",
        fold=0,
        build_model=variants.build_loftq_model,
        progress=False,
    )
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in result.model.modules()) == 14
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(float(p.detach().abs().max()) > 0 for p in lora_b)
    val_ids = held_out_ids(result, train_data, demo_tokenizer, cfg)[:16]
    trained = predict_probs(result.model.eval(), val_ids, demo_tokenizer.pad_token_id)
    fields = {
        "ordering": "quant-then-ft",
        "variant": "loftq",
        "base_model": "tiny",
        "folds_file_hash": "x",
        "cv_scores": {},
    }
    save_artifact(tmp_path / "artifact", result.model, demo_tokenizer, fields, cfg.format)
    loaded = load_artifact(tmp_path / "artifact", device="cpu", compute_dtype=torch.float32)
    np.testing.assert_allclose(
        predict_probs(loaded.model, val_ids, demo_tokenizer.pad_token_id), trained, atol=1e-4
    )


def test_every_fine_tune_then_quantize_variant_provides_the_common_reference():
    """A comparison of only the scheme variants (as reports/compare_qaware runs) still gets qid_vs_common."""
    from kaggle_utils.evaluate.cv_report import attach_common_reference

    chosen = resolve_variants(["quant-then-ft", "ft-then-quant-int8", "ft-then-quant-nf4"])
    runs = [
        {
            "variant": v.name,
            "seed": 42,
            "rows": 4,
            "provides_common_reference": v.common_reference,
            "cv_log_loss_16bit": 0.90 + i / 100,
            "cv_log_loss_quantized": 0.91 + i / 100,
            "per_fold": [{"fold": 0, "log_loss_16bit": 0.90 + i / 100, "log_loss_quantized": 0.91 + i / 100}],
        }
        for i, v in enumerate(chosen)
    ]
    common = attach_common_reference(runs)
    assert common["variant"] == "ft-then-quant-int8"
    assert [round(run["qid_vs_common"], 6) for run in runs] == [0.0, 0.01, 0.02]
    assert runs[0]["per_fold"][0]["log_loss_common_reference"] == 0.91


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_both_orderings_have_a_variant_per_bitsandbytes_scheme(scheme):
    """The real-weights study runs both orderings at 8 and 4 bits side by side, whatever quant.scheme says."""
    from kaggle_utils.core.config import PipelineConfig

    for ordering in ("ft-then-quant", "quant-then-ft"):
        (variant,) = resolve_variants([f"{ordering}-{scheme}"])
        assert variant.ordering == ordering
        other = "nf4" if scheme == "int8" else "int8"
        cfg = PipelineConfig()
        cfg.quant.scheme = other
        assert variant.configure(cfg).quant.scheme == scheme


def test_gptq_group_size_is_checked_before_training(demo_tokenizer, demo_base_dir, train_data):
    """A group size that does not divide the layer widths fails when the model is built, not after the fold
    trained (the tiny Gemma-2 is 64 wide: 128 cannot work, 32 can)."""
    import torch

    from kaggle_utils.core.config import PipelineConfig
    from kaggle_utils.core.errors import UsageError
    from kaggle_utils.variants.registry import VARIANTS, FoldContext

    cfg = PipelineConfig().with_overrides(
        {"model": {"base_model": str(demo_base_dir)}, "train": {"ordering": "ft-then-quant"}}
    )
    ctx = FoldContext(
        cfg=cfg,
        fold=0,
        seed=0,
        train_frame=train_data.frame,
        tokenizer=demo_tokenizer,
        base_dir=demo_base_dir,
        device=torch.device("cpu"),
    )
    build = VARIANTS["ft-then-quant-gptq8"].builder(ctx)
    with pytest.raises(
        UsageError, match=r"gptq_group_size 128 must divide every layer's in_features \(not \[64"
    ):
        build(cfg, demo_tokenizer, torch.device("cpu"))
    small = cfg.with_overrides({"qaware": {"gptq_group_size": 32}})
    assert build(small, demo_tokenizer, torch.device("cpu")) is not None
