"""LoftQ: peft computes it on CUDA/XPU only; here the variant is skipped with a message that says so."""

from __future__ import annotations

import pytest
import torch

from kaggle_utils.errors import UsageError
from kaggle_utils.qaware.loftq import (
    LoftQUnavailable,
    apply_loftq,
    loftq_device,
    loftq_skip_message,
    rescale_for_lora_scaling,
)

no_gpu = pytest.mark.skipif(loftq_device() is not None, reason="this machine has CUDA/XPU: LoftQ runs for real")


@no_gpu
def test_peft_loftq_really_needs_a_gpu():
    """The premise of the skip: peft's own LoftQ fails on a CPU-only machine."""
    from peft.utils.loftq_utils import loftq_init

    with pytest.raises((AssertionError, RuntimeError)):
        loftq_init(torch.randn(64, 64), num_bits=4, reduced_rank=4, num_iter=1)


@no_gpu
def test_apply_loftq_raises_the_skip_message_before_touching_the_model(tmp_path):
    sentinel = torch.nn.Linear(4, 4)
    before = sentinel.weight.detach().clone()
    with pytest.raises(LoftQUnavailable) as caught:
        apply_loftq(sentinel, tmp_path)
    assert isinstance(caught.value, UsageError)  # the CLI prints it as one line
    message = str(caught.value)
    assert message == loftq_skip_message()
    assert "LoftQ skipped" in message and "CUDA or XPU" in message
    assert torch.equal(sentinel.weight, before)


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


@no_gpu
def test_compare_skips_loftq_on_this_machine_with_the_same_message():
    from kaggle_utils.compare import resolve_variants

    (loftq,) = resolve_variants(["loftq"])
    assert loftq.unavailable is not None
    assert loftq.unavailable() == loftq_skip_message()
