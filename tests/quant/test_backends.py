"""The quantization-backend registry: which backend owns a model; the manifest names it; load dispatches."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from kaggle_utils.core.config import FormatConfig, ModelConfig, PipelineConfig, QuantConfig
from kaggle_utils.core.errors import ArtifactError, UsageError
from kaggle_utils.models import classifier as modeling
from kaggle_utils.quant import artifacts
from kaggle_utils.quant import backends as quant_backends
from kaggle_utils.quant.backends import BACKENDS, LoadOptions, QuantBackend, get_backend
from kaggle_utils.quant.int4 import Int4Linear
from kaggle_utils.quant.manifest import update_manifest

FIELDS = {
    "ordering": "ft-then-quant",
    "variant": "ft-then-quant",
    "base_model": "tiny",
    "folds_file_hash": "0" * 64,
    "cv_scores": {"fold_0": 1.0},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def setup(demo_tokenizer, demo_base_dir):
    vocab, pad = len(demo_tokenizer), demo_tokenizer.pad_token_id
    rng = np.random.default_rng(3)
    rows = [[2, *rng.integers(6, vocab, size=n).tolist()] for n in (9, 17, 4)]
    cfg = PipelineConfig()
    cfg.model = ModelConfig(base_model=str(demo_base_dir))
    cfg.qaware.group_size, cfg.qaware.int4_method = 16, "rtn"
    return cfg, rows, pad


def _probs(model, rows, pad):
    return modeling.predict_probs(model, rows, pad, token_budget=128)


def test_the_package_registers_its_backends():
    assert {"bitsandbytes", "gptq", "int4", "none"} <= set(BACKENDS)
    assert [b.name for b in BACKENDS.values() if b.fallback] == ["none"]
    with pytest.raises(UsageError, match="unknown quantization backend 'awq'"):
        get_backend("awq")
    with pytest.raises(UsageError, match="already registered"):
        quant_backends.register_backend(type(get_backend("int4"))())


@pytest.mark.parametrize("backend_name", ["bitsandbytes", "int4", "none"])
def test_each_backend_quantizes_ships_and_reloads_its_model(setup, demo_tokenizer, tmp_path, backend_name):
    """quantize -> save_artifact records the backend -> load_artifact dispatches to it: same predictions."""
    cfg, rows, pad = setup
    backend = get_backend(backend_name)
    cfg = dataclasses.replace(cfg, quant=QuantConfig(scheme="int8"))
    merged = modeling.build_classifier(cfg.model, pad_token_id=pad, device="cpu")
    quantized = backend.quantize(merged, cfg, device="cpu", work_dir=tmp_path)
    assert quant_backends.backend_for_model(quantized) is backend
    path = artifacts.save_artifact(tmp_path / "art", quantized, demo_tokenizer, FIELDS, FormatConfig())
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quant_backend"] == backend_name
    schemes = {"bitsandbytes": "int8", "int4": "int4-asym-g16", "none": "none"}
    assert manifest["quant_scheme"] == schemes[backend_name]
    loaded = artifacts.load_artifact(path, device="cpu", compute_dtype=torch.float32)
    np.testing.assert_allclose(_probs(loaded.model, rows, pad), _probs(quantized, rows, pad), atol=1e-6)
    if backend_name == "int4":
        assert sum(isinstance(m, Int4Linear) for m in loaded.model.modules()) == 14


def test_load_base_gives_each_backend_its_own_layers(setup, demo_base_dir):
    cfg, _, pad = setup
    bnb = get_backend("bitsandbytes").load_base(demo_base_dir, cfg, pad_token_id=pad, device="cpu")
    assert modeling.is_quantized(bnb)
    int4 = get_backend("int4").load_base(demo_base_dir, cfg, pad_token_id=pad, device="cpu")
    assert any(isinstance(m, Int4Linear) for m in int4.modules()) and not modeling.is_quantized(int4)
    plain = get_backend("none").load_base(demo_base_dir, cfg, pad_token_id=pad, device="cpu")
    assert quant_backends.backend_for_model(plain).name == "none"


def test_a_manifest_written_before_the_backend_field_still_loads(setup, demo_tokenizer, tmp_path):
    """Layout 1 artifacts made before `quant_backend` existed: the backend follows from quant_scheme."""
    cfg, rows, pad = setup
    model = modeling.build_classifier(
        cfg.model, quant=QuantConfig(scheme="nf4"), pad_token_id=pad, device="cpu"
    )
    path = artifacts.save_artifact(tmp_path / "art", model, demo_tokenizer, FIELDS, FormatConfig())
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["quant_backend"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = artifacts.load_artifact(path, device="cpu", compute_dtype=torch.float32)
    assert "quant_backend" not in loaded.manifest
    np.testing.assert_allclose(_probs(loaded.model, rows, pad), _probs(model, rows, pad), atol=1e-6)


def test_an_unknown_or_mismatched_backend_is_refused_naming_the_manifest(setup, demo_tokenizer, tmp_path):
    cfg, _, pad = setup
    model = modeling.build_classifier(cfg.model, pad_token_id=pad, device="cpu")
    path = artifacts.save_artifact(tmp_path / "art", model, demo_tokenizer, FIELDS, FormatConfig())
    update_manifest(path, quant_backend="awq")
    with pytest.raises(ArtifactError, match=r"manifest\.json: unknown quant_backend 'awq'"):
        artifacts.load_artifact(path, device="cpu")
    update_manifest(path, quant_backend="gptq")  # quant_scheme "none" is not a GPTQ scheme
    with pytest.raises(ArtifactError, match=r"manifest\.json: unknown quant_scheme 'none' for the 'gptq'"):
        artifacts.load_artifact(path, device="cpu")
    update_manifest(path, quant_backend="int4")  # quant_scheme is still "none"
    with pytest.raises(ArtifactError, match=r"manifest\.json: unknown quant_scheme 'none' for the 'int4'"):
        artifacts.load_artifact(path, device="cpu")
    update_manifest(path, quant_backend=3)
    with pytest.raises(ArtifactError, match="field 'quant_backend' must be str"):
        artifacts.load_artifact(path, device="cpu")


class _Recording(QuantBackend):
    """A backend that loads the plain checkpoint and records the call: proves the dispatch is by manifest."""

    name = "test-recording"
    description = "test only"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def accepts_scheme(self, scheme: str) -> bool:
        return scheme == "recorded"

    def owns_model(self, model: nn.Module) -> bool:
        return getattr(model, "_recorded", False)

    def manifest_fields(self, model: nn.Module) -> dict:
        return {"quant_scheme": "recorded"}

    def quantize(self, merged_model, cfg, device=None, work_dir=None):
        merged_model._recorded = True
        return merged_model

    def load_base(self, path, cfg, pad_token_id=None, device=None):
        raise NotImplementedError

    def load_artifact(self, root, manifest, options: LoadOptions):
        self.calls.append((root, manifest["quant_scheme"], options))
        return get_backend("none").load_artifact(root, {**manifest, "quant_scheme": "none"}, options)


def test_a_registered_backend_is_found_by_save_and_load(setup, demo_tokenizer, tmp_path):
    cfg, _, pad = setup
    backend = quant_backends.register_backend(_Recording())
    try:
        model = backend.quantize(modeling.build_classifier(cfg.model, pad_token_id=pad, device="cpu"), cfg)
        path = artifacts.save_artifact(tmp_path / "art", model, demo_tokenizer, FIELDS, FormatConfig())
        assert json.loads((path / "manifest.json").read_text())["quant_backend"] == "test-recording"
        artifacts.load_artifact(path, device="cpu", compute_dtype=torch.float32)
        assert [(root, scheme, options.dtype) for root, scheme, options in backend.calls] == [
            (path, "recorded", torch.float32)
        ]
    finally:
        BACKENDS.pop("test-recording", None)
