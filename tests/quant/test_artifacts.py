"""Artifact layout and manifest; reloading reproduces the in-memory model for both orderings; refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel

from kaggle_utils.core.config import FormatConfig, LoraSettings, ModelConfig, QuantConfig
from kaggle_utils.core.errors import ArtifactError
from kaggle_utils.models import classifier as modeling
from kaggle_utils.models import quantized as quantization
from kaggle_utils.quant import artifacts
from kaggle_utils.quant.manifest import REQUIRED_FIELDS, read_manifest, update_manifest
from kaggle_utils.text.template import TEMPLATE_VERSION

FIELDS = {
    "ordering": "quant-then-ft",
    "variant": "quant-then-ft",
    "base_model": "tiny",
    "folds_file_hash": "0" * 64,
    "cv_scores": {"fold_0": 1.0},
    "class_prior": [0.35, 0.34, 0.31],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def setup(demo_tokenizer, demo_base_dir):
    vocab, pad = len(demo_tokenizer), demo_tokenizer.pad_token_id
    rng = np.random.default_rng(2)
    rows = [[2, *rng.integers(6, vocab, size=n).tolist()] for n in (8, 31, 15, 22, 5)]
    return ModelConfig(base_model=str(demo_base_dir)), rows, pad


def _perturb_adapter(peft_model) -> None:
    """Stand-in for training: non-zero LoRA B and a changed head, so the adapter matters.

    Drawn from its own seeded generator: the global RNG's state depends on which tests ran before."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)


def _probs(model, rows, pad):
    return modeling.predict_probs(model, rows, pad, token_budget=128)


def test_quant_then_ft_artifact_reloads_with_identical_predictions(setup, demo_tokenizer, tmp_path):
    model_cfg, rows, pad = setup
    peft_model = modeling.apply_lora(
        modeling.build_classifier(model_cfg, quant=QuantConfig(), device="cpu"), LoraSettings(r=4)
    )
    _perturb_adapter(peft_model)
    expected = _probs(peft_model, rows, pad)
    fmt = FormatConfig(max_length=256)
    path = artifacts.save_artifact(tmp_path / "art", peft_model, demo_tokenizer, FIELDS, fmt)

    assert sorted(p.name for p in path.iterdir()) == ["adapter", "manifest.json", "model", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(manifest)
    assert manifest["quant_scheme"] == "nf4" and manifest["has_adapter"] and manifest["max_length"] == 256
    assert (
        manifest["template_version"] == TEMPLATE_VERSION and manifest["class_prior"] == FIELDS["class_prior"]
    )
    assert (
        "model/model.safetensors" in manifest["files"]
        and "adapter/adapter_model.safetensors" in manifest["files"]
    )

    loaded = artifacts.load_artifact(path, device="cpu")
    assert isinstance(loaded.model, PeftModel) and quantization.quant_scheme_of(loaded.model) == "nf4"
    assert loaded.format_config == fmt and loaded.tokenizer.pad_token_id == pad
    np.testing.assert_array_equal(_probs(loaded.model, rows, pad), expected)
    assert artifacts.artifact_size_bytes(path) == sum(
        info["bytes"] for info in manifest["files"].values()
    ) + len((path / "manifest.json").read_bytes())

    # Runtimes without bitsandbytes: plain layers, adapter merged, same predictions up to fp32 rounding.
    plain = artifacts.load_artifact(path, compute_dtype=torch.float32, dequantize=True)
    assert quantization.quant_scheme_of(plain.model) is None and not isinstance(plain.model, PeftModel)
    np.testing.assert_allclose(_probs(plain.model, rows, pad), expected, atol=1e-5)


def test_quant_then_ft_merged_copy_is_shipped_beside_the_adapter(setup, demo_tokenizer, tmp_path):
    model_cfg, rows, pad = setup
    peft_model = modeling.apply_lora(
        modeling.build_classifier(model_cfg, quant=QuantConfig(), device="cpu"), LoraSettings(r=4)
    )
    _perturb_adapter(peft_model)
    path = artifacts.save_artifact(tmp_path / "art", peft_model, demo_tokenizer, FIELDS, FormatConfig())
    merged = quantization.merge_adapter_into_quantized(artifacts.load_artifact(path, device="cpu").model)
    expected = _probs(merged, rows, pad)
    path = artifacts.save_artifact(
        tmp_path / "art", peft_model, demo_tokenizer, FIELDS, FormatConfig(), merged_model=merged
    )
    loaded = artifacts.load_artifact(path, device="cpu", use_merged=True)
    assert not isinstance(loaded.model, PeftModel) and quantization.quant_scheme_of(loaded.model) == "nf4"
    np.testing.assert_array_equal(_probs(loaded.model, rows, pad), expected)
    assert artifacts.artifact_size_bytes(path, include_merged=True) > artifacts.artifact_size_bytes(path)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_ft_then_quant_artifact_reloads_with_identical_predictions(setup, demo_tokenizer, tmp_path, scheme):
    model_cfg, rows, pad = setup
    peft_model = modeling.apply_lora(modeling.build_classifier(model_cfg, device="cpu"), LoraSettings(r=4))
    _perturb_adapter(peft_model)
    quantized = quantization.quantize_merged(
        peft_model.merge_and_unload(), QuantConfig(scheme=scheme), model_cfg
    )
    expected = _probs(quantized, rows, pad)
    fields = {**FIELDS, "ordering": "ft-then-quant", "variant": f"ft-then-quant-{scheme}"}
    path = artifacts.save_artifact(tmp_path / "art", quantized, demo_tokenizer, fields, FormatConfig())
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model", "tokenizer"]
    loaded = artifacts.load_artifact(path, device="cpu")
    assert loaded.manifest["quant_scheme"] == scheme and not loaded.manifest["has_adapter"]
    np.testing.assert_array_equal(_probs(loaded.model, rows, pad), expected)
    plain = artifacts.load_artifact(path, compute_dtype=torch.float32, dequantize=True)
    assert quantization.quant_scheme_of(plain.model) is None
    np.testing.assert_allclose(
        _probs(plain.model, rows, pad), expected, atol=1e-2 if scheme == "int8" else 1e-5
    )


def _small_artifact(setup, demo_tokenizer, path):
    model_cfg, _, _ = setup
    model = modeling.build_classifier(model_cfg, device="cpu")
    return artifacts.save_artifact(
        path, model, demo_tokenizer, {**FIELDS, "ordering": "ft-then-quant"}, FormatConfig()
    )


def test_template_version_mismatch_is_refused(setup, demo_tokenizer, tmp_path):
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    update_manifest(path, template_version="some-older-template")
    with pytest.raises(ArtifactError, match="template version 'some-older-template'"):
        artifacts.load_artifact(path, device="cpu")


def test_incomplete_or_damaged_artifacts_are_refused(setup, demo_tokenizer, tmp_path):
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    read_manifest(path, verify_hashes=True)
    weights = path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        read_manifest(path, verify_hashes=True)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="bytes"):
        artifacts.load_artifact(path, device="cpu")
    weights.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.load_artifact(path, device="cpu")
    (path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        artifacts.load_artifact(path, device="cpu")
    with pytest.raises(ArtifactError, match="lacks"):
        artifacts.save_artifact(
            tmp_path / "x",
            modeling.build_classifier(setup[0], device="cpu"),
            demo_tokenizer,
            {"ordering": "ft-then-quant"},
            FormatConfig(),
        )


def test_use_merged_without_a_merged_copy_is_refused(setup, demo_tokenizer, tmp_path):
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    with pytest.raises(ArtifactError, match="no merged"):
        artifacts.load_artifact(path, device="cpu", use_merged=True)


def test_missing_weights_and_unknown_schemes_are_refused_not_randomised(setup, demo_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    unknown = {**manifest, "quant_scheme": "gptq-int8"}
    manifest_path.write_text(json.dumps(unknown))
    with pytest.raises(ArtifactError, match="unknown quant_scheme"):
        artifacts.load_artifact(path, device="cpu")

    # a checkpoint that lost one tensor still matches its (rewritten) manifest: the loader must refuse it
    weights = path / "model" / "model.safetensors"
    state = load_file(str(weights))
    dropped = next(name for name in state if name.endswith("mlp.down_proj.weight"))
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    manifest["files"]["model/model.safetensors"] = {
        "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="missing from the checkpoint"):
        artifacts.load_artifact(path, device="cpu")


def _adapter_artifact(setup, demo_tokenizer, path):
    model_cfg, _, _ = setup
    peft_model = modeling.apply_lora(
        modeling.build_classifier(model_cfg, quant=QuantConfig(), device="cpu"), LoraSettings(r=4)
    )
    _perturb_adapter(peft_model)
    return artifacts.save_artifact(path, peft_model, demo_tokenizer, FIELDS, FormatConfig())


def _edit_manifest(path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_quant_then_ft_without_its_adapter_is_refused_not_run_on_the_base(setup, demo_tokenizer, tmp_path):
    path = _adapter_artifact(setup, demo_tokenizer, tmp_path / "art")
    original = (path / "manifest.json").read_text()
    _edit_manifest(path, lambda m: m.pop("has_adapter"))
    with pytest.raises(ArtifactError, match=r"missing fields \['has_adapter'\]"):
        artifacts.load_artifact(path, device="cpu")
    _edit_manifest(path, lambda m: m.update(has_adapter=False))
    with pytest.raises(ArtifactError, match="has_adapter is False but 'files' lists files under adapter/"):
        artifacts.load_artifact(path, device="cpu")

    def drop_adapter(manifest):  # a consistent-looking manifest that forgot the adapter altogether
        manifest["has_adapter"] = False
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("adapter/")}

    _edit_manifest(path, drop_adapter)
    with pytest.raises(ArtifactError, match="quant-then-ft needs its adapter"):
        artifacts.load_artifact(path, device="cpu")
    _edit_manifest(path, lambda m: m.update(ordering="ft-then-quant"))  # the adapter/ folder is still there
    with pytest.raises(ArtifactError, match=r"adapter/\S+ is not listed"):
        artifacts.load_artifact(path, device="cpu")
    (path / "manifest.json").write_text(original)
    _edit_manifest(path, lambda m: m.update(ordering="ft-then-quant"))
    with pytest.raises(ArtifactError, match="ft-then-quant ships the merged model"):
        artifacts.load_artifact(path, device="cpu")
    _edit_manifest(path, lambda m: m.update(ordering="quant-first"))
    with pytest.raises(ArtifactError, match="'ordering' must be one of"):
        artifacts.load_artifact(path, device="cpu")


def test_same_size_bit_flips_are_refused_by_default_and_the_check_can_be_skipped(
    setup, demo_tokenizer, tmp_path
):
    path = _adapter_artifact(setup, demo_tokenizer, tmp_path / "art")
    weights = path / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="adapter/adapter_model.safetensors does not match its sha256"):
        artifacts.load_artifact(path, device="cpu")
    artifacts.load_artifact(path, device="cpu", verify_hashes=False)  # opt-out: sizes only


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "'files' must be dict"),
        ({}, "lists no files"),
        ({"model/config.json": 12}, "must be {'bytes'"),
        ({"model/config.json": {"bytes": "12", "sha256": "0" * 64}}, "must be {'bytes'"),
        ({"model/config.json": {"bytes": 12, "sha256": "xyz"}}, "must be {'bytes'"),
        ({"../outside.json": {"bytes": 1, "sha256": "0" * 64}}, "not a path inside the artifact"),
        ({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}, "not a path inside the artifact"),
    ],
)
def test_malformed_manifest_files_entries_are_one_artifact_error(
    setup, demo_tokenizer, tmp_path, files, message
):
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    _edit_manifest(path, lambda m: m.update(files=files))
    with pytest.raises(ArtifactError, match=message):
        artifacts.load_artifact(path, device="cpu")


def test_manifest_field_types_and_unlisted_files_are_refused(setup, demo_tokenizer, tmp_path):
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        read_manifest(path)
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    _edit_manifest(path, lambda m: m.update(max_length="2048"))
    with pytest.raises(ArtifactError, match="'max_length' must be int"):
        artifacts.load_artifact(path, device="cpu")
    path = _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    (path / "model" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="model/extra.safetensors is not listed"):
        artifacts.load_artifact(path, device="cpu")


def test_stale_staging_folders_are_removed_live_ones_kept(setup, demo_tokenizer, tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # that process has exited
    abandoned = tmp_path / f".art.{dead_pid}.abcd_123"
    live = tmp_path / f".art.{os.getpid()}.zzzz_999"
    old_style, fresh_old_style = tmp_path / ".art.qwerty12", tmp_path / ".art.asdfgh34"
    other = tmp_path / f".other.{dead_pid}.abcd_123"
    for folder in (abandoned, live, old_style, fresh_old_style, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    day_ago = os.stat(old_style).st_mtime - artifacts.STALE_UNOWNED_STAGING_S - 60
    os.utime(old_style, (day_ago, day_ago))
    _small_artifact(setup, demo_tokenizer, tmp_path / "art")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["art", live.name, fresh_old_style.name, other.name])
