"""QA-LoRA / QA-HiRA group-pooled adapters: the zero-point fold is exact; the artifact ships plain INT4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kaggle_utils.core.errors import UsageError
from kaggle_utils.quant.artifacts import load_artifact, save_artifact
from kaggle_utils.quant.group_adapters import (
    GroupAdapterSettings,
    GroupPooledAdapterLinear,
    add_group_adapters,
    count_adapter_parameters,
    hira_output_repeat,
    merge_group_adapters,
)
from kaggle_utils.quant.int4 import Int4Linear, quantize_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_classifier(vocab_size: int, seed: int = 0):
    from transformers import Gemma2ForSequenceClassification

    from kaggle_utils.models.classifier import tiny_gemma2_config

    torch.manual_seed(seed)
    config = tiny_gemma2_config(vocab_size)
    config._attn_implementation = "eager"
    return Gemma2ForSequenceClassification(config).eval()


@pytest.mark.parametrize("kind", ["qa-lora", "qa-hira"])
def test_update_is_constant_within_each_group_and_matches_the_forward(kind):
    base = Int4Linear.from_linear(torch.nn.Linear(64, 32), 16)
    layer = GroupPooledAdapterLinear(base, GroupAdapterSettings(kind=kind, rank=2, alpha=4))
    with torch.no_grad():
        for parameter in (p for p in layer.parameters() if p.requires_grad):
            parameter.normal_(0, 0.3)
    # The adapter's effective weight, read off the forward with unit inputs, is d repeated over each group.
    with torch.no_grad():
        effective = layer.adapter_output(torch.eye(64)).t()  # (out, in)
    expected = layer.group_update().repeat_interleave(16, dim=1)
    assert torch.allclose(effective, expected, atol=1e-6)
    assert float(effective.reshape(32, 4, 16).std(-1).max()) < 1e-6  # constant inside every (row, group)
    x = torch.randn(5, 64)
    assert torch.allclose(layer.merged()(x), layer(x), atol=1e-5)


def test_hira_has_higher_rank_than_qa_lora_at_no_more_parameters():
    out_features, groups, lora_rank = 4096, 64, 16
    repeat = hira_output_repeat(out_features, groups, lora_rank)
    assert (out_features // repeat) * groups <= lora_rank * (out_features + groups)
    assert min(out_features // repeat, groups) > lora_rank  # rank 64 vs 16 at the same budget
    base = Int4Linear.from_linear(torch.nn.Linear(64, 32), 16)
    lora = GroupPooledAdapterLinear(base, GroupAdapterSettings(kind="qa-lora", rank=8))
    assert lora.rank == 4  # capped: a foldable update has rank <= in_features / group_size


def test_unknown_kind_and_missing_int4_layers_are_usage_errors():
    base = Int4Linear.from_linear(torch.nn.Linear(32, 8), 16)
    with pytest.raises(UsageError, match="qa-dora"):
        GroupPooledAdapterLinear(base, GroupAdapterSettings(kind="qa-dora"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no Int4Linear"):
        add_group_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), GroupAdapterSettings())


@pytest.mark.parametrize("kind", ["qa-lora", "qa-hira"])
def test_merged_artifact_predicts_like_the_trained_unmerged_model(kind, tmp_path, train_data, demo_tokenizer):
    from kaggle_utils.core.config import FormatConfig
    from kaggle_utils.models.classifier import predict_probs
    from kaggle_utils.text.encode import encode_rows

    torch.manual_seed(0)
    fmt = FormatConfig(max_length=128)
    encoded = encode_rows(train_data.frame.head(48), demo_tokenizer, fmt)
    pad = demo_tokenizer.pad_token_id
    model = tiny_classifier(len(demo_tokenizer))
    quantize_linears(model, 16, TARGETS, method="hqq")
    add_group_adapters(model, GroupAdapterSettings(kind=kind, rank=4, alpha=8))
    assert count_adapter_parameters(model) > 0

    # A few real training steps so the adapter is non-trivial (B / M start at zero).
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and ("lora" in n or "hira" in n)]
    optimizer = torch.optim.Adam(trainable, lr=2e-2)
    labels = torch.as_tensor(encoded.labels)
    model.train()
    for step in range(4):
        rows = list(range(step * 8, step * 8 + 8))
        width = max(len(encoded.input_ids[r]) for r in rows)
        ids = torch.full((8, width), pad)
        for i, r in enumerate(rows):
            ids[i, : len(encoded.input_ids[r])] = torch.tensor(encoded.input_ids[r])
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=ids, attention_mask=(ids != pad).long()).logits, labels[rows]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    zero_initialised = [p for n, p in model.named_parameters() if "lora_B" in n or "hira_M" in n]
    assert zero_initialised and all(float(p.detach().abs().max()) > 0 for p in zero_initialised)
    model.eval()
    unmerged = predict_probs(model, encoded.input_ids, pad)

    merge_group_adapters(model)
    assert not any(isinstance(m, GroupPooledAdapterLinear) for m in model.modules())
    merged = predict_probs(model, encoded.input_ids, pad)
    np.testing.assert_allclose(merged, unmerged, atol=1e-6)
    assert (
        float(
            np.abs(
                unmerged - predict_probs(tiny_classifier(len(demo_tokenizer)), encoded.input_ids, pad)
            ).max()
        )
        > 1e-3
    )

    fields = {
        "ordering": "quant-then-ft",
        "variant": kind + "-merged",
        "base_model": "tiny",
        "folds_file_hash": "none",
        "cv_scores": {},
    }
    out = save_artifact(
        tmp_path / "artifact", model, demo_tokenizer, fields, fmt
    )  # the int4 backend's fields
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert not any(name.startswith("adapter") for name in files)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("lora" in k or "hira" in k or "adapter" in k for k in keys)
    # the generic loader (what inference and compare use) dispatches to the INT4 layers, never random weights
    generic = load_artifact(out, device="cpu", compute_dtype=torch.float32)
    assert generic.manifest["quant_scheme"] == "int4-asym-g16" and generic.manifest["has_adapter"] is False
    assert generic.manifest["quant_backend"] == "int4" and generic.manifest["int4_format"]
    assert sum(isinstance(m, Int4Linear) for m in generic.model.modules()) == 14
    np.testing.assert_allclose(predict_probs(generic.model, encoded.input_ids, pad), unmerged, atol=1e-6)
