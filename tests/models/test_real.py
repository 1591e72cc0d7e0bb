"""A checkpoint with real weights gets its own tokenizer; model and tokenizer must agree (train, artifacts).

The "real" checkpoint here is a 2-layer Gemma-2 with Gemma-2's real vocabulary size (256,000 rows) saved
without the random-weights mark, i.e. exactly what a downloaded checkpoint directory looks like.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import Gemma2ForSequenceClassification, PreTrainedTokenizerFast

from kaggle_utils.core.config import FormatConfig, ModelConfig, PipelineConfig
from kaggle_utils.core.errors import ArtifactError, UsageError
from kaggle_utils.models import classifier as modeling
from kaggle_utils.models.real import check_tokenizer_model, has_real_weights, is_demo_tokenizer
from kaggle_utils.quant import artifacts
from kaggle_utils.studies import experiment
from kaggle_utils.text.tokenizer import load_tokenizer

GEMMA2_TOKENIZER = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "tokenizers" / "gemma2"
)
if not GEMMA2_TOKENIZER.is_dir():
    GEMMA2_TOKENIZER = Path("/work/shared/reference/tokenizers/gemma2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def weights_only_checkpoint(tmp_path_factory) -> Path:
    """config.json + model.safetensors of a Gemma-2 with 256,000 embedding rows, no tokenizer files."""
    out = tmp_path_factory.mktemp("gemma2_ckpt")
    config = modeling.tiny_gemma2_config(256_000)
    config.eos_token_id = [1, 107]  # as in the real Gemma-2 config
    model = Gemma2ForSequenceClassification(config)
    model.save_pretrained(str(out))
    assert "kaggle_utils_random_weights" not in json.loads((out / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(weights_only_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gemma2_ckpt_tok")
    for file in weights_only_checkpoint.iterdir():
        (out / file.name).symlink_to(file)
    for file in GEMMA2_TOKENIZER.iterdir():
        if file.is_file():
            shutil.copy(file, out / file.name)
    return out


def _cfg(base: Path, tokenizer_path: str | None = None) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model.base_model = str(base)
    cfg.format.tokenizer_path = tokenizer_path
    return cfg


def test_real_checkpoint_is_never_given_a_locally_trained_tokenizer(
    weights_only_checkpoint, train_data, tmp_path
):
    """The reported bug: compare trained a demo tokenizer for a real checkpoint (2048 ids < 256,000 rows)."""
    with pytest.raises(
        UsageError, match=f"base model {weights_only_checkpoint} has real weights but no tokenizer"
    ):
        experiment._tokenizer(_cfg(weights_only_checkpoint), train_data.frame, tmp_path)
    assert not (tmp_path / "tokenizer").exists()


def test_real_checkpoint_uses_its_own_tokenizer(checkpoint_with_tokenizer, train_data, tmp_path):
    tokenizer = experiment._tokenizer(_cfg(checkpoint_with_tokenizer), train_data.frame, tmp_path)
    assert len(tokenizer) == 256_000 and not is_demo_tokenizer(tokenizer)
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [106, 107]
    # another real tokenizer may be named explicitly
    named = experiment._tokenizer(
        _cfg(checkpoint_with_tokenizer, str(GEMMA2_TOKENIZER)), train_data.frame, tmp_path
    )
    assert len(named) == 256_000


def test_demo_tokenizer_named_for_real_weights_is_refused(
    checkpoint_with_tokenizer, demo_tokenizer, train_data, tmp_path
):
    demo_dir = tmp_path / "demo"
    demo_tokenizer.save_pretrained(str(demo_dir))
    with pytest.raises(UsageError, match="trained locally"):
        experiment._tokenizer(_cfg(checkpoint_with_tokenizer, str(demo_dir)), train_data.frame, tmp_path)
    # an unmarked small tokenizer (e.g. trained elsewhere) still cannot index a 256,000-row model meaningfully
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    config.pop("kaggle_utils_demo_tokenizer")
    (demo_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(
        UsageError,
        match=rf"tokenizer {demo_dir} and model {checkpoint_with_tokenizer} disagree: "
        r"the tokenizer has \d+ tokens for 256000 embedding rows",
    ):
        experiment._tokenizer(_cfg(checkpoint_with_tokenizer, str(demo_dir)), train_data.frame, tmp_path)


def test_special_token_ids_must_match_the_checkpoint(checkpoint_with_tokenizer, train_data, tmp_path):
    base = tmp_path / "ckpt"
    base.mkdir()
    for file in checkpoint_with_tokenizer.iterdir():
        (base / file.name).symlink_to(file.resolve())
    config = json.loads((checkpoint_with_tokenizer / "config.json").read_text())
    (base / "config.json").unlink()
    (base / "config.json").write_text(json.dumps({**config, "bos_token_id": 5}))
    with pytest.raises(
        UsageError,
        match=rf"tokenizer {base} and model {base} disagree: bos_token_id is 2 in the "
        r"tokenizer but 5 in the model config",
    ):
        experiment._tokenizer(_cfg(base), train_data.frame, tmp_path)


def test_template_tokens_must_be_single_tokens():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
    config = modeling.tiny_gemma2_config(len(vocab))
    with pytest.raises(UsageError, match="template 'gemma' needs <start_of_turn> as one token"):
        check_tokenizer_model(tokenizer, config, "tok", "model", template="gemma")
    check_tokenizer_model(tokenizer, config, "tok", "model", template="plain")


def test_random_weight_bases_keep_the_demo_tokenizer(demo_tokenizer, demo_base_dir, train_data, tmp_path):
    assert not has_real_weights(str(demo_base_dir)) and not has_real_weights("tiny")
    tokenizer = experiment._tokenizer(_cfg(demo_base_dir), train_data.frame, tmp_path)
    assert is_demo_tokenizer(tokenizer)


def test_artifact_whose_tokenizer_does_not_fit_its_model_is_refused(demo_base_dir, tmp_path):
    model = modeling.build_classifier(ModelConfig(base_model=str(demo_base_dir)), device="cpu")
    path = artifacts.save_artifact(
        tmp_path / "art",
        model,
        load_tokenizer(GEMMA2_TOKENIZER),
        {
            "ordering": "ft-then-quant",
            "variant": "ft-then-quant",
            "base_model": "tiny",
            "folds_file_hash": "0" * 64,
            "cv_scores": {},
        },
        FormatConfig(),
    )
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(
        ArtifactError,
        match=rf"tokenizer {path / 'tokenizer'} and model {path / 'model'} disagree: "
        rf"the tokenizer has 256000 tokens but the model only {rows} embedding",
    ):
        artifacts.load_artifact(path, device="cpu")


def test_artifact_of_a_real_model_with_the_demo_tokenizer_is_refused(
    weights_only_checkpoint, demo_tokenizer, tmp_path
):
    model = modeling.build_classifier(ModelConfig(base_model=str(weights_only_checkpoint)), device="cpu")
    path = artifacts.save_artifact(
        tmp_path / "art",
        model,
        demo_tokenizer,
        {
            "ordering": "ft-then-quant",
            "variant": "ft-then-quant",
            "base_model": str(weights_only_checkpoint),
            "folds_file_hash": "0" * 64,
            "cv_scores": {},
        },
        FormatConfig(),
    )
    with pytest.raises(ArtifactError, match="disagree: the tokenizer was trained locally"):
        artifacts.load_artifact(path, device="cpu")
