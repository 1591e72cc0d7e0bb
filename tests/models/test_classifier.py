"""Classifier construction, dtype choice, LoRA wrapping and batched prediction on a tiny Gemma-2 (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Gemma2ForSequenceClassification

from kaggle_utils.core.config import LoraSettings, ModelConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models import classifier as modeling
from kaggle_utils.models import devices

NINE_B_CONFIG = str(modeling.GEMMA2_9B_CONFIG)
VOCAB = 300
PAD = 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _ids(rng: np.random.Generator, lengths) -> list[list[int]]:
    return [[2, *rng.integers(6, VOCAB, size=n - 1).tolist()] for n in lengths]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu").eval()


def test_tiny_config_has_the_gemma2_features_that_matter():
    config = modeling.tiny_gemma2_config(VOCAB)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.vocab_size == VOCAB and config.num_labels == 3
    assert config.attn_logit_softcapping == 50.0 and config.final_logit_softcapping == 30.0
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert modeling.tiny_gemma2_config(VOCAB, num_hidden_layers=1).num_hidden_layers == 1


def test_build_tiny_is_eager_fp32_on_cpu_with_pad_id_and_seeded(tiny):
    assert isinstance(tiny, Gemma2ForSequenceClassification)
    assert tiny.config._attn_implementation == "eager"
    assert tiny.config.pad_token_id == PAD and tiny.config.num_labels == 3
    assert next(tiny.parameters()).dtype == torch.float32
    again = modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu")
    other = modeling.build_classifier(
        ModelConfig(init_seed=1), vocab_size=VOCAB, pad_token_id=PAD, device="cpu"
    )
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(tiny.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(tiny.state_dict()[weight], other.state_dict()[weight])


def test_building_does_not_disturb_the_callers_random_stream():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_pooling_uses_the_last_non_pad_token(tiny):
    ids = torch.tensor([[2, 17, 40, 99, 7]])
    padded = torch.tensor([[2, 17, 40, 99, 7, PAD, PAD, PAD]])
    with torch.no_grad():
        alone = tiny(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        with_pad = tiny(input_ids=padded, attention_mask=(padded != PAD).long()).logits
        shorter = tiny(input_ids=ids[:, :4], attention_mask=torch.ones_like(ids[:, :4])).logits
    torch.testing.assert_close(alone, with_pad, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, shorter)


def test_nine_b_shape_builds_on_meta_with_the_published_parameter_count():
    model = modeling.build_classifier(ModelConfig(base_model=NINE_B_CONFIG, dtype="bfloat16"), device="meta")
    trainable, total = modeling.count_parameters(model)
    # 9,241,705,984 backbone parameters (the published ~9.24 B) + the 3 x 3584 head.
    assert total == 9_241_705_984 + 3 * 3584
    assert model.config.num_hidden_layers == 42 and model.config.vocab_size == 256_000
    assert next(model.parameters()).device.type == "meta"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_config_json_directory_and_errors(tmp_path):
    config = modeling.tiny_gemma2_config(VOCAB).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = modeling.build_classifier(ModelConfig(base_model=str(tmp_path)), vocab_size=VOCAB, device="cpu")
    assert model.config.hidden_size == 64 and not modeling.base_has_weights(str(tmp_path))
    with pytest.raises(UsageError, match="smaller than the tokenizer"):
        modeling.load_model_config(ModelConfig(base_model=str(tmp_path)), vocab_size=VOCAB + 1)
    with pytest.raises(UsageError, match="needs vocab_size"):
        modeling.load_model_config(ModelConfig())
    with pytest.raises(UsageError, match="neither 'tiny'"):
        modeling.load_model_config(ModelConfig(base_model=str(tmp_path / "missing")))


def test_checkpoint_directory_loads_its_weights(tmp_path, tiny):
    path = modeling.materialize_base(ModelConfig(), tmp_path / "base", vocab_size=VOCAB, pad_token_id=PAD)
    assert modeling.base_has_weights(str(path))
    loaded = modeling.build_classifier(ModelConfig(base_model=str(path)), device="cpu")
    for key, value in tiny.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)


def test_resolve_dtype_follows_the_hardware(monkeypatch):
    assert devices.resolve_dtype("auto", "cpu") == torch.float32
    assert devices.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(devices, "_cuda_native_bf16", lambda device: True)
    assert devices.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(devices, "_cuda_native_bf16", lambda device: False)  # T4: cc 7.5, bf16 only emulated
    assert devices.resolve_dtype("auto", "cuda:0") == torch.float16
    with pytest.raises(UsageError):
        devices.resolve_dtype("int8", "cpu")


def test_lora_defaults_wrap_every_linear_layer_and_train_the_head():
    settings = LoraSettings()
    assert (settings.r, settings.alpha, settings.frozen_layers) == (64, 16, 0)
    model = modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu")
    peft_model = modeling.apply_lora(model, LoraSettings(r=4, alpha=8))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    for layer in range(2):
        for target in settings.target_modules:
            block = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            assert any(f"layers.{layer}.{block}.{target}.lora_A" in name for name in trainable), (
                layer,
                target,
            )
    assert any("score.modules_to_save" in name for name in trainable)
    assert not any("embed_tokens" in name or "base_layer" in name for name in trainable)
    n_trainable, n_total = modeling.count_parameters(peft_model)
    lora_per_layer = sum(
        4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    )
    assert n_trainable == 2 * lora_per_layer + 3 * 64
    assert n_total > n_trainable


def test_frozen_layers_leave_the_first_layers_alone():
    model = modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu")
    peft_model = modeling.apply_lora(model, LoraSettings(r=4, frozen_layers=1))
    names = [name for name, _ in peft_model.named_parameters()]
    assert not any("layers.0." in name and "lora_" in name for name in names)
    assert any("layers.1." in name and "lora_" in name for name in names)
    with pytest.raises(UsageError, match="leaves no layer"):
        modeling.apply_lora(
            modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, device="cpu"),
            LoraSettings(frozen_layers=2),
        )


def test_predict_probs_matches_row_by_row_forward_in_input_order(tiny):
    rng = np.random.default_rng(0)
    rows = _ids(rng, [5, 40, 12, 33, 7, 21])
    probs = modeling.predict_probs(tiny, rows, PAD, token_budget=64)
    assert probs.shape == (6, 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    for index, row in enumerate(rows):
        batch = {
            "input_ids": torch.tensor([row]),
            "attention_mask": torch.ones(1, len(row), dtype=torch.long),
        }
        np.testing.assert_allclose(probs[index], modeling.forward_probs(tiny, batch)[0], atol=1e-5)
    assert modeling.predict_probs(tiny, [], PAD).shape == (0, 3)


@pytest.mark.parametrize("scheme", [None, "nf4"])
def test_a_head_the_checkpoint_lacks_starts_at_zero(tmp_path, scheme):
    """A causal-LM checkpoint has no `score`: both the 16-bit and the quantized base start it at zero (uniform
    predictions, the same start for both orderings), not at a random draw that differs between them."""
    from transformers import Gemma2ForCausalLM

    from kaggle_utils.core.config import QuantConfig

    config = modeling.tiny_gemma2_config(512)
    Gemma2ForCausalLM(config).save_pretrained(str(tmp_path))
    quant = QuantConfig(scheme=scheme) if scheme else None
    model = modeling.build_classifier(
        ModelConfig(base_model=str(tmp_path), dtype="float32"), quant=quant, device="cpu"
    )
    assert torch.count_nonzero(model.score.weight) == 0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.allclose(logits, torch.zeros_like(logits))


def test_a_head_the_checkpoint_has_is_kept(tmp_path):
    model = modeling.build_classifier(ModelConfig(dtype="float32"), vocab_size=512, device="cpu")
    model.config.__dict__.pop(modeling.RANDOM_WEIGHTS_KEY, None)
    model.save_pretrained(str(tmp_path))
    loaded = modeling.build_classifier(ModelConfig(base_model=str(tmp_path), dtype="float32"), device="cpu")
    assert torch.equal(loaded.score.weight, model.score.weight)
    assert torch.count_nonzero(loaded.score.weight) > 0


def test_the_float16_preflight_passes_a_model_in_range_and_refuses_one_that_overflows():
    torch.manual_seed(0)
    model = modeling.build_classifier(ModelConfig(), vocab_size=VOCAB, pad_token_id=PAD, device="cpu").eval()
    ids = torch.tensor(_ids(np.random.default_rng(0), [12, 12]))
    assert devices.check_dtype_range(model, ids)["float16_layers"] == 0  # fp32: nothing to check
    model = model.half()
    fine = devices.check_dtype_range(model, ids)
    assert (
        fine["float16_layers"] == fine["checked_layers"] == 2
        and fine["max_abs"] < devices.FP16_PREFLIGHT_LIMIT
    )
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(300_000)  # times sqrt(hidden) = 8 in Gemma-2: past 65,504
    with pytest.raises(
        devices.DtypeRangeError,
        match=r"^--dtype float16: hidden states (reach [\d,]+|turn non-finite) "
        r"at model.layers.0 on 2 preflight rows .* use float32",
    ):
        devices.check_dtype_range(model, ids, setting="--dtype")


@pytest.mark.slow
def test_real_gemma3_in_float16_is_refused_before_it_predicts_nan(gemma3_270m_dir):
    """Gemma 3 270M's residual stream passes fp16's 65,504 (NaN logits); fp32 runs it, bf16 has the range."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_dir)
    batch = tokenizer(
        ["Which response is better? A: Paris is the capital of France. B: It is Lyon."] * 2
        + ["Write a poem about the sea and the wind, please."] * 2,
        return_tensors="pt",
        padding=True,
    )
    model = modeling.build_classifier(
        ModelConfig(base_model=str(gemma3_270m_dir), dtype="float16"),
        pad_token_id=tokenizer.pad_token_id,
        device="cpu",
    ).eval()
    with pytest.raises(
        devices.DtypeRangeError,
        match=r"^model.dtype float16: hidden states .* at model.layers.\d+ on "
        r"4 preflight rows",
    ):
        devices.check_dtype_range(model, batch["input_ids"], batch["attention_mask"])
    model = model.float()
    assert (
        devices.check_dtype_range(model, batch["input_ids"], batch["attention_mask"])["float16_layers"] == 0
    )
