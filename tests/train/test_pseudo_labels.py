"""Pseudo-labels: the confidence rule, dedup against train by normalised prompt, and a fold-safe join that
never lets a pseudo row share a prompt group with the fold's validation rows."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from kaggle_utils.core.config import FoldConfig, PipelineConfig, TrainConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.metrics import exclusion_record, make_oof, save_oof
from kaggle_utils.data.folds import group_ids, make_folds
from kaggle_utils.data.load import load_competition
from kaggle_utils.train import loop as training
from kaggle_utils.train.fold_data import build_fold_data, split_fold, split_inner
from kaggle_utils.train.losses import SOFT_LABELS
from kaggle_utils.train.pseudo_labels import (
    FOR_FOLD,
    PSEUDO_RECORD_KEY,
    dedupe_against,
    join_pseudo,
    load_pseudo_labels,
    make_pseudo_labels,
    save_pseudo_labels,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def test_frame(sample_files):
    return load_competition(sample_files.test_csv, split="test").frame


def _teacher(frame: pl.DataFrame, probs: np.ndarray) -> pl.DataFrame:
    return make_oof("teacher", frame["id"], np.zeros(frame.height), probs, np.zeros(frame.height))


def _confident_probs(n: int) -> np.ndarray:
    top = np.linspace(0.4, 0.95, n)
    return np.column_stack([(1 - top) / 2, top, (1 - top) / 2])


def test_threshold_keeps_confident_rows_with_argmax_label_and_teacher_probs(test_frame):
    probs = _confident_probs(test_frame.height)
    pseudo, report = make_pseudo_labels(_teacher(test_frame, probs), test_frame, threshold=0.8)
    expected = np.flatnonzero(probs.max(axis=1) >= 0.8)
    assert pseudo["id"].to_list() == test_frame["id"][expected.tolist()].to_list()
    assert (pseudo["label"].to_numpy() == 1).all() and pseudo["label"].dtype == pl.Int8
    np.testing.assert_allclose(np.asarray(pseudo[SOFT_LABELS].to_list()), probs[expected])
    assert (report.offered, report.kept_by_confidence) == (test_frame.height, len(expected))
    assert report.min_confidence_kept >= 0.8


def test_top_fraction_keeps_the_most_confident_share(test_frame):
    probs = _confident_probs(test_frame.height)[::-1].copy()  # most confident first in the frame
    pseudo, report = make_pseudo_labels(_teacher(test_frame, probs), test_frame, top_fraction=0.25)
    n = int(np.ceil(0.25 * test_frame.height))
    assert pseudo["id"].to_list() == test_frame["id"].head(n).to_list()
    assert report.kept_by_confidence == n and report.top_fraction == 0.25


def test_the_rule_is_exactly_one_of_threshold_or_top_fraction_and_the_teacher_must_cover_the_rows(test_frame):
    teacher = _teacher(test_frame, _confident_probs(test_frame.height))
    with pytest.raises(UsageError, match="exactly one of threshold= or top_fraction="):
        make_pseudo_labels(teacher, test_frame)
    with pytest.raises(UsageError, match="exactly one of"):
        make_pseudo_labels(teacher, test_frame, threshold=0.9, top_fraction=0.1)
    with pytest.raises(UsageError, match="threshold must be in"):
        make_pseudo_labels(teacher, test_frame, threshold=1.5)
    with pytest.raises(DataError, match=r"the teacher lacks 1 of \d+ unlabelled ids"):
        make_pseudo_labels(teacher.head(test_frame.height - 1), test_frame, threshold=0.5)


def _shout(frame: pl.DataFrame) -> pl.DataFrame:
    """The same prompts in other case and spacing: one normalised prompt group, other text."""
    return frame.with_columns(pl.col("prompt").list.eval("  " + pl.element().str.to_uppercase() + "   "))


def _pseudo_rows(frame: pl.DataFrame, id_offset: int) -> pl.DataFrame:
    probs = np.tile([0.1, 0.8, 0.1], (frame.height, 1))
    return frame.drop("model_a", "model_b", strict=False).with_columns(
        (pl.col("id") + id_offset).alias("id"),
        pl.lit(1, dtype=pl.Int8).alias("label"),
        pl.Series(SOFT_LABELS, probs.tolist(), dtype=pl.List(pl.Float64)),
    )


def _save_for_folds(rows_by_fold: dict[int, pl.DataFrame], folds: pl.DataFrame, path, record_folds=None):
    """Save pseudo rows per held-out fold, each set labelled by a teacher declared to have left that fold out
    of `record_folds` (default `folds`): the rows with their ``for_fold`` and the teachers' record."""
    rows = pl.concat(
        [
            frame.with_columns(pl.lit(fold, dtype=pl.Int32).alias(FOR_FOLD))
            for fold, frame in rows_by_fold.items()
        ]
    )
    record = exclusion_record(record_folds if record_folds is not None else folds, list(rows_by_fold))
    teachers = [
        {
            "path": f"teacher{fold}.csv",
            "source": "declared",
            "excluded": None,
            "kept": frame.height,
            "folds": {str(fold): record["excluded_folds"][str(fold)]},
        }
        for fold, frame in rows_by_fold.items()
    ]
    return save_pseudo_labels(rows, path, teachers)


def test_dedupe_drops_pseudo_rows_whose_normalised_prompt_is_in_train_and_repeats(train_data, test_frame):
    train = train_data.frame
    copies = _pseudo_rows(_shout(train.head(7)), 10**9)
    fresh = _pseudo_rows(test_frame.head(5), 2 * 10**9)
    repeat = _pseudo_rows(test_frame.head(2), 3 * 10**9)  # the same prompts again among the pseudo rows
    pseudo = pl.concat([fresh, copies, repeat])
    assert set(group_ids(copies)) <= set(group_ids(train))  # the normalisation the folds use sees them as one
    kept, report = dedupe_against(pseudo, train)
    assert kept["id"].to_list() == fresh["id"].to_list()
    assert (report.dropped_train_prompt, report.dropped_duplicate_prompt) == (7, 2)


@pytest.fixture(scope="module")
def small(train_data):
    frame = train_data.frame.head(48)
    return frame, make_folds(frame, FoldConfig(n_folds=3, seed=0))


def test_join_never_adds_a_pseudo_row_sharing_a_prompt_group_with_validation_rows(small, test_frame):
    frame, folds = small
    for fold in range(3):
        train_part, val_part = split_fold(frame, folds, fold)
        train_part = train_part.with_columns(
            pl.Series(
                SOFT_LABELS, np.eye(3)[train_part["label"].to_numpy()].tolist(), dtype=pl.List(pl.Float64)
            )
        )
        leaking = _pseudo_rows(_shout(val_part), 10**9)
        fresh = _pseudo_rows(test_frame, 2 * 10**9)
        joined, counts = join_pseudo(train_part, [val_part], pl.concat([leaking, fresh]))
        added = joined.filter(pl.col("id") >= 10**9)
        assert not set(group_ids(added)) & set(group_ids(val_part))
        assert counts == {
            "pseudo_rows": leaking.height + fresh.height,
            "pseudo_added": fresh.height,
            "pseudo_dropped_held_out_group": leaking.height,
        }
        assert joined.columns == train_part.columns and joined.height == train_part.height + fresh.height
        assert added["model_a"].null_count() == fresh.height  # test rows have no model names


def test_join_refuses_pseudo_ids_that_are_training_ids(small, test_frame):
    frame, folds = small
    train_part, val_part = split_fold(frame, folds, 0)
    train_part = train_part.with_columns(pl.Series(SOFT_LABELS, [[1.0, 0.0, 0.0]] * train_part.height))
    clash = _pseudo_rows(test_frame.head(3), 0).with_columns(pl.Series("id", val_part["id"].head(3)))
    with pytest.raises(DataError, match="3 ids are also training-data ids"):
        join_pseudo(train_part, [val_part], clash)


def test_saved_pseudo_labels_are_checked_when_read(tmp_path, test_frame):
    good = _pseudo_rows(test_frame.head(4), 0)
    path = save_pseudo_labels(good, tmp_path / "pseudo.parquet")
    assert load_pseudo_labels(path).equals(good)
    bad = good.with_columns(pl.Series(SOFT_LABELS, [[0.5, 0.4, 0.4]] + [[0.1, 0.8, 0.1]] * 3))
    bad.write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet, row 0 \(id .*\): soft_labels must be 3 finite"):
        load_pseudo_labels(tmp_path / "bad.parquet")


def test_train_fold_adds_pseudo_rows_to_the_training_part_only(
    small, test_frame, demo_tokenizer, demo_base_dir, tmp_path
):
    frame, folds = small
    _, val_part = split_fold(frame, folds, 0)
    pseudo = pl.concat(
        [_pseudo_rows(_shout(val_part.head(3)), 10**9), _pseudo_rows(test_frame.head(8), 2 * 10**9)]
    )
    path = _save_for_folds({0: pseudo}, folds, tmp_path / "pseudo.parquet")
    cfg = PipelineConfig()
    cfg.model.base_model = str(demo_base_dir)
    cfg.model.gradient_checkpointing = False
    cfg.format.max_length = 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    cfg.train = TrainConfig(
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=4,
        grad_accum=2,
        max_steps=2,
        save_every_steps=1000,
        eval_rows_cap=8,
        evals_per_run=1,
        pseudo_path=str(path),
        distill_weight=0.5,
    )
    result = training.train_fold(cfg, frame, folds, demo_tokenizer, tmp_path / "run", progress=False)
    real_train = frame.height - len(result.val_ids)
    assert result.train_rows == real_train + 8
    assert result.summary()["loss"] == {
        "loss": "distillation",
        "distill_weight": 0.5,
        "distill_temperature": 1.0,
        "label_smoothing": 0.0,
        "teacher": None,
        "pseudo": {
            "path": str(path),
            "pseudo_rows": 11,
            "pseudo_added": 8,
            "pseudo_dropped_held_out_group": 3,
            "fold_check": "excluded fold 0",
        },
    }
    assert not set(result.val_ids) & set(pseudo["id"].to_list())


def test_with_an_inner_holdout_pseudo_rows_sharing_its_prompt_groups_are_dropped_too(
    small, test_frame, demo_tokenizer, tmp_path
):
    frame, folds = small
    cfg = PipelineConfig()
    cfg.format.max_length = 128
    cfg.train = TrainConfig(selection="inner", inner_holdout_fraction=0.2, eval_rows_cap=8)
    train_part, val_part = split_fold(frame, folds, 0)
    _, inner_part = split_inner(train_part, folds, cfg.train)
    pseudo = pl.concat(
        [
            _pseudo_rows(_shout(inner_part), 10**9),
            _pseudo_rows(_shout(val_part.head(2)), 2 * 10**9),
            _pseudo_rows(test_frame.head(5), 3 * 10**9),
        ]
    )
    cfg.train.pseudo_path = str(_save_for_folds({0: pseudo}, folds, tmp_path / "pseudo.parquet"))
    data = build_fold_data(cfg, frame, folds, 0, demo_tokenizer, (SOFT_LABELS,))
    added = [i for i in data.train_ids if i >= 10**9]
    assert added == pseudo["id"].tail(5).to_list()
    assert data.soft_targets["pseudo"]["pseudo_dropped_held_out_group"] == inner_part.height + 2
    assert data.n_train_rows == train_part.height - inner_part.height + 5


def test_a_submission_file_is_a_teacher_for_unlabelled_rows(tmp_path, test_frame):
    from kaggle_utils.data.submission import write_submission
    from kaggle_utils.train.teacher import teacher_from_submission

    probs = _confident_probs(test_frame.height)
    path = tmp_path / "submission.csv"
    write_submission(test_frame["id"].to_list(), probs, path)
    pseudo, report = make_pseudo_labels(teacher_from_submission(path), test_frame, threshold=0.9)
    np.testing.assert_allclose(
        np.asarray(pseudo[SOFT_LABELS].to_list()), probs[probs.max(axis=1) >= 0.9], atol=1e-6
    )
    (tmp_path / "other.csv").write_text("id,a,b\n1,0.5,0.5\n")
    with pytest.raises(DataError, match="not an LMSYS submission"):
        teacher_from_submission(tmp_path / "other.csv")


def test_the_pseudo_label_command_keeps_confident_rows_drops_training_prompts_and_refuses_training_ids(
    sample_files, train_data, test_frame, tmp_path, capsys
):
    """The command a competitor runs after `predict` on the test file: its counts add up, the written file
    reads back as pseudo-labels, a prompt seen in train never survives, and training ids are refused."""
    from kaggle_utils.cli.main import main
    from kaggle_utils.data.submission import write_submission

    probs = _confident_probs(test_frame.height)
    teacher = tmp_path / "teacher_submission.csv"
    write_submission(test_frame["id"].to_list(), probs, teacher)
    out = tmp_path / "pseudo.parquet"
    assert (
        main(
            [
                "pseudo-label",
                "--teacher",
                str(teacher),
                "--unlabelled",
                str(sample_files.test_csv),
                "--train",
                str(sample_files.train_csv),
                "--threshold",
                "0.8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    pseudo = load_pseudo_labels(out)
    confident = int((probs.max(axis=1) >= 0.8).sum())
    assert f"{test_frame.height} rows offered; {confident} kept by the rule" in printed
    train_groups = set(group_ids(train_data.frame).to_list())
    assert not set(group_ids(pseudo).to_list()) & train_groups
    assert 0 < pseudo.height <= confident and f"{pseudo.height} pseudo rows" in printed

    # The training file offered as "unlabelled": only rows the training parse dropped can survive.
    as_unlabelled = load_competition(sample_files.train_csv, split="test").frame
    train_teacher = tmp_path / "train_teacher.csv"
    write_submission(as_unlabelled["id"].to_list(), _confident_probs(as_unlabelled.height), train_teacher)
    assert (
        main(
            [
                "pseudo-label",
                "--teacher",
                str(train_teacher),
                "--unlabelled",
                str(sample_files.train_csv),
                "--train",
                str(sample_files.train_csv),
                "--top-fraction",
                "1",
                "--out",
                str(tmp_path / "p1.parquet"),
            ]
        )
        == 0
    )
    survivors = set(load_pseudo_labels(tmp_path / "p1.parquet")["id"].to_list())
    assert survivors <= set(as_unlabelled["id"].to_list()) - set(train_data.frame["id"].to_list())
    capsys.readouterr()
    assert (
        main(
            [
                "pseudo-label",
                "--teacher",
                str(teacher),
                "--unlabelled",
                str(sample_files.test_csv),
                "--train",
                str(sample_files.train_csv),
                "--threshold",
                "1",
                "--out",
                str(tmp_path / "p2.parquet"),
            ]
        )
        == 2
    )
    assert "no pseudo-labelled row is left" in capsys.readouterr().err
    clashing = test_frame.with_columns(pl.Series("id", train_data.frame["id"].head(test_frame.height)))
    clash_csv = tmp_path / "clash.csv"
    clashing_raw = pl.read_csv(sample_files.test_csv).with_columns(clashing["id"])
    clashing_raw.write_csv(clash_csv)
    write_submission(clashing["id"].to_list(), probs, tmp_path / "clash_teacher.csv")
    assert (
        main(
            [
                "pseudo-label",
                "--teacher",
                str(tmp_path / "clash_teacher.csv"),
                "--unlabelled",
                str(clash_csv),
                "--train",
                str(sample_files.train_csv),
                "--threshold",
                "0.8",
                "--out",
                str(tmp_path / "p3.parquet"),
            ]
        )
        == 2
    )
    assert "also uses" in capsys.readouterr().err
    assert not (tmp_path / "p2.parquet").exists() and not (tmp_path / "p3.parquet").exists()


def test_the_agreement_with_labels_the_unlabelled_file_carried_is_counted(test_frame):
    from kaggle_utils.train.pseudo_labels import PseudoReport, label_agreement

    rows = test_frame.head(6).with_columns(pl.Series("label", [0, 1, 2, None, 1, 0], dtype=pl.Int8))
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.1, 0.8, 0.1],
            [0.8, 0.1, 0.1],
            [0.1, 0.1, 0.8],
            [0.05, 0.9, 0.05],
            [0.1, 0.1, 0.8],
        ]
    )
    pseudo, report = make_pseudo_labels(
        _teacher(rows, probs), rows.with_columns(pl.lit(None).alias("label")), threshold=0.5
    )
    label_agreement(pseudo, rows, report)
    assert (report.kept_with_file_label, report.agreement_with_file_label) == (5, 3 / 5)
    unlabelled = PseudoReport()
    label_agreement(pseudo, test_frame.drop("label"), unlabelled)
    assert unlabelled.agreement_with_file_label is None and unlabelled.kept_with_file_label == 0


# ------------------------------------------------------------- each fold's rows from a teacher without it


def test_training_refuses_pseudo_labels_whose_teacher_saw_the_held_out_fold(
    small, test_frame, demo_tokenizer, tmp_path
):
    """Fold 0's student gets only the rows labelled for fold 0 by a teacher that left that very fold out; a
    file from one teacher with no record (any fold, e.g. predicted by a model trained on every fold), a file
    with no rows for the fold and one made on other folds are refused with one line, unless the leak
    is allowed."""
    frame, folds = small
    cfg = PipelineConfig()
    cfg.format.max_length = 128
    cfg.train = TrainConfig(eval_rows_cap=8)
    fresh0, fresh1 = _pseudo_rows(test_frame.head(4), 10**9), _pseudo_rows(test_frame.tail(3), 2 * 10**9)

    def fold_data(path, fold=0, allow=False):
        cfg.train.pseudo_path, cfg.train.teacher_allow_leak = str(path), allow
        return build_fold_data(cfg, frame, folds, fold, demo_tokenizer, (SOFT_LABELS,))

    unverified = save_pseudo_labels(fresh0, tmp_path / "unverified.parquet")
    with pytest.raises(
        DataError,
        match=r"^\S*unverified.parquet: the pseudo-labels' teacher \(not recorded\) "
        r"records no excluded folds, so nothing shows it never saw fold 0's labels; "
        r"label fold 0's rows with a teacher trained without it \(`pseudo-label "
        r"--teacher 0=FILE --folds FOLDS`, FILE from `predict` with fold 0's "
        r"artifact\) or set train.teacher_allow_leak=true to use them anyway$",
    ):
        fold_data(unverified)
    allowed = fold_data(unverified, allow=True).soft_targets["pseudo"]
    assert allowed["pseudo_added"] == 4 and allowed["fold_check"].startswith(
        "allowed by train.teacher_allow_leak"
    )

    per_fold = _save_for_folds({0: fresh0, 1: fresh1}, folds, tmp_path / "per_fold.parquet")
    data = fold_data(per_fold)
    assert [i for i in data.train_ids if i >= 10**9] == fresh0["id"].to_list()
    assert data.soft_targets["pseudo"]["fold_check"] == "excluded fold 0"
    assert [i for i in fold_data(per_fold, 1).train_ids if i >= 10**9] == fresh1["id"].to_list()
    with pytest.raises(
        DataError,
        match=r"per_fold.parquet: no pseudo-labels for fold 2 \(its rows are for folds "
        r"\[0, 1\], labelled by teachers that saw fold 2\); label fold 2's rows",
    ):
        fold_data(per_fold, 2, allow=True)

    moved = folds.with_columns(
        pl.when(pl.col("id") == folds.filter(pl.col("fold") == 1)["id"][0])
        .then(0)
        .otherwise(pl.col("fold"))
        .alias("fold")
    )
    other = _save_for_folds({0: fresh0}, folds, tmp_path / "other.parquet", record_folds=moved)
    with pytest.raises(
        DataError,
        match=r"other.parquet: fold 0's pseudo-labels' teacher teacher0.csv left out a "
        r"fold 0 of \d+ rows that is not this run's fold 0",
    ):
        fold_data(other)


def test_the_pseudo_label_command_labels_each_fold_with_its_own_teacher(
    sample_files, train_data, test_frame, tmp_path, capsys
):
    """`--teacher F=FILE` per fold (with --folds) writes each teacher's kept rows for its fold and records the
    teachers; a parquet teacher that records its excluded folds stands for them; a declared fold the teacher's
    record contradicts, a fold without --folds, two teachers for one fold are refused, nothing written."""
    from kaggle_utils.cli.main import main
    from kaggle_utils.core.metrics import read_parquet_record
    from kaggle_utils.data.folds import save_folds
    from kaggle_utils.data.submission import write_submission

    folds = make_folds(train_data.frame, FoldConfig(n_folds=3, seed=0))
    folds_path = tmp_path / "folds.parquet"
    save_folds(folds, folds_path)
    probs = _confident_probs(test_frame.height)
    t0, t1 = tmp_path / "t0.csv", tmp_path / "t1.csv"
    write_submission(test_frame["id"].to_list(), probs, t0)
    write_submission(test_frame["id"].to_list(), probs[::-1].copy(), t1)
    common = [
        "--unlabelled",
        str(sample_files.test_csv),
        "--train",
        str(sample_files.train_csv),
        "--threshold",
        "0.8",
    ]
    out = tmp_path / "pseudo.parquet"
    assert (
        main(
            [
                "pseudo-label",
                "--teacher",
                f"0={t0}",
                "--teacher",
                f"1={t1}",
                "--folds",
                str(folds_path),
                *common,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"teacher {t0}: " in printed and "for folds [0] (declared)" in printed
    pseudo = load_pseudo_labels(out)
    assert sorted(pseudo[FOR_FOLD].unique().to_list()) == [0, 1]
    record = read_parquet_record(out, PSEUDO_RECORD_KEY)
    assert [(t["path"], t["source"], list(t["folds"])) for t in record["teachers"]] == [
        (str(t0), "declared", ["0"]),
        (str(t1), "declared", ["1"]),
    ]
    assert record["teachers"][0]["folds"]["0"] == exclusion_record(folds, [0])["excluded_folds"]["0"]

    # A parquet teacher whose record says its run left folds 1 and 2 out stands for both.
    oof = make_oof("t", test_frame["id"], np.zeros(test_frame.height), probs, np.zeros(test_frame.height))
    recorded = save_oof(oof, tmp_path / "nested.parquet", record=exclusion_record(folds, [1, 2]))
    assert (
        main(["pseudo-label", "--teacher", str(recorded), *common, "--out", str(tmp_path / "p2.parquet")])
        == 0
    )
    assert "for folds [1, 2] (teacher file)" in capsys.readouterr().out
    assert sorted(load_pseudo_labels(tmp_path / "p2.parquet")[FOR_FOLD].unique().to_list()) == [1, 2]

    refusals = [
        (
            ["--teacher", f"0={recorded}", "--folds", str(folds_path)],
            r"nested.parquet: the teacher saw fold 0's labels \(its run excluded \[1, 2\]\); "
            r"give fold 0 a teacher trained without it",
        ),
        (["--teacher", f"0={t0}"], r"--teacher 0=\S*t0.csv names fold 0; give --folds"),
        (
            ["--teacher", f"0={t0}", "--teacher", f"0={t1}", "--folds", str(folds_path)],
            r"fold 0 has two teachers, \S*t0.csv and \S*t1.csv",
        ),
        (
            ["--teacher", f"0={t0}", "--teacher", str(t1), "--folds", str(folds_path)],
            r"\S*t1.csv names none \(give it as --teacher FOLD=FILE\)",
        ),
        (["--teacher", f"7={t0}", "--folds", str(folds_path)], r"folds \[7\] are not in \S*folds.parquet"),
    ]
    for args, message in refusals:
        capsys.readouterr()
        assert main(["pseudo-label", *args, *common, "--out", str(tmp_path / "refused.parquet")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "refused.parquet").exists()


def test_the_pseudo_label_command_refuses_an_output_that_is_contains_or_lies_inside_an_input(
    sample_files, test_frame, tmp_path, capsys
):
    from kaggle_utils.cli.main import main
    from kaggle_utils.data.submission import write_submission

    teachers = tmp_path / "teachers"
    teachers.mkdir()
    teacher = teachers / "teacher.csv"
    write_submission(test_frame["id"].to_list(), _confident_probs(test_frame.height), teacher)
    common = [
        "--teacher",
        str(teacher),
        "--unlabelled",
        str(sample_files.test_csv),
        "--train",
        str(sample_files.train_csv),
        "--threshold",
        "0.8",
    ]
    for out, message in [
        (teachers, f"it contains the teacher file {teacher}"),
        (f"{sample_files.train_csv}/pseudo.parquet", "it is inside the training file"),
        (teacher, "it is the teacher file"),
    ]:
        capsys.readouterr()
        assert main(["pseudo-label", *common, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"refusing to write {out}: {message}" in err, err
    assert sorted(p.name for p in teachers.iterdir()) == ["teacher.csv"]
