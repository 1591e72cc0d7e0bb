"""kaggle_utils.data.sample: exact LMSYS format, deterministic, real-data shape, a learnable signal, traps."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.sample import generate_competition_files, generate_competition_frames, sample_stats
from kaggle_utils.data.sample_traps import TRAP_RATES

TRAIN_HEADER = ["id", "model_a", "model_b", "prompt", "response_a", "response_b", *LABEL_COLUMNS]
TEST_HEADER = ["id", "prompt", "response_a", "response_b"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """2,000 labelled rows: enough for the shape and signal checks, about a second to build and load."""
    files = generate_competition_files(tmp_path_factory.mktemp("medium"), n_train=2000, n_test=200, seed=3)
    return files, load_competition(files.train_csv, split="train")


# --------------------------------------------------------------------------------------------- format
def test_files_have_the_exact_lmsys_layout(sample_files):
    with open(sample_files.train_csv, newline="", encoding="utf-8") as handle:
        train_rows = list(csv.reader(handle))  # the stdlib reader agrees with polars on the quoting
    assert train_rows[0] == TRAIN_HEADER
    assert len(train_rows) == 401
    with open(sample_files.test_csv, newline="", encoding="utf-8") as handle:
        test_rows = list(csv.reader(handle))
    assert test_rows[0] == TEST_HEADER and len(test_rows) == 41

    clean = [
        row
        for row in train_rows[1:]
        if row[0] not in {str(i) for ids in sample_files.traps["train"].values() for i in ids}
    ]
    for row in clean[:50]:
        for cell in row[3:6]:
            turns = json.loads(cell)  # JSON text of a list of strings
            assert isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
        assert sorted(row[6:9]) == ["0", "0", "1"]
    raw = sample_files.train_csv.read_text(encoding="utf-8")
    assert '"[""' in raw  # JSON quotes doubled inside CSV-quoted fields, as in Kaggle's files

    submission = pl.read_csv(sample_files.sample_submission_csv)
    assert submission.columns == ["id", *LABEL_COLUMNS]
    assert submission["id"].to_list() == [int(row[0]) for row in test_rows[1:]]
    assert np.allclose(submission.select(LABEL_COLUMNS).to_numpy(), 1 / 3, atol=1e-6)
    train_ids = {int(row[0]) for row in train_rows[1:]}
    assert len(train_ids) == 400 and not train_ids & set(submission["id"].to_list())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate_competition_files(tmp_path / "a", n_train=300, n_test=30, seed=11)
    second = generate_competition_files(tmp_path / "b", n_train=300, n_test=30, seed=11)
    other = generate_competition_files(tmp_path / "c", n_train=300, n_test=30, seed=12)
    for name in ("train_csv", "test_csv", "sample_submission_csv"):
        assert digest(getattr(first, name)) == digest(getattr(second, name))
    assert digest(first.train_csv) != digest(other.train_csv)
    assert first.traps == second.traps


def test_in_memory_frames_match_the_files(tmp_path):
    data = generate_competition_frames(n_train=250, n_test=25, seed=5)
    files = generate_competition_files(tmp_path, n_train=250, n_test=25, seed=5)
    assert data.train.columns == TRAIN_HEADER and data.test.columns == TEST_HEADER
    assert pl.read_csv(files.train_csv, infer_schema=False).equals(data.train.cast(pl.String))
    assert data.traps == files.traps


# ------------------------------------------------------------------------------------------- shape
def test_shape_like_the_real_data(medium):
    files, loaded = medium
    stats = sample_stats(loaded.frame)
    balance = stats["class_balance"]
    for name, target in (("a", 0.349), ("b", 0.342), ("tie", 0.309)):
        assert abs(balance[name] - target) < 0.05, balance
    assert 0.08 < stats["multi_turn_share"] < 0.20
    assert 0.80 < stats["distinct_prompts"] / stats["rows"] < 0.96  # ~10% of rows reuse a prompt
    assert 700 < stats["response_chars_median"] < 1500
    assert 0.01 < stats["response_share_over_5000"] < 0.10
    assert stats["responses_over_20000"] >= 1
    assert stats["prompt_chars_median"] < stats["response_chars_median"] / 3
    assert set(loaded.frame["model_a"].unique()) & set(loaded.frame["model_b"].unique())
    assert (loaded.frame["model_a"] != loaded.frame["model_b"]).all()


def test_shared_prompts_cross_rows_with_different_responses(medium):
    _, loaded = medium
    frame = loaded.frame.with_columns(key=pl.col("prompt").list.join("\n"))
    groups = frame.group_by("key").agg(pl.len().alias("n"), pl.col("response_a").n_unique().alias("answers"))
    shared = groups.filter(pl.col("n") > 1)
    assert shared.height >= 50
    assert (shared["answers"] > 1).any()  # the same prompt with different conversations: group leakage bait


# ------------------------------------------------------------------------------------------- signal
def _features(frame: pl.DataFrame) -> np.ndarray:
    columns = []
    for side in ("response_a", "response_b"):
        text = frame[side].list.join("\n")
        columns += [
            np.log1p(text.str.len_chars().to_numpy()),
            text.str.contains("I'm sorry").to_numpy().astype(float),
            text.str.contains(r"(?m)^(?:- |\d\. |#+ )").to_numpy().astype(float),
        ]
    features = np.stack(columns, axis=1)
    return np.column_stack([features, features[:, 0] - features[:, 3]])


def test_a_simple_model_beats_the_class_prior(medium):
    _, loaded = medium
    labels = loaded.frame["label"].to_numpy()
    prior = np.bincount(labels, minlength=3) / len(labels)
    prior_loss = log_loss(labels, np.tile(prior, (len(labels), 1)))
    features = _features(loaded.frame)

    def cv_loss(columns: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression())
        return log_loss(labels, cross_val_predict(model, columns, labels, cv=5, method="predict_proba"))

    assert cv_loss(features) < prior_loss - 0.08  # lengths + refusal + formatting flags
    assert (
        cv_loss(features[:, [0, 3, 6]]) < prior_loss - 0.03
    )  # lengths alone (the feature baseline's signal)


def test_lexical_signals_are_frequent_and_strong(medium):
    _, loaded = medium
    frame = loaded.frame.with_columns(
        refusal_a=pl.col("response_a").list.last().str.starts_with("I'm sorry"),
        refusal_b=pl.col("response_b").list.last().str.starts_with("I'm sorry"),
        markdown_a=pl.col("response_a").list.last().str.contains("(?m)^## "),
        markdown_b=pl.col("response_b").list.last().str.contains("(?m)^## "),
    )
    refusal_rows = frame.filter(pl.col("refusal_a") | pl.col("refusal_b"))
    assert 0.12 < refusal_rows.height / frame.height < 0.25
    one_sided = frame.filter(pl.col("refusal_a") ^ pl.col("refusal_b"))
    refuser_loses = (one_sided["refusal_a"] & (one_sided["label"] == 1)) | (
        one_sided["refusal_b"] & (one_sided["label"] == 0)
    )
    assert refuser_loses.mean() > 0.75
    markdown_only = frame.filter(
        (pl.col("markdown_a") ^ pl.col("markdown_b")) & ~pl.col("refusal_a") & ~pl.col("refusal_b")
    )
    formatted_wins = (markdown_only["markdown_a"] & (markdown_only["label"] == 0)) | (
        markdown_only["markdown_b"] & (markdown_only["label"] == 1)
    )
    formatted_loses = (markdown_only["markdown_a"] & (markdown_only["label"] == 1)) | (
        markdown_only["markdown_b"] & (markdown_only["label"] == 0)
    )
    assert formatted_wins.sum() > 1.5 * formatted_loses.sum()


# --------------------------------------------------------------------------------------------- traps
# trap kind -> (report section, report kind) that loading must show for the trap's ids
TRAP_REPORT = {
    "null_turn": ("repairs", "null_turn"),
    "both_responses_null": ("observations", "both_responses_empty"),
    "empty_list": ("repairs", "empty_list"),
    "both_responses_empty": ("observations", "both_responses_empty"),
    "empty_prompt": ("observations", "empty_prompt"),
    "missing_cell": ("repairs", "null_cell"),
    "lone_surrogate": ("repairs", "lone_surrogate"),
    "nul_character": ("repairs", "nul_character"),
    "turn_count_mismatch": ("repairs", "turn_count_mismatch"),
    "python_literal_list": ("repairs", "fallback_parsed"),
    "truncated_list": ("repairs", "fallback_parsed"),
    "unescaped_quotes": ("repairs", "fallback_parsed"),
    "bare_string": ("repairs", "bare_string"),
}


def _report_ids(report, section: str, kind: str) -> list:
    return (report.repair_examples if section == "repairs" else report.observation_examples).get(kind, [])


@pytest.mark.parametrize("split", ["train", "test"])
def test_loading_reports_every_trap(sample_files, split):
    path = sample_files.train_csv if split == "train" else sample_files.test_csv
    traps = sample_files.traps[split]
    assert set(traps) == set(TRAP_RATES), "every trap kind is injected, even in a small file"
    loaded = load_competition(path, split=split)
    report, frame = loaded.report, loaded.frame
    rows = {row["id"]: row for row in frame.iter_rows(named=True)}

    for trap, (section, kind) in TRAP_REPORT.items():
        for row_id in traps[trap]:
            assert row_id in _report_ids(report, section, kind), (trap, row_id)
    if split == "train":
        assert sorted(report.dropped_ids) == sorted(traps["unparseable"])
        assert set(traps["identical_responses_non_tie"]) <= set(
            report.observation_examples["identical_responses_non_tie"]
        )
    else:
        assert report.dropped == {}
        assert traps["unparseable"] == report.repair_examples["unparseable_kept_empty"]
        assert sorted(rows) == sorted(
            pl.read_csv(path, columns=["id"])["id"].to_list()
        )  # every test id survives

    for row_id in traps["surrogate_pair"]:
        assert "\U0001f60a" in rows[row_id]["response_b"][-1]  # a valid pair decodes to one emoji, no repair
        assert row_id not in report.repair_examples.get("lone_surrogate", [])
    for row_id in traps["lone_surrogate"]:
        assert "\ufffd" in rows[row_id]["response_a"][-1]
    for row_id in traps["special_characters"]:
        assert (
            ' She said "yes, of course", then left.\n\tPath: C:\\temp\\new, "quoted, text"'
            in rows[row_id]["response_a"][-1]
        )
    for row_id in traps["very_long_field"]:
        assert len(rows[row_id]["response_a"][-1]) > 20_000
    for row_id in traps["unescaped_quotes"]:
        assert rows[row_id]["response_a"][0].startswith('He said "yes" to the plan, then left.')
    for row_id in traps["python_literal_list"]:
        assert rows[row_id]["prompt"][-1].endswith("It's \"fine\", isn't it?")
    for row_id in traps["identical_responses_non_tie"]:
        assert rows[row_id]["response_a"] == rows[row_id]["response_b"]


def test_every_string_encodes_and_sides_align(sample_files, train_data):
    for loaded in (train_data, load_competition(sample_files.test_csv)):
        lengths = loaded.frame.select(pl.col("prompt", "response_a", "response_b").list.len())
        assert (lengths["prompt"] == lengths["response_a"]).all() and (
            lengths["prompt"] == lengths["response_b"]
        ).all()
        for column in ("prompt", "response_a", "response_b"):
            for turns in loaded.frame[column]:
                for turn in turns:
                    turn.encode("utf-8")


def test_without_traps_nothing_needs_repair(tmp_path):
    files = generate_competition_files(tmp_path, n_train=300, n_test=30, seed=2, traps=False)
    assert files.traps == {"train": {}, "test": {}}
    for path in (files.train_csv, files.test_csv):
        report = load_competition(path).report
        assert report.repairs == {} and report.dropped == {} and report.rows_kept == report.rows_read
        assert "identical_responses_non_tie" not in report.observations


def test_tiny_files_still_work(tmp_path):
    files = generate_competition_files(tmp_path, n_train=5, n_test=3, seed=0)
    train = load_competition(files.train_csv)
    test = load_competition(files.test_csv)
    assert train.report.rows_read == 5 and test.frame.height == 3
    assert sum(len(ids) for ids in files.traps["test"].values()) == 3  # one trap per row while room lasts
