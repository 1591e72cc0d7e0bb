"""The experiment layer: the typed report reads and writes report.json unchanged, the shared setup reuses a
folds file and refuses folds it lacks, and `train` runs its fold directly (not through compare_orderings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_utils.cli.main import main
from kaggle_utils.core.errors import UsageError
from kaggle_utils.data.folds import make_folds, save_folds
from kaggle_utils.evaluate.comparison_report import ComparisonReport
from kaggle_utils.evaluate.report_render import render_markdown
from kaggle_utils.studies import experiment
from kaggle_utils.studies import orderings as compare

REPORTS = Path(__file__).resolve().parents[2] / "reports"


@pytest.mark.parametrize("name", ["real_weights", "compare_qaware"])
def test_committed_reports_round_trip_through_the_typed_report(name):
    raw = json.loads((REPORTS / name / "report.json").read_text())
    report = ComparisonReport.from_dict(raw)
    assert report.to_dict() == raw  # nothing lost, nothing added
    first = raw["runs"][0]
    run = report.run(first["variant"], first["seed"])
    assert run.folds[0].artifact_dir == first["per_fold"][0]["artifact_dir"]
    assert run.cv_log_loss_quantized == first["cv_log_loss_quantized"]
    assert report.winner == raw["decision"]["winner"]
    assert render_markdown(report) == render_markdown(raw)
    with pytest.raises(UsageError, match="no run of variant 'nope'"):
        report.run("nope")


def test_prepare_experiment_reuses_a_folds_file_and_refuses_missing_folds(sample_files, train_data, tmp_path):
    cfg = experiment.demo_config()
    folds_path = tmp_path / "given_folds.parquet"
    save_folds(make_folds(train_data.frame, cfg.folds), folds_path)
    setup = experiment.prepare_experiment(
        cfg, sample_files.train_csv, tmp_path / "out", folds_path, fold_ids=[1]
    )
    assert setup.folds_path == folds_path and setup.fold_ids == [1]
    assert not (tmp_path / "out" / "folds.parquet").exists()  # the given file is used, not a new one
    assert (setup.base_dir / "config.json").is_file() and len(setup.tokenizer) > 0
    with pytest.raises(UsageError, match=r"folds \[9\] are not in"):
        experiment.prepare_experiment(
            cfg, sample_files.train_csv, tmp_path / "out2", folds_path, fold_ids=[9]
        )


def test_excluded_folds_are_neither_trained_on_nor_scored(sample_files, train_data, tmp_path):
    """A nested-fold teacher's experiment: fold 0's rows are gone from the frame and the folds, so no model of
    it sees a row a student held out on fold 0 is scored on."""
    cfg = experiment.demo_config().with_overrides({"train": {"exclude_folds": [0], "cv_folds": None}})
    folds_path = tmp_path / "given_folds.parquet"
    fold_table = make_folds(train_data.frame, cfg.folds)
    save_folds(fold_table, folds_path)
    setup = experiment.prepare_experiment(cfg, sample_files.train_csv, tmp_path / "out", folds_path)
    fold0_ids = set(fold_table.filter(fold_table["fold"] == 0)["id"].to_list())
    assert fold0_ids and not fold0_ids & set(setup.frame["id"].to_list())
    assert setup.frame.height == train_data.frame.height - len(fold0_ids)
    assert setup.fold_ids == sorted(set(fold_table["fold"].to_list()) - {0})
    assert set(setup.folds["id"].to_list()) == set(setup.frame["id"].to_list())
    with pytest.raises(UsageError, match=r"folds \[0\] are not in .*\[0\] excluded"):
        experiment.prepare_experiment(
            cfg, sample_files.train_csv, tmp_path / "out2", folds_path, fold_ids=[0]
        )
    every_fold_but_one = cfg.with_overrides(
        {"train": {"exclude_folds": sorted(set(fold_table["fold"]) - {1})}}
    )
    with pytest.raises(UsageError, match="needs two folds or more"):
        experiment.prepare_experiment(
            every_fold_but_one, sample_files.train_csv, tmp_path / "out3", folds_path
        )
    with pytest.raises(UsageError, match=r"excluded folds \[7\] are not in"):
        experiment.prepare_experiment(
            cfg.with_overrides({"train": {"exclude_folds": [7]}}),
            sample_files.train_csv,
            tmp_path / "out4",
            folds_path,
        )


def test_train_runs_its_fold_without_compare_orderings(sample_files, tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("train went through compare_orderings")

    monkeypatch.setattr(compare, "compare_orderings", forbidden)
    cfg = experiment.demo_config()
    cfg.train.max_steps, cfg.train.eval_every_steps, cfg.lora.r = 2, 2, 4
    config_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(config_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--ordering",
                "ft-then-quant",
                "--config",
                str(config_path),
                "--train",
                str(sample_files.train_csv),
                "--out",
                str(out),
                "--fold",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ft-then-quant, fold 2: held-out log loss 16-bit" in printed
    assert (out / "oof.parquet").is_file()
    assert Path(printed.split("artifact:")[1].strip(), "manifest.json").is_file()


def test_the_joined_cv_report_ranks_every_candidate_and_ships(sample_files, tmp_path):
    """The CV-report kernel's join (two training kernels, one ordering each) makes the ship decision too."""
    from kaggle_utils.studies.combine import combine_reports

    cfg = experiment.demo_config()
    cfg.train.max_steps, cfg.train.eval_every_steps, cfg.lora.r = 2, 2, 4
    first = compare.compare_orderings(
        cfg, sample_files.train_csv, tmp_path / "a", variants=["ft-then-quant"], progress=False
    )
    compare.compare_orderings(
        cfg,
        sample_files.train_csv,
        tmp_path / "b",
        folds_path=first.setup["folds_file"],
        variants=["quant-then-ft"],
        progress=False,
    )
    joined = combine_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "joined")
    names = {c["name"] for c in joined.ship["ranking"]}
    assert {"ft-then-quant", "quant-then-ft", "class-prior", "blend"} <= names
    best = min(joined.ship["ranking"], key=lambda c: c["cv_log_loss"])  # ships, or a simpler one within noise
    chosen = next(c for c in joined.ship["ranking"] if c["name"] == joined.ship["shipped"])
    lead = joined.ship["lead_over_shipped"]
    assert joined.ship["lowest_cv"] == best["name"] and (
        chosen is best
        or chosen["complexity"] < best["complexity"]
        and lead["difference"] <= 2 * lead["standard_error"]
    )
    shipped = Path(joined.shipped_artifact)
    assert (shipped / "manifest.json").is_file()
    assert "## What ships" in (tmp_path / "joined" / "report.md").read_text()
    assert json.loads((tmp_path / "joined" / "report.json").read_text())["ship"]["shipped"] == chosen["name"]
