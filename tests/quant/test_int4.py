"""Group-wise asymmetric INT4: quantizers, packing, the exact zero-point fold, and the saved format."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from kaggle_utils.core.errors import UsageError
from kaggle_utils.quant.int4 import (
    LAYERS_FILE,
    QMAX,
    Int4Linear,
    fake_quantize_rtn,
    int4_storage_bits_per_weight,
    load_int4_model,
    pack_codes,
    quantize_hqq,
    quantize_linears,
    quantize_rtn,
    save_int4_model,
    unpack_codes,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_classifier(seed: int = 0):
    from transformers import Gemma2ForSequenceClassification

    from kaggle_utils.models.classifier import tiny_gemma2_config

    torch.manual_seed(seed)
    config = tiny_gemma2_config(300)
    config._attn_implementation = "eager"
    return Gemma2ForSequenceClassification(config).eval()


@given(rows=st.integers(1, 5), groups=st.integers(1, 4), seed=st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_pack_unpack_roundtrip(rows, groups, seed):
    codes = torch.randint(
        0, QMAX + 1, (rows, groups * 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    packed = pack_codes(codes)
    assert packed.shape == (rows, groups * 4)
    assert torch.equal(unpack_codes(packed), codes)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_quantizers_bound_the_error_by_half_a_step(method):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    quantized = quantize_rtn(weight, 16) if method == "rtn" else quantize_hqq(weight, 16)
    assert quantized.codes.dtype == torch.uint8 and int(quantized.codes.max()) <= QMAX
    assert quantized.scale.dtype == torch.float16 and quantized.zero.dtype == torch.float32
    error = (quantized.dequantize() - weight).abs().reshape(48, 4, 16)
    step = quantized.scale.float().unsqueeze(-1)
    if method == "rtn":  # min-max covers the range, so every weight is within half a step of its level
        assert bool((error <= step / 2 + 1e-6).all())
    relative = float((quantized.dequantize() - weight).pow(2).mean() / weight.pow(2).mean())
    assert relative < 0.02  # 4-bit on a Gaussian: ~0.5-1 % relative MSE


def test_rtn_zero_points_are_integers_and_clipping_shrinks_the_step():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    plain = quantize_rtn(weight, 16)
    assert torch.equal(plain.zero, plain.zero.round())
    clipped = quantize_rtn(weight, 16, clip_upper=torch.full((8, 2), 0.7), clip_lower=torch.full((8, 2), 0.7))
    assert bool((clipped.scale.float() < plain.scale.float()).all())


def test_fake_quant_matches_the_stored_quantizer_and_passes_gradients():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    upper = torch.full((16, 2), 0.9, requires_grad=True)
    lower = torch.full((16, 2), 0.8, requires_grad=True)
    fake = fake_quantize_rtn(weight, 16, upper, lower)
    stored = quantize_rtn(weight, 16, upper.detach(), lower.detach()).dequantize()
    assert torch.equal(fake.detach(), stored)
    fake.pow(2).sum().backward()
    assert upper.grad is not None and float(upper.grad.abs().sum()) > 0 and float(lower.grad.abs().sum()) > 0


def test_bad_group_size_names_the_layer():
    model = tiny_classifier()
    with pytest.raises(UsageError, match=r"group_size=24 .*in_features=64 .*q_proj"):
        quantize_linears(model, 24, TARGETS)


def test_int4_linear_keeps_storage_dtypes_under_model_casts():
    layer = Int4Linear.from_linear(nn.Linear(32, 8, bias=True), 16)
    layer.to(torch.bfloat16)
    assert layer.zero.dtype == torch.float32 and layer.scale.dtype == torch.float16
    assert layer.qweight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    out = layer(torch.randn(3, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_saved_model_reloads_bit_exact_and_in_other_dtypes(tmp_path):
    model = tiny_classifier()
    names = quantize_linears(model, 16, TARGETS, method="hqq")
    ids = torch.randint(3, 300, (3, 17), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        before = model(**batch).logits
    save_int4_model(model, tmp_path)
    description = json.loads((tmp_path / LAYERS_FILE).read_text())
    assert sorted(description["layers"]) == sorted(names) and description["zero_dtype"] == "float32"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        assert handle.get_tensor(f"{names[0]}.zero").dtype == torch.float32
    assert not any(key.endswith(f"{name}.weight") for key in keys for name in names)  # no 16-bit copy shipped
    reloaded = load_int4_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, before)
        half = load_int4_model(tmp_path, dtype=torch.bfloat16)(**batch).logits.float()
    assert float((half - before).abs().max()) < 0.05  # bf16 activations, same INT4 values


def test_storage_cost_is_documented():
    assert int4_storage_bits_per_weight(64) == pytest.approx(4.75)
