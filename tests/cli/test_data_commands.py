"""The data commands through the real `cli.main`: exit 0 on success, exit 2 with one `error:` line
otherwise."""

from __future__ import annotations

import json

import polars as pl
import pytest

from kaggle_utils.cli import main as cli
from kaggle_utils.data.folds import load_folds
from kaggle_utils.data.submission import validate_submission


@pytest.fixture
def main(monkeypatch):
    """cli.main with only this command group, so the test does not depend on the other groups' modules."""
    monkeypatch.setattr(cli, "COMMAND_GROUPS", ("data",))
    return cli.main


def assert_one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_validate_data_prints_the_report(main, sample_files, capsys):
    assert main(["validate-data", str(sample_files.train_csv)]) == 0
    out = capsys.readouterr().out
    assert "data report" in out and "rows read" in out
    assert main(["validate-data", str(sample_files.test_csv), "--split", "test"]) == 0


def test_validate_data_exit_2_for_missing_file_and_missing_columns(main, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert main(["validate-data", str(missing)]) == 2
    assert_one_line_error(capsys, "nope.csv")
    broken = tmp_path / "broken.csv"
    pl.DataFrame({"id": [1], "prompt": ['["x"]']}).write_csv(broken)
    assert main(["validate-data", str(broken), "--split", "train"]) == 2
    assert_one_line_error(capsys, "broken.csv", "response_a")


def test_validate_data_exit_2_for_a_header_only_train_file(main, tmp_path, capsys):
    header_only = tmp_path / "train.csv"
    header_only.write_text(
        "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n"
    )
    assert main(["validate-data", str(header_only)]) == 2
    assert_one_line_error(capsys, "train.csv", "no data rows")
    assert main(["validate-data", str(header_only), "--split", "train"]) == 2
    assert_one_line_error(capsys, "train.csv", "no data rows")


def test_validate_data_says_a_directory_is_a_directory(main, tmp_path, capsys):
    assert main(["validate-data", str(tmp_path)]) == 2
    err = assert_one_line_error(capsys, str(tmp_path), "is a directory")
    assert "not found" not in err


def test_validate_data_exit_2_for_an_empty_string_id(main, tmp_path, capsys):
    path = tmp_path / "test.csv"
    path.write_text('id,prompt,response_a,response_b\n1,["p"],["a"],["b"]\n"",["p"],["a"],["b"]\n')
    assert main(["validate-data", str(path)]) == 2
    assert_one_line_error(capsys, "test.csv", "'id'", "empty string", "data rows [2]")


def test_folds_command_writes_checked_folds(main, sample_files, train_data, tmp_path, capsys):
    out = tmp_path / "folds.parquet"
    assert main(["folds", "--train", str(sample_files.train_csv), "--out", str(out), "--n-folds", "4"]) == 0
    printed = capsys.readouterr().out
    assert "share_tie" in printed and "sha256" in printed
    folds = load_folds(out)
    assert sorted(folds["fold"].unique().to_list()) == [0, 1, 2, 3]
    assert folds.height == train_data.frame.height


def test_validate_submission_exit_codes(main, sample_files, tmp_path, capsys):
    good = tmp_path / "good.csv"
    test_ids = pl.read_csv(sample_files.test_csv, columns=["id"])["id"]
    pl.DataFrame({"id": test_ids, "winner_model_a": 0.4, "winner_model_b": 0.4, "winner_tie": 0.2}).write_csv(
        good
    )
    assert main(["validate-submission", str(good), "--test", str(sample_files.test_csv)]) == 0
    assert "ok:" in capsys.readouterr().out

    bad = tmp_path / "bad.csv"
    pl.read_csv(good).head(len(test_ids) - 1).write_csv(bad)
    assert main(["validate-submission", str(bad), "--test", str(sample_files.test_csv)]) == 2
    assert_one_line_error(capsys, "bad.csv", "test ids missing", str(test_ids[-1]))


def test_validate_submission_test_file_without_id_is_one_clean_line(main, sample_files, tmp_path, capsys):
    good = tmp_path / "good.csv"
    test_ids = pl.read_csv(sample_files.test_csv, columns=["id"])["id"]
    pl.DataFrame({"id": test_ids, "winner_model_a": 0.4, "winner_model_b": 0.4, "winner_tie": 0.2}).write_csv(
        good
    )
    no_id = tmp_path / "test_no_id.csv"
    pl.DataFrame({"row": [1], "prompt": ['["p"]']}).write_csv(no_id)
    assert main(["validate-submission", str(good), "--test", str(no_id)]) == 2
    err = assert_one_line_error(capsys, "test_no_id.csv", "'id'")
    assert "plan" not in err.lower() and "---> FAILED" not in err


def test_baseline_command_scores_and_writes_a_valid_submission(main, sample_files, tmp_path, capsys):
    folds = tmp_path / "folds.parquet"
    assert main(["folds", "--train", str(sample_files.train_csv), "--out", str(folds)]) == 0
    submission, oof, model = tmp_path / "sub.csv", tmp_path / "oof.parquet", tmp_path / "model.json"
    argv = [
        "baseline",
        "--train",
        str(sample_files.train_csv),
        "--folds",
        str(folds),
        "--test",
        str(sample_files.test_csv),
        "--out",
        str(submission),
        "--oof",
        str(oof),
        "--save-model",
        str(model),
    ]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OOF log loss" in out and "class prior" in out and "(validated)" in out
    validate_submission(submission, sample_files.test_csv)
    assert oof.exists() and model.exists()


def test_a_nested_fold_baseline_teacher_never_sees_the_excluded_fold(main, sample_files, tmp_path, capsys):
    """`baseline --exclude-folds 0`: its OOF covers the other folds only, and refitting without fold 0's rows
    at
    all gives the same OOF (so no model of it saw them)."""
    import polars as pl

    from kaggle_utils.core.metrics import load_oof
    from kaggle_utils.data.folds import load_folds
    from kaggle_utils.data.load import load_competition
    from kaggle_utils.train.baseline import run_baseline_cv

    folds = tmp_path / "folds.parquet"
    assert main(["folds", "--train", str(sample_files.train_csv), "--out", str(folds)]) == 0
    oof = tmp_path / "oof.parquet"
    capsys.readouterr()
    assert (
        main(
            [
                "baseline",
                "--train",
                str(sample_files.train_csv),
                "--folds",
                str(folds),
                "--exclude-folds",
                "0",
                "--oof",
                str(oof),
            ]
        )
        == 0
    )
    fold_table = load_folds(folds)
    fold0 = fold_table.filter(pl.col("fold") == 0)["id"]
    assert f"{len(fold0)} rows left out" in capsys.readouterr().out
    written = load_oof(oof).sort("id")
    assert not set(written["id"].to_list()) & set(fold0.to_list()) and set(written["fold"].to_list()) == {
        1,
        2,
        3,
        4,
    }
    frame = load_competition(sample_files.train_csv, split="train").frame
    without = run_baseline_cv(
        frame.filter(~pl.col("id").is_in(fold0.implode())), fold_table.filter(pl.col("fold") != 0)
    ).oof.sort("id")
    assert written["id"].to_list() == without["id"].to_list()
    for column in ("p_a", "p_b", "p_tie"):
        assert (written[column] - without[column]).abs().max() < 1e-12
    assert (
        main(
            [
                "baseline",
                "--train",
                str(sample_files.train_csv),
                "--folds",
                str(folds),
                "--exclude-folds",
                "9",
            ]
        )
        == 2
    )
    assert "excluded folds [9] are not in it" in capsys.readouterr().err


def test_baseline_command_needs_test_and_out_together(main, sample_files, tmp_path, capsys):
    argv = ["baseline", "--train", str(sample_files.train_csv), "--test", str(sample_files.test_csv)]
    assert main(argv) == 2
    assert_one_line_error(capsys, "--test and --out")


def test_demo_command_runs_small(main, tmp_path, capsys):
    submission = tmp_path / "submissions" / "submission.csv"
    argv = [
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--submission",
        str(submission),
        "--n-train",
        "300",
        "--n-test",
        "30",
        "--seed",
        "3",
        "--baseline-only",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[5/5]" in out and "orderings" not in out
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert report["submission"]["rows"] == 30 and report["sample"]["seed"] == 3


def test_folds_and_baseline_read_the_config_and_flags_win(tmp_path, capsys):
    """`folds` and `baseline` take --config/--set like the training commands; a flag given beats the
    config."""
    import polars as pl

    from kaggle_utils.cli.main import main
    from kaggle_utils.data.sample import generate_competition_files

    files = generate_competition_files(tmp_path / "data", n_train=120, n_test=5, seed=0)
    config = tmp_path / "c.yaml"
    config.write_text("folds:\n  n_folds: 3\n  seed: 7\nbaseline:\n  model: logreg\n", encoding="utf-8")
    out = tmp_path / "folds.parquet"
    assert main(["folds", "--train", str(files.train_csv), "--out", str(out), "--config", str(config)]) == 0
    assert pl.read_parquet(out)["fold"].n_unique() == 3
    assert (
        main(
            [
                "folds",
                "--train",
                str(files.train_csv),
                "--out",
                str(out),
                "--config",
                str(config),
                "--n-folds",
                "4",
            ]
        )
        == 0
    )
    assert pl.read_parquet(out)["fold"].n_unique() == 4
    assert (
        main(["folds", "--train", str(files.train_csv), "--out", str(out), "--set", "folds.n_folds=2"]) == 0
    )
    assert pl.read_parquet(out)["fold"].n_unique() == 2
    assert main(["baseline", "--train", str(files.train_csv), "--config", str(config)]) == 0
    assert (
        "fold 2:" in capsys.readouterr().out
        and main(["baseline", "--train", str(files.train_csv), "--set", "folds.n_folds=1"]) == 2
    )
