"""Grouped folds: no prompt group crosses folds, every id once, balanced classes, deterministic by seed."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from kaggle_utils.core.config import FoldConfig
from kaggle_utils.core.errors import DataError
from kaggle_utils.data.folds import (
    check_folds,
    fold_summary,
    folds_file_hash,
    load_folds,
    make_folds,
    prompt_group_id,
    prompt_group_key,
    save_folds,
)


def labelled_frame(n_prompts: int = 300, seed: int = 0) -> pl.DataFrame:
    """Rows in the data contract's shape; about a third of the prompts are shared by 2-4 rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for prompt_index in range(n_prompts):
        copies = int(rng.choice([1, 1, 2, 3, 4]))
        n_turns = int(rng.choice([1, 1, 1, 2]))
        prompt = [f"question {prompt_index} part {turn}" for turn in range(n_turns)]
        for _ in range(copies):
            rows.append(
                {
                    "id": len(rows) + 1000,
                    "prompt": prompt,
                    "response_a": [f"answer {rng.integers(1e6)}"] * n_turns,
                    "response_b": [f"other {rng.integers(1e6)}"] * n_turns,
                    "label": int(rng.choice(3, p=[0.35, 0.34, 0.31])),
                }
            )
    schema = {
        "id": pl.Int64,
        "prompt": pl.List(pl.String),
        "response_a": pl.List(pl.String),
        "response_b": pl.List(pl.String),
        "label": pl.Int8,
    }
    return pl.DataFrame(rows, schema=schema)


def test_prompt_group_key_normalises_case_spacing_and_unicode_forms():
    assert prompt_group_key(["Hello  World"]) == prompt_group_key(["hello world"])
    assert prompt_group_key(["  Hello\tWorld \n"]) == "hello world"
    assert prompt_group_key(["Ｈｅｌｌｏ ｗｏｒｌｄ"]) == "hello world"  # full-width forms fold under NFKC
    assert prompt_group_key(["Straße"]) == prompt_group_key(["STRASSE"])  # casefold, not lower
    assert prompt_group_key(["a", "b"]) == "a b"
    assert prompt_group_key([None]) == prompt_group_key([]) == ""
    assert prompt_group_key(["hello world"]) != prompt_group_key(["hello worlds"])
    assert prompt_group_id(["Hello  World"]) == prompt_group_id(["hello world"])
    assert len(prompt_group_id(["x"])) == 16


def test_every_id_once_and_no_group_crosses_folds():
    frame = labelled_frame()
    folds = make_folds(frame, FoldConfig(n_folds=5, seed=1))
    assert folds.columns == ["id", "fold", "group"]
    assert folds["id"].to_list() == frame["id"].to_list()
    assert folds["id"].n_unique() == frame.height
    assert sorted(folds["fold"].unique().to_list()) == [0, 1, 2, 3, 4]
    folds_per_group = folds.group_by("group").agg(pl.col("fold").n_unique())["fold"]
    assert folds_per_group.max() == 1
    # shared prompts really exist in the frame and stay together
    assert frame["prompt"].list.join("|").n_unique() < frame.height


def test_shared_and_normalisation_equivalent_prompts_stay_together():
    frame = labelled_frame(n_prompts=200, seed=3)
    variants = pl.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "prompt": [["Hello  World"], ["hello world"], ["HELLO world "], [" hello\nworld"]],
            "response_a": [["x"]] * 4,
            "response_b": [["y"]] * 4,
            "label": [0, 1, 2, 0],
        },
        schema=frame.schema,
    )
    folds = make_folds(pl.concat([frame, variants]), FoldConfig(n_folds=5, seed=0))
    assert folds.filter(pl.col("id").is_in([1, 2, 3, 4]))["fold"].n_unique() == 1


def test_stratification_keeps_class_shares_close_to_overall():
    frame = labelled_frame(n_prompts=600, seed=5)
    folds = make_folds(frame, FoldConfig(n_folds=5, seed=0))
    summary = fold_summary(folds, frame)
    overall = frame["label"].value_counts(normalize=True).sort("label")["proportion"].to_numpy()
    for index, name in enumerate(("a", "b", "tie")):
        assert np.all(np.abs(summary[f"share_{name}"].to_numpy() - overall[index]) < 0.03)
    assert summary["rows"].sum() == frame.height
    assert summary["rows"].max() - summary["rows"].min() <= 0.1 * frame.height / 5


def test_deterministic_by_seed_and_independent_of_row_order():
    frame = labelled_frame()
    first = make_folds(frame, FoldConfig(seed=7))
    again = make_folds(frame, FoldConfig(seed=7))
    other_seed = make_folds(frame, FoldConfig(seed=8))
    shuffled = make_folds(frame.sample(fraction=1.0, shuffle=True, seed=1), FoldConfig(seed=7))
    assert first.equals(again)
    assert not first["fold"].equals(other_seed["fold"])
    assert first.sort("id").equals(shuffled.sort("id"))


def test_save_load_round_trip_and_hash(tmp_path):
    frame = labelled_frame()
    folds = make_folds(frame)
    path = tmp_path / "sub" / "folds.parquet"
    digest = save_folds(folds, path)
    assert digest == folds_file_hash(path) and len(digest) == 64
    loaded = load_folds(path)
    assert loaded.equals(folds)
    check_folds(loaded, frame)
    assert save_folds(folds, tmp_path / "again.parquet") == digest  # same folds, same bytes
    assert not list(path.parent.glob(".*tmp"))


def test_check_folds_rejects_crossing_groups_duplicates_and_missing_ids():
    frame = labelled_frame()
    folds = make_folds(frame)
    shared_group = folds.group_by("group").agg(pl.len(), pl.col("id").first()).filter(pl.col("len") > 1)
    leaked_id = shared_group["id"][0]
    crossing = folds.with_columns(
        fold=pl.when(pl.col("id") == leaked_id).then((pl.col("fold") + 1) % 5).otherwise(pl.col("fold"))
    )
    with pytest.raises(DataError, match="span more than one fold"):
        check_folds(crossing)
    with pytest.raises(DataError, match="appear more than once"):
        check_folds(pl.concat([folds, folds.head(1)]))
    with pytest.raises(DataError, match=r"have no fold \(ids"):
        check_folds(folds.slice(1), frame)
    with pytest.raises(DataError, match="missing columns"):
        check_folds(folds.drop("group"))


def test_check_folds_recomputes_groups_from_the_frame():
    """A folds file whose own group column looks fine but splits prompts of this frame is caught."""
    frame = labelled_frame()
    folds = make_folds(frame)
    # give every row a unique group and spread a shared prompt across folds: self-consistent, but wrong
    shared = frame.filter(pl.col("prompt").is_first_distinct().not_())["id"][0]
    forged = folds.with_columns(
        group=pl.col("id").cast(pl.String),
        fold=pl.when(pl.col("id") == shared).then((pl.col("fold") + 1) % 5).otherwise(pl.col("fold")),
    )
    check_folds(forged)  # passes on its own
    with pytest.raises(DataError, match="recomputed"):
        check_folds(forged, frame)


def test_make_folds_refuses_unlabelled_rows_and_too_few_groups():
    frame = labelled_frame(n_prompts=50)
    with pytest.raises(DataError, match="null"):
        make_folds(frame.with_columns(label=pl.lit(None, dtype=pl.Int8)))
    with pytest.raises(DataError, match="distinct prompts"):
        make_folds(frame.head(3).with_columns(prompt=pl.lit(["same"])), FoldConfig(n_folds=5))


def test_load_folds_reports_missing_and_damaged_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_folds(tmp_path / "nope.parquet")
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="damaged.parquet"):
        load_folds(damaged)
