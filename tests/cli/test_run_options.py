"""The options train / compare-orderings / qid-study share, and how they become (cfg, out_dir, train file)."""

from __future__ import annotations

import argparse

import polars as pl
import pytest
import torch

from kaggle_utils.cli.run_options import add_run_options, config_from_args, load_config, prepare_run
from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import UsageError


def _parse(argv: list[str], data_required: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--out", required=True)
    add_run_options(parser, data_required=data_required)
    return parser.parse_args(argv)


def test_train_and_sample_rows_exclude_each_other_and_may_be_required(tmp_path):
    args = _parse(["--out", str(tmp_path), "--train", "t.csv", "--folds", "f.parquet", "--threads", "3"])
    assert (args.train, args.sample_rows, args.folds, args.threads, args.config) == (
        "t.csv",
        None,
        "f.parquet",
        3,
        None,
    )
    assert _parse(["--out", str(tmp_path)]).train is None
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parse(["--out", str(tmp_path), "--train", "t.csv", "--sample-rows", "60"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parse(["--out", str(tmp_path)], data_required=True)


def test_config_file_errors_are_usage_errors(tmp_path):
    assert load_config(None) == PipelineConfig()
    with pytest.raises(UsageError, match="missing.yaml does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {max_steps: 2}\n")
    with pytest.raises(UsageError, match=r"bad.yaml: unknown config sections: \['trian'\]"):
        load_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("train: {max_steps: 2}\n")
    assert load_config(str(good)).train.max_steps == 2


def test_prepare_run_resolves_the_training_file_and_creates_the_output(tmp_path):
    out = tmp_path / "out"
    cfg, out_dir, train = prepare_run(_parse(["--out", str(out), "--train", "mine.csv"]))
    assert (cfg, out_dir, train) == (PipelineConfig(), out, "mine.csv") and out.is_dir()
    config = tmp_path / "cfg.yaml"
    config.write_text("data: {train_path: from_config.csv}\n")
    assert prepare_run(_parse(["--out", str(out), "--config", str(config)]))[2] == "from_config.csv"
    with pytest.raises(UsageError, match="no training data"):
        prepare_run(_parse(["--out", str(out)]))


def test_prepare_run_generates_sample_rows_and_refuses_too_few(tmp_path):
    with pytest.raises(UsageError, match="--sample-rows 49 is too few"):
        prepare_run(_parse(["--out", str(tmp_path), "--sample-rows", "49"]))
    _, _, train = prepare_run(_parse(["--out", str(tmp_path), "--sample-rows", "50"]))
    assert train == str(tmp_path / "data" / "train.csv")
    assert pl.read_csv(train).height == 50


def test_prepare_run_sets_torch_threads_only_when_asked(tmp_path):
    previous = torch.get_num_threads()
    try:
        prepare_run(_parse(["--out", str(tmp_path), "--train", "t.csv"]))
        assert torch.get_num_threads() == previous
        wanted = 1 if previous != 1 else 2
        prepare_run(_parse(["--out", str(tmp_path), "--train", "t.csv", "--threads", str(wanted)]))
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(previous)


def test_set_overrides_apply_on_top_of_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  learning_rate: 0.001\n  epochs: 2.0\nlora:\n  r: 8\n", encoding="utf-8")
    args = _parse(
        [
            "--out",
            str(tmp_path),
            "--train",
            "t.csv",
            "--config",
            str(config),
            "--set",
            "train.learning_rate=2e-4",
            "--set",
            "lora.target_modules=[q_proj, v_proj]",
            "--set",
            "train.max_steps=null",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.train.learning_rate == 2e-4 and cfg.train.epochs == 2.0 and cfg.lora.r == 8
    assert cfg.lora.target_modules == ("q_proj", "v_proj") and cfg.train.max_steps is None


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.learning_rate", "expected SECTION.FIELD=VALUE"),
        ("learning_rate=1", "expected SECTION.FIELD=VALUE"),
        ("train.no_such_field=1", "unknown keys in config section 'train'"),
        ("training.epochs=1", "unknown config sections"),
        ("train.ordering=sideways", "train.ordering must be one of"),
        ("train.epochs=[1", "not valid YAML"),
    ],
)
def test_bad_set_overrides_are_one_line_usage_errors(item, message):
    args = _parse(["--out", "o", "--train", "t.csv", "--set", item])
    with pytest.raises(UsageError, match=message):
        config_from_args(args)


def test_every_command_that_takes_a_config_takes_set_overrides():
    from kaggle_utils.cli.main import build_parser

    parser = build_parser()
    for argv in (
        ["compare-orderings"],
        ["train", "--ordering", "ft-then-quant"],
        ["qid-study", "--out", "x", "--sample-rows", "60"],
        ["predict", "--artifact", "a", "--test", "t", "--out", "o"],
        ["kaggle", "status"],
    ):
        args = parser.parse_args([*argv, "--set", "train.epochs=3"])
        assert args.set_values == ["train.epochs=3"], argv
