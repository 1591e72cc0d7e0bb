"""bitsandbytes NF4 / LLM.int8 on CPU: loading, quantizing a merged model, dequantizing, the CPU repacking trap."""

from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from torch import nn

from kaggle_utils import modeling, quantization
from kaggle_utils.config import LoraSettings, ModelConfig, QuantConfig
from kaggle_utils.errors import UsageError

VOCAB = 300
PAD = 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return modeling.materialize_base(ModelConfig(), tmp_path_factory.mktemp("base"), vocab_size=VOCAB, pad_token_id=PAD)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(1)
    return [[2, *rng.integers(6, VOCAB, size=n).tolist()] for n in (9, 30, 17, 25, 4, 12)]


def _probs(model, rows):
    return modeling.predict_probs(model, rows, PAD, token_budget=128)


def test_bnb_config_schemes():
    nf4 = quantization.bnb_config(QuantConfig(scheme="nf4"), torch.float32)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.llm_int8_skip_modules == ["score"]
    int8 = quantization.bnb_config(QuantConfig(scheme="int8"), torch.float32)
    assert int8.load_in_8bit and not int8.load_in_4bit
    with pytest.raises(UsageError):
        quantization.bnb_config(QuantConfig(scheme="int3"), torch.float32)  # type: ignore[arg-type]


def test_nf4_base_quantizes_every_linear_layer_but_the_head(base_dir, rows):
    model_cfg = ModelConfig(base_model=str(base_dir))
    full = modeling.build_classifier(model_cfg, device="cpu")
    nf4 = modeling.build_classifier(model_cfg, quant=QuantConfig(), device="cpu")
    linears = [m for name, m in nf4.named_modules() if isinstance(m, nn.Linear) and name != "score"]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(m.weight.quant_type == "nf4" and m.weight.compress_statistics for m in linears)
    assert type(nf4.score) is nn.Linear and nf4.score.weight.dtype == torch.float32
    assert quantization.quant_scheme_of(nf4) == "nf4" and quantization.quant_scheme_of(full) is None
    assert modeling.is_quantized(nf4) and not modeling.is_quantized(full)
    difference = np.abs(_probs(nf4, rows) - _probs(full, rows)).max()
    assert 0 < difference < 0.2  # quantized, so not identical; same model, so close


def test_random_config_base_can_be_loaded_quantized_directly(rows):
    nf4 = modeling.build_classifier(ModelConfig(), quant=QuantConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu")
    assert quantization.quant_scheme_of(nf4) == "nf4"
    assert np.isfinite(_probs(nf4, rows)).all()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantize_merged_keeps_predictions_close(base_dir, rows, scheme):
    model_cfg = ModelConfig(base_model=str(base_dir))
    peft_model = modeling.apply_lora(modeling.build_classifier(model_cfg, device="cpu"), LoraSettings(r=4))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    with pytest.raises(UsageError, match="merge_and_unload"):
        quantization.quantize_merged(peft_model, QuantConfig(scheme=scheme), model_cfg)
    merged = peft_model.merge_and_unload()
    reference = _probs(merged, rows)
    quantized = quantization.quantize_merged(merged, QuantConfig(scheme=scheme), model_cfg, device="cpu")
    assert quantization.quant_scheme_of(quantized) == scheme
    difference = np.abs(_probs(quantized, rows) - reference).max()
    assert 0 < difference < 0.2
    with pytest.raises(UsageError, match="already"):
        quantization.quantize_merged(quantized, QuantConfig(scheme=scheme), model_cfg)


def test_dequantized_model_reproduces_the_quantized_one(base_dir, rows):
    nf4 = modeling.build_classifier(ModelConfig(base_model=str(base_dir)), quant=QuantConfig(), device="cpu")
    expected = _probs(nf4, rows)
    plain = quantization.dequantize_model(nf4, torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    np.testing.assert_allclose(_probs(plain, rows), expected, atol=1e-5)


def test_training_after_an_eval_pass_still_gets_gradients(base_dir, rows):
    """bnb 0.50 repacks 4-bit weights on the first CPU no-grad forward and then drops gradients; we switch
    the repacking off on every quantized model, so QLoRA steps after an evaluation still train every layer."""
    model = modeling.build_classifier(ModelConfig(base_model=str(base_dir)), quant=QuantConfig(), device="cpu")
    peft_model = modeling.apply_lora(model, LoraSettings(r=4))
    _probs(peft_model, rows)  # an evaluation pass
    peft_model.train()
    batch = {"input_ids": torch.tensor([rows[1][:20], rows[3][:20]]), "labels": torch.tensor([0, 2])}
    peft_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
    first_layer_b = [p.grad for n, p in peft_model.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first_layer_b and all(g is not None and g.abs().sum() > 0 for g in first_layer_b)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert not getattr(weight.quant_state, "packing_format_for_cpu", False)


def test_merging_an_adapter_into_nf4_adds_rounding_error(base_dir, rows):
    model = modeling.build_classifier(ModelConfig(base_model=str(base_dir)), quant=QuantConfig(), device="cpu")
    peft_model = modeling.apply_lora(model, LoraSettings(r=4))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    unmerged = _probs(peft_model, rows)
    merged = quantization.merge_adapter_into_quantized(peft_model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    difference = np.abs(_probs(merged, rows) - unmerged).max()
    assert 0 < difference < 0.2
