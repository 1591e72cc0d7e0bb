"""Real pretrained weights through the whole pipeline on CPU: Gemma 3 270M (Gemma-3 text, Q4_K_M-rounded) and
SmolLM2-135M-Instruct (Llama architecture, ChatML tokenizer, Q4_1-rounded), each from fetch-model's output.

Training is a smoke run (a handful of rows, one step, short sequences): the numbers say nothing about either
model's quality, and their weights carry the GGUF rounding. What is checked: the checkpoint's own tokenizer is
used, the architecture comes from its config, the artifact reloads and checks out against its tokenizer, and a
valid submission is written from it.
"""

from __future__ import annotations

import dataclasses

import pytest

from kaggle_utils.data.sample import generate_competition_files
from kaggle_utils.data.submission import validate_submission
from kaggle_utils.inference.predictor import predict
from kaggle_utils.models import classifier as modeling
from kaggle_utils.quant.artifacts import load_artifact
from kaggle_utils.studies import experiment
from kaggle_utils.studies import orderings as compare
from kaggle_utils.text.template import template_for_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return generate_competition_files(tmp_path_factory.mktemp("tiny"), n_train=16, n_test=4, seed=5)


@pytest.mark.parametrize(
    "checkpoint,class_name,vocab,template",
    [
        ("gemma3_270m_dir", "Gemma3TextForSequenceClassification", 262_144, "gemma"),
        ("smollm2_dir", "LlamaForSequenceClassification", 49_152, "chatml"),
    ],
)
def test_real_checkpoint_trains_ships_and_submits(
    checkpoint, class_name, vocab, template, tiny_files, tmp_path, request
):
    base = request.getfixturevalue(checkpoint)
    cfg = experiment.demo_config()
    cfg.model.base_model = str(base)
    cfg.model.dtype = "float32"
    cfg.format = dataclasses.replace(cfg.format, template="auto", max_length=96)
    cfg.folds.n_folds = 4
    cfg.lora = dataclasses.replace(cfg.lora, r=2, target_modules=(modeling.ALL_LINEAR,))
    cfg.train = dataclasses.replace(
        cfg.train, max_steps=1, eval_every_steps=1, save_every_steps=1, per_device_batch_size=2
    )
    report = compare.compare_orderings(
        cfg, tiny_files.train_csv, tmp_path / "run", variants=["ft-then-quant"], progress=False
    )
    assert not (tmp_path / "run" / "tokenizer").exists()  # no locally trained tokenizer for real weights
    rounding = "Q4_K_M" if "gemma" in checkpoint else "Q4_1"
    assert f"they carry the {rounding} rounding" in report.setup["base_model_note"]
    assert f"carry the {rounding} rounding" in (tmp_path / "run" / "report.md").read_text()
    fold = report.run("ft-then-quant").folds[0]
    artifact = load_artifact(fold.artifact_dir, device="cpu")  # checks tokenizer against model
    inner = artifact.model.get_base_model() if hasattr(artifact.model, "get_base_model") else artifact.model
    assert type(inner).__name__ == class_name
    assert len(artifact.tokenizer) == vocab and template_for_tokenizer(artifact.tokenizer) == template
    out = tmp_path / "submission.csv"
    predict(fold.artifact_dir, tiny_files.test_csv, out)
    validate_submission(out, tiny_files.test_csv)
