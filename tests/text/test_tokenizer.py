"""The locally trained demo tokenizer (Gemma's special-token layout) and loading tokenizers from disk."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kaggle_utils.core.errors import UsageError
from kaggle_utils.text.tokenizer import GEMMA_SPECIAL_TOKENS, load_tokenizer, train_demo_tokenizer

CORPUS = [
    "Can you explain how the simple model works?",
    "Sure! The model reads the data, then it predicts an answer.",
    "Écris un poème sur la mer — naïve café résumé 😊 数据 données",
    "def f(x):\n    return [y for y in x if y]\n",
    "I'm sorry, but I can't help with that.",
] * 40
SAMPLES = ["hello world", "naïve café 😊 数据", "  leading spaces\n\ttabs", "<start_of_turn>user\nhi", ""]


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tok")
    return out, train_demo_tokenizer(CORPUS, out, vocab_size=300)


def test_special_tokens_follow_gemma_layout(saved_tokenizer):
    _, tok = saved_tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.convert_tokens_to_ids(list(GEMMA_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right"
    for token in ("<start_of_turn>", "<end_of_turn>"):
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    assert len(tok) <= 300


def test_bos_is_added_at_the_start_and_no_eos(saved_tokenizer):
    _, tok = saved_tokenizer
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert tok("hello world", add_special_tokens=False)["input_ids"] == ids[1:]


def test_byte_level_encoding_is_lossless_and_never_unknown(saved_tokenizer):
    _, tok = saved_tokenizer
    for text in SAMPLES[:3] + ["unseen: ζωή, 🚀, \u200b"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_save_and_load_round_trip_gives_identical_ids(saved_tokenizer):
    out, tok = saved_tokenizer
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    for loaded in (load_tokenizer(out), AutoTokenizer.from_pretrained(str(out), local_files_only=True)):
        assert loaded.convert_tokens_to_ids(list(GEMMA_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
        assert loaded(SAMPLES)["input_ids"] == tok(SAMPLES)["input_ids"]
        assert loaded.pad_token_id == 0 and loaded.bos_token_id == 2


def test_in_memory_tokenizer_matches_the_saved_one(saved_tokenizer):
    _, saved = saved_tokenizer
    in_memory = train_demo_tokenizer(CORPUS, None, vocab_size=300)
    assert in_memory(SAMPLES)["input_ids"] == saved(SAMPLES)["input_ids"]


def test_conftest_demo_tokenizer_on_generated_data(demo_tokenizer, train_data):
    assert demo_tokenizer.convert_tokens_to_ids(list(GEMMA_SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert 900 <= len(demo_tokenizer) <= 1024
    text = train_data.frame["response_a"][0][0]
    assert demo_tokenizer.decode(demo_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_training_rejects_a_vocabulary_too_small_and_no_text():
    with pytest.raises(UsageError, match="vocab_size=100"):
        train_demo_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(UsageError, match="no texts"):
        train_demo_tokenizer(iter([]))


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(UsageError, match="no tokenizer path"):
        load_tokenizer(None)
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError, match=str(missing)):
        load_tokenizer(missing)
    a_file = tmp_path / "tokenizer.json"
    a_file.write_text("{}")
    with pytest.raises(UsageError, match="is a file"):
        load_tokenizer(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.bin").write_text("x")
    with pytest.raises(UsageError, match=r"not a tokenizer directory.*weights\.bin"):
        load_tokenizer(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(UsageError, match=str(broken)):
        load_tokenizer(broken)


def test_loading_a_tokenizer_without_pad_uses_eos(tmp_path):
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "</s>": 1, "hello": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(
        tmp_path
    )
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 1
