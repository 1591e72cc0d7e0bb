"""Any decoder backbone: Gemma-2, Gemma-3 (text), Llama-3, Qwen-2 and Mistral through the same pipeline.

Each family: a 2-layer random config read from a config.json (the architecture comes from its model_type), a
locally trained tokenizer carrying that family's special tokens, the template picked from the tokenizer
("auto"), LoRA on every linear layer, one ordering trained, exported, shipped and reloaded.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from kaggle_utils.core.config import LoraSettings, ModelConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.data.sample import generate_competition_files
from kaggle_utils.models import classifier as modeling
from kaggle_utils.quant.artifacts import load_artifact
from kaggle_utils.studies import experiment
from kaggle_utils.studies import orderings as compare
from kaggle_utils.text.template import template_for_tokenizer
from kaggle_utils.text.tokenizer import train_demo_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

# (config model_type, transformers class, tokenizer family, template that family resolves to)
FAMILIES = [
    ("gemma2", "Gemma2ForSequenceClassification", "gemma", "gemma"),
    ("gemma3_text", "Gemma3TextForSequenceClassification", "gemma", "gemma"),
    ("llama", "LlamaForSequenceClassification", "llama3", "llama3"),
    ("qwen2", "Qwen2ForSequenceClassification", "chatml", "chatml"),
    ("mistral", "MistralForSequenceClassification", "mistral", "plain"),
]


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    return generate_competition_files(
        tmp_path_factory.mktemp("small"), n_train=48, n_test=8, seed=3
    ).train_csv


@pytest.fixture(scope="module")
def texts(train_data):
    frame = train_data.frame.head(200)
    return [
        turn for column in ("prompt", "response_a", "response_b") for turns in frame[column] for turn in turns
    ]


def _family_base(model_type: str, family: str, texts, tmp_path):
    tokenizer = train_demo_tokenizer(texts, tmp_path / "tokenizer", vocab_size=400, family=family)
    config = modeling.tiny_decoder_config(
        model_type, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    config_path = tmp_path / "config.json"
    config.to_json_file(str(config_path))
    return tokenizer, config_path


@pytest.mark.parametrize("model_type,class_name,family,template", FAMILIES)
def test_each_family_builds_with_lora_on_all_linear_layers(
    model_type, class_name, family, template, texts, tmp_path
):
    tokenizer, config_path = _family_base(model_type, family, texts, tmp_path)
    assert template_for_tokenizer(tokenizer) == template
    model = modeling.build_classifier(
        ModelConfig(base_model=str(config_path)), device="cpu", pad_token_id=tokenizer.pad_token_id
    )
    assert type(model).__name__ == class_name
    assert model.config.model_type == model_type
    if model_type == "gemma2":
        assert model.config._attn_implementation == "eager"  # soft-capping applied exactly
    peft_model = modeling.apply_lora(model, LoraSettings(r=2, target_modules=(modeling.ALL_LINEAR,)))
    decoder_linears = [
        name
        for name, module in peft_model.named_modules()
        if type(module) is nn.Linear
        and ".layers." in name
        and "lora_" not in name
        and not name.endswith(".base_layer")
    ]
    assert decoder_linears == []  # every linear layer of the decoder got wrapped by LoRA
    batch = tokenizer(["hello there", "a longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = peft_model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_lora_targets_that_name_no_layer_are_refused(texts, tmp_path):
    tokenizer, config_path = _family_base("llama", "llama3", texts, tmp_path)
    model = modeling.build_classifier(ModelConfig(base_model=str(config_path)), device="cpu")
    with pytest.raises(UsageError, match=r"lora.target_modules \['c_attn'\] name no linear layer"):
        modeling.apply_lora(model, LoraSettings(r=2, target_modules=("q_proj", "c_attn")))


def test_unsupported_architectures_are_refused_by_name(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(
        UsageError, match="model_type is 'gpt2'; this pipeline builds decoder classifiers for"
    ):
        modeling.load_model_config(ModelConfig(base_model=str(path)))


@pytest.mark.slow
@pytest.mark.parametrize("model_type,class_name,family,template", FAMILIES)
def test_each_family_trains_ships_and_reloads(
    model_type, class_name, family, template, texts, small_train, tmp_path
):
    tokenizer, config_path = _family_base(model_type, family, texts, tmp_path)
    cfg = experiment.demo_config()
    cfg.model.base_model = str(config_path)
    cfg.format = dataclasses.replace(
        cfg.format, tokenizer_path=str(tmp_path / "tokenizer"), template="auto", max_length=192
    )
    cfg.folds.n_folds = 4
    cfg.lora = dataclasses.replace(cfg.lora, r=2, target_modules=(modeling.ALL_LINEAR,))
    cfg.train = dataclasses.replace(
        cfg.train, max_steps=1, eval_every_steps=1, save_every_steps=1, per_device_batch_size=4
    )
    report = compare.compare_orderings(
        cfg, small_train, tmp_path / "run", variants=["ft-then-quant"], progress=False
    )
    fold = report.run("ft-then-quant").folds[0]
    artifact = load_artifact(fold.artifact_dir, device="cpu")
    inner = artifact.model.get_base_model() if hasattr(artifact.model, "get_base_model") else artifact.model
    assert type(inner).__name__ == class_name
    assert template_for_tokenizer(artifact.tokenizer) == template
    assert 0 < fold.log_loss_quantized < 5


def test_auto_template_errors_name_the_resolved_template(texts, tmp_path):
    import polars as pl

    from kaggle_utils.core.config import FormatConfig
    from kaggle_utils.text.encode import encode_rows

    tokenizer = train_demo_tokenizer(texts, tmp_path / "tok", vocab_size=400, family="chatml")
    frame = pl.DataFrame({"id": [1], "prompt": [["hi"]], "response_a": [["a"]], "response_b": [["b"]]})
    with pytest.raises(UsageError, match="too small for template 'chatml' with this tokenizer"):
        encode_rows(frame, tokenizer, FormatConfig(template="auto", max_length=8))
