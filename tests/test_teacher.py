"""Teacher soft targets: the OOF file is checked (ids, duplicates, sums, values), and train_fold distils from it."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils import training
from kaggle_utils.config import ConfigError, FoldConfig, PipelineConfig, TrainConfig
from kaggle_utils.errors import DataError, UsageError
from kaggle_utils.folds import make_folds
from kaggle_utils.metrics import make_oof, save_oof
from kaggle_utils.teacher import load_teacher, teacher_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _frame(n: int = 6) -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(100, 100 + n)), "label": [0, 1, 2] * (n // 3)})


def _teacher_file(tmp_path, ids, probs, name="big", extra: pl.DataFrame | None = None):
    probs = np.asarray(probs, dtype=np.float64)
    table = pl.DataFrame({"name": [name] * len(ids), "id": ids, "fold": [0] * len(ids),
                          "p_a": probs[:, 0], "p_b": probs[:, 1], "p_tie": probs[:, 2], "label": [0] * len(ids)})
    if extra is not None:
        table = pl.concat([table, extra.select(table.columns)], how="vertical_relaxed")
    path = tmp_path / "oof.parquet"
    table.write_parquet(path)
    return path


def _probs(n: int, seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).random((n, 3)) + 0.1
    return raw / raw.sum(axis=1, keepdims=True)


def test_targets_are_aligned_to_the_frame_by_id_whatever_the_file_order(tmp_path):
    frame = _frame()
    probs = _probs(6)
    order = [3, 0, 5, 1, 4, 2]
    path = _teacher_file(tmp_path, [str(100 + i) for i in order], probs[order])  # string ids, shuffled
    got, report = teacher_targets(frame, path)
    np.testing.assert_allclose(got, probs)
    assert (report.teacher_rows, report.matched_rows, report.duplicates_merged, report.renormalised) == (6, 6, 0, 0)


def test_a_submission_csv_is_a_teacher_too(tmp_path):
    """`predict`'s output on the training rows (a teacher trained without the student's held-out fold) teaches
    as an OOF parquet does; a CSV that is not a submission is refused by name."""
    from kaggle_utils.submission import write_submission

    frame, probs = _frame(), _probs(6)
    path = tmp_path / "teacher.csv"
    write_submission(frame["id"].to_list()[::-1], probs[::-1], path)
    got, report = teacher_targets(frame, path)
    np.testing.assert_allclose(got, probs, atol=1e-6)
    assert report.matched_rows == 6 and report.path == str(path)
    (tmp_path / "other.csv").write_text("id,p_a\n100,1\n")
    with pytest.raises(DataError, match="other.csv: not an LMSYS submission"):
        teacher_targets(frame, tmp_path / "other.csv")


def test_a_training_id_the_teacher_lacks_is_an_error_with_the_count_and_ids(tmp_path):
    path = _teacher_file(tmp_path, [100, 101, 102, 103], _probs(4))
    with pytest.raises(DataError, match=r"oof.parquet: the teacher lacks 2 of 6 training ids \(first: \['104', '105'\]"):
        teacher_targets(_frame(), path)


def test_agreeing_duplicates_are_merged_and_counted_disagreeing_ones_refused(tmp_path):
    probs = _probs(6)
    path = _teacher_file(tmp_path, list(range(100, 106)) + [102], np.vstack([probs, probs[2:3]]))
    got, report = teacher_targets(_frame(), path)
    np.testing.assert_allclose(got, probs)
    assert report.duplicates_merged == 1 and report.teacher_rows == 7
    other = np.vstack([probs, [[0.1, 0.1, 0.8]]])
    path = _teacher_file(tmp_path, list(range(100, 106)) + [102], other)
    with pytest.raises(DataError, match=r"rows \[2, 6\] \(id 102\): 1 ids appear more than once with different"):
        teacher_targets(_frame(), path)


def test_sums_near_one_are_renormalised_and_counted_far_ones_refused(tmp_path):
    probs = _probs(6)
    probs[1] *= 1.02  # float storage drift: repaired
    probs[4] *= 0.999_5  # within 1e-3: used as is
    got, report = teacher_targets(_frame(), _teacher_file(tmp_path, list(range(100, 106)), probs))
    assert report.renormalised == 1
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(got[1], probs[1] / probs[1].sum())
    probs[3] *= 1.2
    with pytest.raises(DataError, match=r"oof.parquet, row 3 \(id 103\): probabilities sum to 1.2, not 1"):
        teacher_targets(_frame(), _teacher_file(tmp_path, list(range(100, 106)), probs))


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_probabilities_are_refused(tmp_path, value):
    probs = _probs(6)
    probs[2, 1] = value
    with pytest.raises(DataError, match=r"row 2 \(id 102\): p_b is .*finite and >= 0"):
        teacher_targets(_frame(), _teacher_file(tmp_path, list(range(100, 106)), probs))


def test_several_models_in_one_file_need_a_name(tmp_path):
    probs = _probs(6)
    other = make_oof("small", list(range(100, 106)), [0] * 6, _probs(6, seed=1), [0] * 6)
    path = _teacher_file(tmp_path, list(range(100, 106)), probs, extra=other)
    with pytest.raises(UsageError, match=r"holds 2 models \['big', 'small'\]; set train.teacher_name"):
        load_teacher(path)
    np.testing.assert_allclose(teacher_targets(_frame(), path, "big")[0], probs)
    with pytest.raises(DataError, match="no teacher rows named 'huge'"):
        load_teacher(path, "huge")
    with pytest.raises(DataError, match="teacher file not found"):
        load_teacher(tmp_path / "missing.parquet")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("distill_weight", 1.5, r"train.distill_weight must be in \[0, 1\]"),
    ("distill_temperature", 0.0, "train.distill_temperature must be > 0"),
    ("label_smoothing", 1.0, r"train.label_smoothing must be in \[0, 1\)"),
    ("teacher_path", " ", "train.teacher_path must be a parquet path"),
])
def test_distillation_settings_are_checked_at_construction(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match=message):
        PipelineConfig().with_overrides({"train": {field: value}})


# ------------------------------------------------------------------------------------------------ train_fold


def _tiny_config(base_dir) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model.base_model = str(base_dir)
    cfg.model.gradient_checkpointing = False
    cfg.format.max_length = 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    cfg.train = TrainConfig(learning_rate=1e-3, epochs=1, per_device_batch_size=4, grad_accum=2, max_steps=3,
                            save_every_steps=1000, eval_rows_cap=8, evals_per_run=1)
    return cfg


def _trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.fixture(scope="module")
def small(train_data):
    frame = train_data.frame.head(48)
    return frame, make_folds(frame, FoldConfig(n_folds=3, seed=0))


def test_train_fold_distils_from_an_oof_parquet_and_records_it(small, demo_tokenizer, demo_base_dir, tmp_path):
    """A one-hot teacher at alpha=1, T=1 trains exactly as the default cross-entropy (so the swapped copies'
    teacher targets are swapped with them); a real teacher trains differently; the summary says which."""
    frame, folds = small
    labels = frame["label"].to_numpy()
    one_hot_path = save_oof(make_oof("onehot", frame["id"], np.zeros(frame.height), np.eye(3)[labels], labels),
                            tmp_path / "onehot.parquet")
    soft = 0.6 * np.eye(3)[labels] + 0.4 * _probs(frame.height)
    soft_path = save_oof(make_oof("soft", frame["id"], np.zeros(frame.height), soft, labels),
                         tmp_path / "soft.parquet")

    base = _tiny_config(demo_base_dir)
    assert base.train.swap_augment == "double"
    default = training.train_fold(base, frame, folds, demo_tokenizer, tmp_path / "default", progress=False)
    distil = base.with_overrides({"train": {"teacher_path": str(one_hot_path), "distill_weight": 1.0}})
    one_hot = training.train_fold(distil, frame, folds, demo_tokenizer, tmp_path / "onehot", progress=False)
    for name, value in _trainable(default.model).items():
        torch.testing.assert_close(_trainable(one_hot.model)[name], value, rtol=0, atol=1e-6)

    taught_cfg = base.with_overrides({"train": {"teacher_path": str(soft_path), "distill_weight": 0.7,
                                                "distill_temperature": 2.0, "label_smoothing": 0.1}})
    taught = training.train_fold(taught_cfg, frame, folds, demo_tokenizer, tmp_path / "soft", progress=False)
    changed = _trainable(taught.model)
    assert max(float((changed[k] - v).abs().max()) for k, v in _trainable(default.model).items()) > 1e-4
    summary = json.loads(json.dumps(taught.summary()))
    assert summary["loss"] == {
        "loss": "distillation", "distill_weight": 0.7, "distill_temperature": 2.0, "label_smoothing": 0.1,
        "teacher": {"path": str(soft_path), "name": None, "teacher_rows": frame.height,
                    "matched_rows": taught.train_rows, "duplicates_merged": 0, "renormalised": 0}}
    assert default.summary()["loss"] == {"loss": "cross_entropy", "label_smoothing": 0.0}


def test_train_fold_refuses_a_teacher_missing_training_ids_and_a_loss_fn_beside_a_teacher(
        small, demo_tokenizer, demo_base_dir, tmp_path):
    frame, folds = small
    labels = frame["label"].to_numpy()
    path = save_oof(make_oof("t", frame["id"][:40], np.zeros(40), np.eye(3)[labels[:40]], labels[:40]),
                    tmp_path / "t.parquet")
    cfg = _tiny_config(demo_base_dir).with_overrides({"train": {"teacher_path": str(path)}})
    with pytest.raises(DataError, match=r"t.parquet: the teacher lacks \d+ of \d+ training ids"):
        training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "a", progress=False)
    from kaggle_utils.losses import cross_entropy_loss
    with pytest.raises(UsageError, match="got a loss_fn and the config sets train.teacher_path"):
        training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "b", progress=False,
                            loss_fn=cross_entropy_loss)


def test_label_smoothing_alone_selects_the_teacher_free_loss():
    from kaggle_utils.losses import SOFT_LABELS

    loss_fn, fields, info = training._select_loss(TrainConfig(label_smoothing=0.1), None, ())
    assert fields == () and info == {"loss": "label_smoothed_cross_entropy", "label_smoothing": 0.1}
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    torch.testing.assert_close(loss_fn(logits, {"labels": labels}),
                               torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels))
    _, fields, info = training._select_loss(TrainConfig(teacher_path="t.parquet"), None, ())
    assert fields == (SOFT_LABELS,) and info["loss"] == "distillation"


def test_run_fingerprint_covers_soft_target_values_and_is_unchanged_without_them():
    cfg = PipelineConfig()
    plain = training.run_fingerprint(cfg, 0, [1, 2], 10)
    assert training.run_fingerprint(cfg, 0, [1, 2], 10, {}) == plain
    targets = {"soft_labels": np.array([[0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])}
    taught = training.run_fingerprint(cfg, 0, [1, 2], 10, targets)
    assert taught != plain
    targets["soft_labels"][0] = [0.3, 0.2, 0.5]  # the same teacher path, rewritten
    assert training.run_fingerprint(cfg, 0, [1, 2], 10, targets) != taught
