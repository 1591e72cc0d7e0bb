"""Feature baseline: the features mean what they say, CV beats the class prior, the model is A/B symmetric,
saves and loads."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import polars as pl
import pytest

from kaggle_utils.core.config import BaselineConfig, FoldConfig
from kaggle_utils.core.errors import ArtifactError, DataError
from kaggle_utils.core.metrics import OOF_COLUMNS, log_loss
from kaggle_utils.data.folds import make_folds
from kaggle_utils.train.baseline import BaselineModel, baseline_manifest_path, run_baseline_cv
from kaggle_utils.train.baseline_features import baseline_features, feature_names

SCHEMA = {
    "id": pl.Int64,
    "prompt": pl.List(pl.String),
    "response_a": pl.List(pl.String),
    "response_b": pl.List(pl.String),
    "label": pl.Int8,
}


@pytest.fixture(scope="module")
def train_frame(train_data):
    return train_data.frame


@pytest.fixture(scope="module")
def cv_result(train_frame):
    folds = make_folds(train_frame, FoldConfig(n_folds=4, seed=0))
    return folds, run_baseline_cv(train_frame, folds)


def test_features_measure_lengths_formatting_refusals_and_flags():
    frame = pl.DataFrame(
        {
            "id": [1, 2],
            "prompt": [["first question", "second?"], ["q"]],
            "response_a": [
                ["old turn", "# Title\n- one\n- two\n1. three\n**bold** and ```code``` here"],
                ["same"],
            ],
            "response_b": [["x", "I'm sorry, but I can't help with that."], ["same"]],
            "label": [0, 2],
        },
        schema=SCHEMA,
    )
    features = baseline_features(frame)
    assert features.columns == feature_names()
    assert features.null_count().sum_horizontal().item() == 0
    row = features.row(0, named=True)
    last_a = "# Title\n- one\n- two\n1. three\n**bold** and ```code``` here"
    assert row["prompt_turns"] == 2
    assert row["prompt_chars_total"] == len("first question\nsecond?")
    assert row["a_chars_last"] == len(last_a)
    assert row["a_chars_total"] == len("old turn\n" + last_a)
    assert row["a_lines_last"] == 4
    assert row["a_bullets_last"] == 3
    assert row["a_headers_last"] == 1
    assert row["a_bold_last"] == 1
    assert row["a_code_blocks_last"] == 1
    assert row["a_refusal_last"] == 0 and row["b_refusal_last"] == 1
    assert row["diff_chars_last"] == row["a_chars_last"] - row["b_chars_last"]
    assert row["identical_responses"] == 0
    assert features.row(1, named=True)["identical_responses"] == 1


def test_empty_and_null_turns_give_flags_not_nulls():
    frame = pl.DataFrame(
        {"id": [1], "prompt": [[""]], "response_a": [[None]], "response_b": [["", "  "]], "label": [2]},
        schema=SCHEMA,
    )
    row = baseline_features(frame).row(0, named=True)
    assert row["a_empty_last"] == row["a_empty_total"] == row["b_empty_last"] == row["b_empty_total"] == 1
    assert row["a_chars_total"] == 0 and np.isfinite(row["logratio_chars_total"])


def test_cv_beats_class_prior_on_generated_data(cv_result, train_frame):
    folds, result = cv_result
    score = result.score
    assert score.rows == train_frame.height
    assert score.log_loss < score.prior_log_loss - 0.05
    assert score.prior_log_loss < score.uniform_log_loss
    assert set(score.per_fold) == {0, 1, 2, 3}
    assert result.oof.columns == list(OOF_COLUMNS)
    assert result.oof["id"].to_list() == train_frame["id"].to_list()
    expected_folds = train_frame.select("id").join(folds, on="id")["fold"]
    assert result.oof["fold"].to_list() == expected_folds.to_list()
    probs = result.oof.select("p_a", "p_b", "p_tie").to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert log_loss(train_frame["label"].to_numpy(), probs) == pytest.approx(score.log_loss)


def test_logistic_regression_variant_also_learns(train_frame, cv_result):
    folds, _ = cv_result
    result = run_baseline_cv(train_frame, folds, BaselineConfig(model="logreg"))
    assert result.log_loss < result.score.prior_log_loss - 0.05


def test_predictions_are_symmetric_under_swapping_responses(cv_result, train_frame):
    _, result = cv_result
    sample = train_frame.head(50)
    swapped = sample.with_columns(response_a=pl.col("response_b"), response_b=pl.col("response_a"))
    probs = result.model.predict_proba(sample)
    np.testing.assert_allclose(result.model.predict_proba(swapped), probs[:, [1, 0, 2]], atol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("model", ["hgb", "logreg"])
def test_model_round_trips_through_json_with_identical_predictions(model, cv_result, train_frame, tmp_path):
    folds, result = cv_result
    if model == "logreg":
        result = run_baseline_cv(train_frame, folds, BaselineConfig(model="logreg"))
    path = result.model.save(tmp_path / "baseline.json")
    payload = json.loads(path.read_text())  # plain JSON parameters, nothing executable
    assert payload["format"] == "kaggle_utils-baseline-params" and payload["estimators"][0]["kind"] == model
    manifest = json.loads(baseline_manifest_path(path).read_text())
    assert manifest["files"]["baseline.json"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = BaselineModel.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(train_frame), result.model.predict_proba(train_frame))
    assert loaded.class_prior == pytest.approx(
        np.bincount(train_frame["label"].to_numpy(), minlength=3) / train_frame.height
    )
    again = loaded.save(tmp_path / "again.json")  # a loaded model saves the same parameters again
    assert json.loads(again.read_text())["estimators"] == payload["estimators"]


def test_model_load_refuses_other_features_pickles_unlisted_and_altered_files(
    cv_result, tmp_path, monkeypatch
):
    _, result = cv_result
    path = result.model.save(tmp_path / "baseline.json")
    stale = tmp_path / "stale.json"
    payload = json.loads(path.read_text())
    payload["feature_version"] = "baseline-features-v0"
    _save_listed(stale, json.dumps(payload).encode())
    with pytest.raises(ArtifactError, match="trained on features"):
        BaselineModel.load(stale)
    with pytest.raises(ArtifactError, match="not found"):
        BaselineModel.load(tmp_path / "absent.json")

    # a pickle is never unpickled, whatever its name, even when a manifest lists it
    unpickled = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: unpickled.append(a))
    for name in ("baseline.joblib", "model.json"):
        evil = tmp_path / name
        _save_listed(evil, pickle.dumps({"x": 1}))
        with pytest.raises(ArtifactError, match="never loaded"):
            BaselineModel.load(evil)
    assert not unpickled
    with pytest.raises(ArtifactError, match="pickles"):
        result.model.save(tmp_path / "out.joblib")

    unlisted = tmp_path / "unlisted.json"
    unlisted.write_bytes(path.read_bytes())
    with pytest.raises(ArtifactError, match="unlisted"):
        BaselineModel.load(unlisted)
    altered = bytearray(path.read_bytes())
    position = altered.index(b'"class_prior":[') + len(b'"class_prior":[')
    altered[position] = ord("1") if altered[position] != ord("1") else ord("2")  # same size, other bytes
    path.write_bytes(bytes(altered))
    with pytest.raises(ArtifactError, match="sha256"):
        BaselineModel.load(path)


def _save_listed(path, data: bytes) -> None:
    """Write `data` with a manifest that lists it correctly (only the content is wrong)."""
    path.write_bytes(data)
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    baseline_manifest_path(path).write_text(json.dumps({"files": {path.name: entry}}))


def test_cv_refuses_rows_without_a_fold_or_label(cv_result, train_frame):
    folds, _ = cv_result
    with pytest.raises(DataError, match="have no fold"):
        run_baseline_cv(train_frame, folds.slice(3))
    with pytest.raises(DataError, match="label"):
        run_baseline_cv(train_frame.with_columns(label=pl.lit(None, dtype=pl.Int8)), folds)


def test_the_baseline_oof_records_its_excluded_folds_so_a_student_can_check_its_teacher(
    sample_files, tmp_path, capsys
):
    """`baseline --oof` writes the folds its run left out into the file: the nested teacher
    (--exclude-folds 0) teaches fold 0's student, the plain one is refused for it (its models trained on
    fold 0); an output that contains or lies inside an input is refused before anything is written."""
    from kaggle_utils.cli.main import main
    from kaggle_utils.core.fileio import file_sha256
    from kaggle_utils.core.metrics import exclusion_record, read_oof_records
    from kaggle_utils.data.folds import load_folds, save_folds
    from kaggle_utils.data.load import load_competition
    from kaggle_utils.train.teacher import HeldOutFold, teacher_targets

    frame = load_competition(sample_files.train_csv, split="train").frame
    folds_path = tmp_path / "folds.parquet"
    save_folds(make_folds(frame, FoldConfig(n_folds=3, seed=0)), folds_path)
    folds = load_folds(folds_path)
    common = ["baseline", "--train", str(sample_files.train_csv), "--folds", str(folds_path)]
    nested, plain = tmp_path / "nested.parquet", tmp_path / "plain.parquet"
    assert main([*common, "--exclude-folds", "0", "--oof", str(nested)]) == 0
    assert f"OOF -> {nested} (excluded folds recorded: [0])" in capsys.readouterr().out
    assert main([*common, "--oof", str(plain)]) == 0
    assert read_oof_records(nested) == {"baseline": exclusion_record(folds, [0], file_sha256(folds_path))}
    assert read_oof_records(plain)["baseline"]["excluded_folds"] == {}

    student = frame.join(folds.filter(pl.col("fold") != 0).select("id"), on="id", how="semi")
    held = HeldOutFold.from_folds(folds, 0)
    assert teacher_targets(student, nested, held_out=held)[1].fold_check == "excluded fold 0"
    with pytest.raises(
        DataError,
        match=r"plain.parquet: the teacher saw fold 0's labels \(its run excluded no "
        r"fold\); make a nested teacher",
    ):
        teacher_targets(student, plain, held_out=held)

    capsys.readouterr()
    for oof, message in [
        (tmp_path, f"it contains the folds file {folds_path}"),
        (f"{folds_path}/oof.parquet", "it is inside the folds file"),
    ]:
        assert main([*common, "--oof", str(oof)]) == 2
        assert f"refusing to write {oof}: {message}" in capsys.readouterr().err
