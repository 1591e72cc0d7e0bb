"""ApiQ-style init: each quantized block (+ adapter) reproduces the 16-bit block better than default init."""

from __future__ import annotations

import copy

import pytest
import torch

from kaggle_utils.quant.apiq import (
    ApiQSettings,
    apiq_initialize,
    apply_clipping,
    block_output_errors,
    fake_quantize_nf4,
    load_lora_factors,
)

RANK, ALPHA = 8, 16


@pytest.fixture(scope="module")
def calibration(train_data, demo_tokenizer):
    from kaggle_utils.core.config import FormatConfig
    from kaggle_utils.text.encode import encode_rows

    encoded = encode_rows(train_data.frame.head(56), demo_tokenizer, FormatConfig(max_length=128))
    return encoded.input_ids[:32], encoded.input_ids[32:], demo_tokenizer.pad_token_id


@pytest.fixture(scope="module")
def fp_model(demo_tokenizer):
    from kaggle_utils.core.config import ModelConfig
    from kaggle_utils.models.classifier import build_classifier

    return build_classifier(
        ModelConfig(dtype="float32"),
        vocab_size=len(demo_tokenizer),
        pad_token_id=demo_tokenizer.pad_token_id,
        device="cpu",
    ).eval()


def test_fake_nf4_is_bitsandbytes_nf4():
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    assert torch.equal(fake_quantize_nf4(weight), bnb_functional.dequantize_4bit(packed, state))


def test_apiq_lowers_every_block_error_on_calibration_rows_int4(fp_model, calibration):
    torch.manual_seed(0)
    rows, _, pad = calibration
    result = apiq_initialize(
        fp_model,
        rows,
        pad,
        ApiQSettings(quantizer="int4", group_size=16, rank=RANK, alpha=ALPHA, epochs=6, batch_size=8),
    )
    assert len(result.block_errors) == 2 and len(result.lora) == 14
    for error in result.block_errors:
        assert error.apiq < 0.8 * error.default, error
        assert error.isolated_after < error.isolated_before, error
    clips = torch.cat([c.flatten() for pair in result.clip.values() for c in pair])
    assert (
        float(clips.min()) >= 0.5 and float(clips.max()) <= 1.0 and float(clips.min()) < 1.0
    )  # learned, bounded
    quantized = apply_clipping(fp_model, result)
    assert quantized is not None and set(quantized) == set(result.lora)


def test_apiq_nf4_init_beats_default_qlora_init_on_held_out_rows(fp_model, calibration, tmp_path):
    """The real pipeline: clipped weights quantized by bitsandbytes (double quant on), peft LoRA loaded with
    the fitted factors, compared with the default QLoRA model (same base, B = 0) on rows not used to fit."""
    from kaggle_utils.core.config import LoraSettings, ModelConfig, QuantConfig
    from kaggle_utils.models.classifier import apply_lora, build_classifier

    torch.manual_seed(0)
    rows, held_out, pad = calibration
    result = apiq_initialize(
        fp_model, rows, pad, ApiQSettings(quantizer="nf4", rank=RANK, alpha=ALPHA, epochs=6, batch_size=8)
    )
    for error in result.block_errors:
        assert error.apiq < error.default, error

    lora = LoraSettings(r=RANK, alpha=ALPHA, dropout=0.0)

    def qlora_from(model, directory):
        model.save_pretrained(str(directory))
        base = build_classifier(
            ModelConfig(base_model=str(directory), dtype="float32"),
            QuantConfig(),
            pad_token_id=pad,
            device="cpu",
        )
        return apply_lora(base, lora)

    default = qlora_from(fp_model, tmp_path / "default")
    clipped = copy.deepcopy(fp_model)
    assert apply_clipping(clipped, result) is None
    apiq = qlora_from(clipped, tmp_path / "apiq")
    assert load_lora_factors(apiq, result) == 14

    default_errors = block_output_errors(fp_model, default, held_out, pad)
    apiq_errors = block_output_errors(fp_model, apiq, held_out, pad)
    assert all(a < d for a, d in zip(apiq_errors, default_errors, strict=True)), (apiq_errors, default_errors)
