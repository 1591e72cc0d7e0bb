"""Teacher soft targets: the OOF file is checked (ids, duplicates, sums, values); train_fold distils."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils.core.config import ConfigError, FoldConfig, PipelineConfig, TrainConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.metrics import exclusion_record, load_oof, make_oof, read_oof_records, save_oof
from kaggle_utils.data.folds import make_folds
from kaggle_utils.train import loop as training
from kaggle_utils.train.checkpointing import run_fingerprint
from kaggle_utils.train.fold_data import build_fold_data
from kaggle_utils.train.losses import select_loss
from kaggle_utils.train.teacher import HeldOutFold, load_teacher, teacher_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _frame(n: int = 6) -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(100, 100 + n)), "label": [0, 1, 2] * (n // 3)})


def _teacher_file(tmp_path, ids, probs, name="big", extra: pl.DataFrame | None = None):
    probs = np.asarray(probs, dtype=np.float64)
    table = pl.DataFrame(
        {
            "name": [name] * len(ids),
            "id": ids,
            "fold": [0] * len(ids),
            "p_a": probs[:, 0],
            "p_b": probs[:, 1],
            "p_tie": probs[:, 2],
            "label": [0] * len(ids),
        }
    )
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
    assert (report.teacher_rows, report.matched_rows, report.duplicates_merged, report.renormalised) == (
        6,
        6,
        0,
        0,
    )


def test_a_submission_csv_is_a_teacher_too(tmp_path):
    """`predict`'s output on the training rows (a teacher trained without the student's held-out fold) teaches
    as an OOF parquet does; a CSV that is not a submission is refused by name."""
    from kaggle_utils.data.submission import write_submission

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
    with pytest.raises(
        DataError, match=r"oof.parquet: the teacher lacks 2 of 6 training ids \(first: \['104', '105'\]"
    ):
        teacher_targets(_frame(), path)


def test_agreeing_duplicates_are_merged_and_counted_disagreeing_ones_refused(tmp_path):
    probs = _probs(6)
    path = _teacher_file(tmp_path, list(range(100, 106)) + [102], np.vstack([probs, probs[2:3]]))
    got, report = teacher_targets(_frame(), path)
    np.testing.assert_allclose(got, probs)
    assert report.duplicates_merged == 1 and report.teacher_rows == 7
    other = np.vstack([probs, [[0.1, 0.1, 0.8]]])
    path = _teacher_file(tmp_path, list(range(100, 106)) + [102], other)
    with pytest.raises(
        DataError, match=r"rows \[2, 6\] \(id 102\): 1 ids appear more than once with different"
    ):
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


# ---------------------------------------------------------------------------- the student's held-out fold


def _folded(n: int = 12, n_folds: int = 3) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A frame of n rows and its folds table (row i in fold i % n_folds)."""
    frame = pl.DataFrame({"id": list(range(100, 100 + n)), "label": [0, 1, 2] * (n // 3)})
    return frame, pl.DataFrame({"id": frame["id"], "fold": [i % n_folds for i in range(n)]})


def _fold_teacher(tmp_path, frame, folds, excluded, file="teacher.parquet", rows_of=None, record_folds=None):
    """An OOF teacher of the rows of folds `rows_of` (default: every fold not excluded), written by save_oof
    with the record of a run that left `excluded` out (None: no record)."""
    rows_of = rows_of if rows_of is not None else sorted(set(folds["fold"].to_list()) - set(excluded or []))
    part = folds.filter(pl.col("fold").is_in(rows_of))
    record = (
        None
        if excluded is None
        else exclusion_record(record_folds if record_folds is not None else folds, excluded)
    )
    oof = make_oof("t", part["id"], part["fold"], _probs(part.height), [0] * part.height)
    return save_oof(oof, tmp_path / file, record=record)


def test_a_teacher_that_saw_the_held_out_fold_is_refused_a_nested_one_is_accepted(tmp_path):
    """The student held out on fold 0 trains on folds 1 and 2. A plain K-fold teacher's models for folds 1 and
    2 trained on fold 0, so its record (no fold excluded) is refused; a teacher with no record (an old file, a
    CSV) cannot show otherwise and is refused too; a nested teacher (fold 0 left out) is accepted."""
    frame, folds = _folded()
    student = frame.filter(pl.col("id").is_in(folds.filter(pl.col("fold") != 0)["id"].implode()))
    held = HeldOutFold.from_folds(folds, 0)
    leaky = _fold_teacher(tmp_path, frame, folds, [], "leaky.parquet", rows_of=[1, 2])
    with pytest.raises(
        DataError,
        match=r"^\S*leaky.parquet: the teacher saw fold 0's labels \(its run excluded no "
        r"fold\); make a nested teacher on the student's folds file \(`baseline "
        r"--exclude-folds 0 --oof FILE`, or `--set train.exclude_folds=\[0\]` on "
        r"the teacher's run\) or set train.teacher_allow_leak=true to use it anyway$",
    ):
        teacher_targets(student, leaky, held_out=held)
    unrecorded = _fold_teacher(tmp_path, frame, folds, None, "old.parquet", rows_of=[1, 2])
    with pytest.raises(
        DataError,
        match=r"old.parquet: the teacher records no excluded folds, so nothing shows it "
        r"never saw fold 0's labels; make a nested teacher",
    ):
        teacher_targets(student, unrecorded, held_out=held)
    from kaggle_utils.data.submission import write_submission

    csv = tmp_path / "teacher.csv"
    write_submission(student["id"].to_list(), _probs(student.height), csv)
    with pytest.raises(DataError, match=r"teacher.csv: the teacher records no excluded folds"):
        teacher_targets(student, csv, held_out=held)

    nested = _fold_teacher(tmp_path, frame, folds, [0], "nested.parquet")
    got, report = teacher_targets(student, nested, held_out=held)
    assert got.shape == (student.height, 3)
    assert (report.excluded_folds, report.fold_check) == ([0], "excluded fold 0")
    # The same nested teacher for a student held out on fold 1: that fold was trained on.
    student1 = frame.filter(pl.col("id").is_in(folds.filter(pl.col("fold") == 2)["id"].implode()))
    with pytest.raises(
        DataError, match=r"nested.parquet: the teacher saw fold 1's labels \(its run excluded \[0\]\)"
    ):
        teacher_targets(student1, nested, held_out=HeldOutFold.from_folds(folds, 1))
    # Without a held-out fold (unlabelled rows, pseudo-labels) nothing is checked.
    assert teacher_targets(student, leaky)[1].fold_check is None


def test_a_teacher_on_other_folds_or_predicting_the_fold_it_claims_to_exclude_is_refused(tmp_path):
    frame, folds = _folded()
    held = HeldOutFold.from_folds(folds, 0)
    student = frame.filter(pl.col("id").is_in(folds.filter(pl.col("fold") != 0)["id"].implode()))
    other_folds = folds.with_columns(
        pl.when(pl.col("id") == 101).then(0).otherwise(pl.col("fold")).alias("fold")
    )
    moved = _fold_teacher(tmp_path, frame, folds, [0], "moved.parquet", record_folds=other_folds)
    with pytest.raises(
        DataError,
        match=r"moved.parquet: the teacher left out a fold 0 of 5 rows that is not this "
        r"run's fold 0 \(4 rows\): made on another folds file",
    ):
        teacher_targets(student, moved, held_out=held)
    claims = _fold_teacher(tmp_path, frame, folds, [0], "claims.parquet", rows_of=[0, 1, 2])
    with pytest.raises(
        DataError,
        match=r"claims.parquet: the teacher predicts 4 ids of fold 0 \(first: "
        r"\['100', '103', '106', '109'\]\) though its record says",
    ):
        teacher_targets(student, claims, held_out=held)


def test_the_opt_in_uses_a_leaky_teacher_and_says_so(tmp_path):
    frame, folds = _folded()
    held = HeldOutFold.from_folds(folds, 0)
    student = frame.filter(pl.col("id").is_in(folds.filter(pl.col("fold") != 0)["id"].implode()))
    leaky = _fold_teacher(tmp_path, frame, folds, [], "leaky.parquet", rows_of=[1, 2])
    _, report = teacher_targets(student, leaky, held_out=held, allow_leak=True)
    assert report.fold_check == (
        "allowed by train.teacher_allow_leak: "
        + str(leaky)
        + ": the teacher saw fold 0's labels (its run excluded no fold)"
    )


def test_save_oof_keeps_each_names_record_and_drops_a_mixed_one(tmp_path):
    frame, folds = _folded()
    path = tmp_path / "oof.parquet"
    nested = exclusion_record(folds, [0], "abc")
    part = folds.filter(pl.col("fold") != 0)
    save_oof(
        make_oof("a", part["id"], part["fold"], _probs(part.height), [0] * part.height), path, record=nested
    )
    assert read_oof_records(path) == {"a": nested}
    assert nested["excluded_folds"]["0"]["rows"] == 4 and nested["folds_sha256"] == "abc"
    save_oof(make_oof("b", part["id"], part["fold"], _probs(part.height), [0] * part.height), path)
    assert read_oof_records(path) == {"a": nested}  # another name without a record: a's is kept
    one = folds.filter(pl.col("fold") == 1)
    save_oof(
        make_oof("a", one["id"], one["fold"], _probs(one.height), [0] * one.height),
        path,
        record=exclusion_record(folds, []),
    )
    assert read_oof_records(path) == {}  # a's rows now come from two runs: no record can speak for them
    assert load_oof(path).height == 2 * part.height


def test_train_fold_refuses_a_teacher_that_saw_the_held_out_fold_unless_allowed(
    small, demo_tokenizer, tmp_path
):
    from kaggle_utils.train.losses import SOFT_LABELS

    frame, folds = small
    labels = frame["label"].to_numpy()
    rest = frame.join(folds.filter(pl.col("fold") != 0).select("id"), on="id", how="semi")
    fold_of = rest.join(folds, on="id", how="left")["fold"]
    soft = _probs(rest.height)
    leaky = save_oof(
        make_oof("t", rest["id"], fold_of, soft, rest["label"]),
        tmp_path / "leaky.parquet",
        record=exclusion_record(folds, []),
    )
    nested = save_oof(
        make_oof("t", rest["id"], fold_of, soft, rest["label"]),
        tmp_path / "nested.parquet",
        record=exclusion_record(folds, [0]),
    )
    assert len(labels) == frame.height
    cfg = PipelineConfig()
    cfg.format.max_length = 128
    cfg.train = TrainConfig(eval_rows_cap=8, teacher_path=str(leaky))
    with pytest.raises(
        DataError,
        match=r"leaky.parquet: the teacher saw fold 0's labels \(its run excluded no "
        r"fold\); make a nested teacher",
    ):
        build_fold_data(cfg, frame, folds, 0, demo_tokenizer, (SOFT_LABELS,))
    cfg.train.teacher_allow_leak = True
    data = build_fold_data(cfg, frame, folds, 0, demo_tokenizer, (SOFT_LABELS,))
    assert data.soft_targets["teacher"]["fold_check"].startswith("allowed by train.teacher_allow_leak: ")
    cfg.train.teacher_allow_leak, cfg.train.teacher_path = False, str(nested)
    data = build_fold_data(cfg, frame, folds, 0, demo_tokenizer, (SOFT_LABELS,))
    assert data.soft_targets["teacher"]["fold_check"] == "excluded fold 0"
    assert data.soft_targets["teacher"]["excluded_folds"] == [0]


def test_a_run_with_excluded_folds_carries_their_record_for_its_oof_file(sample_files, train_data, tmp_path):
    """prepare_experiment names what train.exclude_folds left out (compare-orderings and its oof.parquet write
    it through save_oof's record), measured on the whole folds file before the folds are dropped."""
    from kaggle_utils.core.fileio import file_sha256
    from kaggle_utils.data.folds import save_folds
    from kaggle_utils.studies import experiment

    cfg = experiment.demo_config().with_overrides({"train": {"exclude_folds": [0], "cv_folds": None}})
    folds_path = tmp_path / "folds.parquet"
    fold_table = make_folds(train_data.frame, cfg.folds)
    save_folds(fold_table, folds_path)
    setup = experiment.prepare_experiment(cfg, sample_files.train_csv, tmp_path / "out", folds_path)
    assert setup.oof_record == exclusion_record(fold_table, [0], file_sha256(folds_path))
    assert (
        setup.oof_record["excluded_folds"]["0"]["ids_sha256"]
        == HeldOutFold.from_folds(fold_table, 0).ids_sha256
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("distill_weight", 1.5, r"train.distill_weight must be in \[0, 1\]"),
        ("distill_temperature", 0.0, "train.distill_temperature must be > 0"),
        ("label_smoothing", 1.0, r"train.label_smoothing must be in \[0, 1\)"),
        ("teacher_path", " ", "train.teacher_path must be a parquet path"),
    ],
)
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
    cfg.train = TrainConfig(
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=4,
        grad_accum=2,
        max_steps=3,
        save_every_steps=1000,
        eval_rows_cap=8,
        evals_per_run=1,
    )
    return cfg


def _trainable(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.fixture(scope="module")
def small(train_data):
    frame = train_data.frame.head(48)
    return frame, make_folds(frame, FoldConfig(n_folds=3, seed=0))


def test_train_fold_distils_from_an_oof_parquet_and_records_it(
    small, demo_tokenizer, demo_base_dir, tmp_path
):
    """A one-hot teacher at alpha=1, T=1 trains exactly as the default cross-entropy (so the swapped copies'
    teacher targets are swapped with them); a real teacher trains differently; the summary says which."""
    frame, folds = small
    labels = frame["label"].to_numpy()
    one_hot_path = save_oof(
        make_oof("onehot", frame["id"], np.zeros(frame.height), np.eye(3)[labels], labels),
        tmp_path / "onehot.parquet",
    )
    soft = 0.6 * np.eye(3)[labels] + 0.4 * _probs(frame.height)
    soft_path = save_oof(
        make_oof("soft", frame["id"], np.zeros(frame.height), soft, labels), tmp_path / "soft.parquet"
    )

    base = _tiny_config(demo_base_dir)
    assert base.train.swap_augment == "double"
    default = training.train_fold(base, frame, folds, demo_tokenizer, tmp_path / "default", progress=False)
    # These teachers hold every row's label, the held-out fold's too: the opt-in lets the loss be compared.
    distil = base.with_overrides(
        {"train": {"teacher_path": str(one_hot_path), "distill_weight": 1.0, "teacher_allow_leak": True}}
    )
    one_hot = training.train_fold(distil, frame, folds, demo_tokenizer, tmp_path / "onehot", progress=False)
    for name, value in _trainable(default.model).items():
        torch.testing.assert_close(_trainable(one_hot.model)[name], value, rtol=0, atol=1e-6)

    taught_cfg = base.with_overrides(
        {
            "train": {
                "teacher_path": str(soft_path),
                "distill_weight": 0.7,
                "distill_temperature": 2.0,
                "label_smoothing": 0.1,
                "teacher_allow_leak": True,
            }
        }
    )
    taught = training.train_fold(taught_cfg, frame, folds, demo_tokenizer, tmp_path / "soft", progress=False)
    changed = _trainable(taught.model)
    assert max(float((changed[k] - v).abs().max()) for k, v in _trainable(default.model).items()) > 1e-4
    summary = json.loads(json.dumps(taught.summary()))
    assert summary["loss"] == {
        "loss": "distillation",
        "distill_weight": 0.7,
        "distill_temperature": 2.0,
        "label_smoothing": 0.1,
        "teacher": {
            "path": str(soft_path),
            "name": None,
            "teacher_rows": frame.height,
            "matched_rows": taught.train_rows,
            "duplicates_merged": 0,
            "renormalised": 0,
            "excluded_folds": None,
            "fold_check": f"allowed by train.teacher_allow_leak: {soft_path}: the teacher records no "
            "excluded folds, so nothing shows it never saw fold 0's labels",
        },
    }
    assert default.summary()["loss"] == {"loss": "cross_entropy", "label_smoothing": 0.0}


def test_train_fold_refuses_a_teacher_missing_training_ids_and_a_loss_fn_beside_a_teacher(
    small, demo_tokenizer, demo_base_dir, tmp_path
):
    frame, folds = small
    labels = frame["label"].to_numpy()
    path = save_oof(
        make_oof("t", frame["id"][:40], np.zeros(40), np.eye(3)[labels[:40]], labels[:40]),
        tmp_path / "t.parquet",
    )
    cfg = _tiny_config(demo_base_dir).with_overrides({"train": {"teacher_path": str(path)}})
    with pytest.raises(DataError, match=r"t.parquet: the teacher lacks \d+ of \d+ training ids"):
        training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "a", progress=False)
    from kaggle_utils.train.losses import cross_entropy_loss

    with pytest.raises(UsageError, match="got a loss_fn and the config sets train.teacher_path"):
        training.train_fold(
            cfg, frame, folds, demo_tokenizer, tmp_path / "b", progress=False, loss_fn=cross_entropy_loss
        )


def test_label_smoothing_alone_selects_the_teacher_free_loss():
    from kaggle_utils.train.losses import SOFT_LABELS

    loss_fn, fields, info = select_loss(TrainConfig(label_smoothing=0.1), None, ())
    assert fields == () and info == {"loss": "label_smoothed_cross_entropy", "label_smoothing": 0.1}
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    torch.testing.assert_close(
        loss_fn(logits, {"labels": labels}), torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    )
    _, fields, info = select_loss(TrainConfig(teacher_path="t.parquet"), None, ())
    assert fields == (SOFT_LABELS,) and info["loss"] == "distillation"


def test_run_fingerprint_covers_soft_target_values_and_is_unchanged_without_them():
    cfg = PipelineConfig()
    plain = run_fingerprint(cfg, 0, [1, 2], 10)
    assert run_fingerprint(cfg, 0, [1, 2], 10, {}) == plain
    targets = {"soft_labels": np.array([[0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])}
    taught = run_fingerprint(cfg, 0, [1, 2], 10, targets)
    assert taught != plain
    targets["soft_labels"][0] = [0.3, 0.2, 0.5]  # the same teacher path, rewritten
    assert run_fingerprint(cfg, 0, [1, 2], 10, targets) != taught
