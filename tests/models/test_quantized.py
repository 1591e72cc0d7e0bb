"""bitsandbytes NF4 / LLM.int8 on CPU: loading, quantizing a merged model, dequantizing, CPU repacking."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from torch import nn

from kaggle_utils.core.config import LoraSettings, ModelConfig, QuantConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models import classifier as modeling
from kaggle_utils.models import quantized as quantization

VOCAB = 300
PAD = 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return modeling.materialize_base(
        ModelConfig(), tmp_path_factory.mktemp("base"), vocab_size=VOCAB, pad_token_id=PAD
    )


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(1)
    return [[2, *rng.integers(6, VOCAB, size=n).tolist()] for n in (9, 30, 17, 25, 4, 12)]


def _probs(model, rows):
    return modeling.predict_probs(model, rows, PAD, token_budget=128)


def _random_adapter(peft_model, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Fill every lora_A / lora_B from a seeded generator (bounds below are reproducible whatever ran before);
    returns each LoRA
    layer's update scaling * B @ A by its base-module name."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                bound = a.shape[1] ** -0.5  # peft's default init range for A (kaiming uniform, a=sqrt(5))
                a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) * bound)
                b.copy_(torch.randn(b.shape, generator=generator) * std)
                delta = module.scaling["default"] * b.float() @ a.float()
                deltas[name.removeprefix("base_model.model.")] = delta
    return deltas


def _plain_weights(model) -> dict[str, torch.Tensor]:
    """Every linear weight as float32 (4-bit / 8-bit layers dequantized), by module name."""
    if quantization.is_bnb_quantized(model):
        model = quantization.dequantize_model(
            copy.deepcopy(model), torch.float32
        )  # it replaces layers in place
    return {name: m.weight.detach().float() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _merge_coefficient(shipped, base, deltas: dict[str, torch.Tensor]) -> float:
    """How much of the adapter update the shipped weights carry: the least-squares c in
    shipped - base = c * delta over all LoRA layers. 1 when merged (rounding noise is uncorrelated with the
    update), 0 when the merge was dropped."""
    numerator = sum(float(((shipped[name] - base[name]) * delta).sum()) for name, delta in deltas.items())
    return numerator / sum(float((delta * delta).sum()) for delta in deltas.values())


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
    assert 0 < difference < 0.04  # quantized, so not identical; measured 0.022 at this size


def test_random_config_base_can_be_loaded_quantized_directly(rows):
    nf4 = modeling.build_classifier(
        ModelConfig(), quant=QuantConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu"
    )
    assert quantization.quant_scheme_of(nf4) == "nf4"
    assert np.isfinite(_probs(nf4, rows)).all()


# Max |p_shipped - p_16bit| over the rows with _random_adapter(seed=0): measured 0.013 (nf4) / 0.0015 (int8);
# dropping the merge (quantizing the base without the adapter) gives 0.138 (nf4) / 0.136 (int8).
MERGED_BOUNDS = {"nf4": 0.04, "int8": 0.01}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantize_merged_keeps_predictions_close(base_dir, rows, scheme):
    model_cfg = ModelConfig(base_model=str(base_dir))
    base_weights = _plain_weights(modeling.build_classifier(model_cfg, device="cpu"))
    peft_model = modeling.apply_lora(modeling.build_classifier(model_cfg, device="cpu"), LoraSettings(r=4))
    deltas = _random_adapter(peft_model)
    reference = _probs(peft_model, rows)  # the trained 16-bit model: base + adapter
    with pytest.raises(UsageError, match="merge_and_unload"):
        quantization.quantize_merged(peft_model, QuantConfig(scheme=scheme), model_cfg)
    merged = peft_model.merge_and_unload()
    quantized = quantization.quantize_merged(merged, QuantConfig(scheme=scheme), model_cfg, device="cpu")
    assert quantization.quant_scheme_of(quantized) == scheme
    difference = np.abs(_probs(quantized, rows) - reference).max()
    assert 0 < difference < MERGED_BOUNDS[scheme]
    coefficient = _merge_coefficient(_plain_weights(quantized), base_weights, deltas)
    assert 0.9 < coefficient < 1.1, coefficient  # the shipped weights carry the adapter update
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
    model = modeling.build_classifier(
        ModelConfig(base_model=str(base_dir)), quant=QuantConfig(), device="cpu"
    )
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
    model = modeling.build_classifier(
        ModelConfig(base_model=str(base_dir)), quant=QuantConfig(), device="cpu"
    )
    base_weights = _plain_weights(model)
    peft_model = modeling.apply_lora(model, LoraSettings(r=4))
    deltas = _random_adapter(peft_model)
    unmerged = _probs(peft_model, rows)
    merged = quantization.merge_adapter_into_quantized(peft_model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    difference = np.abs(_probs(merged, rows) - unmerged).max()
    # measured 0.012 with this adapter; with the merge dropped (the NF4 base alone) 0.144
    assert 0 < difference < 0.04
    coefficient = _merge_coefficient(_plain_weights(merged), base_weights, deltas)
    assert 0.8 < coefficient < 1.2, coefficient
