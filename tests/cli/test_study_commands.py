"""`python -m kaggle_utils qid-study`: a short real run writes the report, the plot and the command."""

from __future__ import annotations

import json

import pytest

from kaggle_utils.cli.main import main


def test_qid_study_command_runs_end_to_end(tmp_path, capsys):
    import torch

    torch.set_num_threads(2)
    config = tmp_path / "study.yaml"
    config.write_text(
        "folds: {n_folds: 4, seed: 0}\n"
        "format: {max_length: 128}\n"
        "model: {gradient_checkpointing: false}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "train: {learning_rate: 0.001, max_steps: 4, per_device_batch_size: 8, grad_accum: 1,"
        " eval_every_steps: 100, save_every_steps: 100}\n",
        encoding="utf-8",
    )
    out = tmp_path / "study"
    code = main(
        [
            "qid-study",
            "--config",
            str(config),
            "--sample-rows",
            "60",
            "--out",
            str(out),
            "--checkpoints",
            "3",
            "--seeds",
            "1",
            "--bootstrap",
            "50",
            "--schemes",
            "nf4",
        ]
    )
    assert code == 0
    report = json.loads((out / "qid_study.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [1, 2, 4]
    assert all(c["tokens"] > 0 for c in report["checkpoints"])
    tokens = [c["tokens"] for c in report["checkpoints"]]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3
    for c in report["checkpoints"]:
        assert c["qid"]["nf4"] == pytest.approx(c["log_loss"]["nf4"] - c["log_loss_16bit"], abs=1e-12)
    assert "nf4" in report["fits"] and "nf4" in report["trends"]
    assert (out / "qid_study.png").stat().st_size > 0 and "Answer" in (out / "qid_study.md").read_text()
    command = (out / "COMMAND.txt").read_text()
    assert command.startswith("python -m kaggle_utils qid-study") and "--sample-rows 60" in command
    assert "4-bit (NF4)" in capsys.readouterr().out


def test_qid_study_rejects_unknown_config_sections(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("qid: {checkpoints: 3}\n", encoding="utf-8")
    assert (
        main(["qid-study", "--config", str(config), "--sample-rows", "60", "--out", str(tmp_path / "x")]) == 2
    )
