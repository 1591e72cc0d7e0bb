"""LoftQ on CPU: sharded checkpoints read like single files; more iterations fit W better, never worse."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from kaggle_utils.core.config import LoraSettings, ModelConfig, QuantConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models import classifier as modeling
from kaggle_utils.quant.loftq import (
    INDEX_FILE,
    NF4Settings,
    SafetensorsCheckpoint,
    apply_loftq,
    loftq_decompose,
    nf4_quantizer,
    rescale_for_lora_scaling,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
VOCAB, PAD = 300, 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny base as one model.safetensors and as 5 shards + model.safetensors.index.json."""
    root = tmp_path_factory.mktemp("loftq")
    single = modeling.materialize_base(ModelConfig(), root / "single", vocab_size=VOCAB, pad_token_id=PAD)
    model = modeling.build_classifier(ModelConfig(base_model=str(single)), device="cpu")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    return single, root / "sharded"


def test_sharded_checkpoint_gives_the_same_tensors_as_the_single_file(checkpoints):
    single, sharded = checkpoints
    assert not (sharded / "model.safetensors").exists() and (sharded / INDEX_FILE).is_file()
    one, many = SafetensorsCheckpoint(single), SafetensorsCheckpoint(sharded)
    assert len(set(many.files.values())) > 1  # really sharded
    assert one.names() == many.names()
    for name in one.names():
        assert torch.equal(one.get(name), many.get(name)), name


def test_checkpoint_errors_name_the_file(tmp_path, checkpoints):
    with pytest.raises(UsageError, match="no model.safetensors or model.safetensors.index.json"):
        SafetensorsCheckpoint(tmp_path)
    index = json.loads((checkpoints[1] / INDEX_FILE).read_text())
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))  # the index without its shards
    with pytest.raises(UsageError, match="lists shards that are not in"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(UsageError, match="no tensor 'nope'"):
        SafetensorsCheckpoint(checkpoints[0]).get("nope")


def test_alternating_iterations_do_not_increase_the_error():
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(256, 8, generator=generator) @ torch.randn(8, 128, generator=generator)
    weight = low_rank + 0.3 * torch.randn(
        256, 128, generator=generator
    )  # outlier directions, like LLM weights
    quantize = nf4_quantizer(NF4Settings())
    factors = loftq_decompose(weight, rank=8, iterations=5, quantize=quantize)
    errors = factors.errors
    assert len(errors) == 5
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.95 * errors[0], errors  # the alternation buys something over one step
    # The first step is the one-step (peft) LoftQ: SVD of the residual of the plain QLoRA base.
    plain, _ = quantize(weight)
    u, s, vh = torch.linalg.svd(weight - plain, full_matrices=False)
    one_step = torch.linalg.matrix_norm(weight - plain - (u[:, :8] * s[:8]) @ vh[:8])
    assert errors[0] == pytest.approx(float(one_step), rel=1e-4)
    # What is returned is what the best error was measured on.
    packed, state = factors.quantized
    refit = weight - bnbf.dequantize_4bit(packed, state).float() - factors.b @ factors.a
    assert float(torch.linalg.matrix_norm(refit)) == pytest.approx(min(errors), rel=1e-4)


def _layer_errors(peft_model, checkpoint: SafetensorsCheckpoint) -> dict[str, float]:
    """||W - (Q + scaling * B A)||_F of every LoRA layer, recomputed from the model itself."""
    errors = {}
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            q = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            ba = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            w = checkpoint.get(name.removeprefix("base_model.model.") + ".weight").float()
            errors[name] = float(torch.linalg.matrix_norm(w - q - ba))
    return errors


def _quantized_weights(model) -> dict[str, torch.Tensor]:
    return {
        name: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def _nf4_peft_model(base_dir):
    model = modeling.build_classifier(
        ModelConfig(base_model=str(base_dir)), quant=QuantConfig(), device="cpu"
    )
    return modeling.apply_lora(model, LoraSettings(r=4, alpha=16))


def test_apply_loftq_on_cpu_from_a_sharded_checkpoint(checkpoints):
    single, sharded = checkpoints
    checkpoint = SafetensorsCheckpoint(single)
    plain = _nf4_peft_model(single)
    before = _quantized_weights(plain)
    untouched = _layer_errors(plain, checkpoint)  # lora_B = 0: the plain QLoRA error ||W - Q||

    one = _nf4_peft_model(single)
    report = apply_loftq(one, sharded, iterations=1)
    assert report.layers == 14
    after = _quantized_weights(one)
    assert len(before) == 14 and all(
        torch.equal(before[name], after[name]) for name in before
    )  # T = 1 keeps QLoRA's Q
    fitted_one = _layer_errors(one, checkpoint)
    assert all(fitted_one[name] < untouched[name] for name in untouched)
    assert fitted_one == pytest.approx({name: errors[0] for name, errors in report.errors.items()}, rel=1e-4)

    three = _nf4_peft_model(single)
    report = apply_loftq(three, sharded, iterations=3)
    fitted_three = _layer_errors(three, checkpoint)
    assert fitted_three == pytest.approx(
        {name: min(errors) for name, errors in report.errors.items()}, rel=1e-4
    )
    assert all(fitted_three[name] <= fitted_one[name] * (1 + 1e-5) for name in fitted_one)
    assert sum(fitted_three.values()) < sum(fitted_one.values())
    rows = [[2, 7, 8, 9, 10], [2, 11, 12]]
    probs = modeling.predict_probs(three, rows, PAD, token_budget=64)
    assert probs.shape == (2, 3) and abs(float(probs.sum()) - 2) < 1e-4


def test_rescaling_makes_the_adapter_equal_to_the_unscaled_product():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=1, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # what LoftQ would have written
    assert rescale_for_lora_scaling(peft_model) == 1
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(delta, product, atol=1e-6)


def test_iterations_must_be_positive():
    with pytest.raises(UsageError, match="iterations must be >= 1"):
        loftq_decompose(torch.zeros(4, 4), rank=1, iterations=0, quantize=nf4_quantizer(NF4Settings()))
