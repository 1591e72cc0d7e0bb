"""`demo --real`: the demo's steps with the real Gemma 3 270M (fetch-model's output, Q4_K_M-rounded weights)
as
the base, through the real CLI. A few rows and one step: the numbers say nothing about the model's quality;
what
is checked is that both orderings train and ship the real model with its own tokenizer, that predict reloads
the
winner's artifact, and that the submission it writes validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_utils.cli import main as cli
from kaggle_utils.data.submission import validate_submission
from kaggle_utils.quant.artifacts import MANIFEST_NAME, load_artifact


@pytest.fixture
def main(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_GROUPS", ("data",))
    return cli.main


def test_demo_real_without_the_model_names_fetch_model(main, tmp_path, capsys):
    missing = tmp_path / "models" / "gemma-3-270m"
    assert main(["demo", "--real", "--out", str(tmp_path / "demo"), "--model-dir", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"fetch-model gemma-3-270m --out {missing}" in err
    assert not (tmp_path / "demo").exists()  # refused before any step ran


def test_demo_real_refuses_the_tiny_demos_options(main, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3"]) == 2
    assert "--max-steps only apply with --real" in capsys.readouterr().err
    assert main(["demo", "--real", "--record", "--out", str(tmp_path / "demo")]) == 2
    assert "--record" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_demo_real_trains_both_orderings_on_the_270m_and_submits(main, gemma3_270m_dir, tmp_path, capsys):
    out, submission = tmp_path / "demo", tmp_path / "submission.csv"
    argv = [
        "demo",
        "--real",
        "--model-dir",
        str(gemma3_270m_dir),
        "--out",
        str(out),
        "--submission",
        str(submission),
        "--n-train",
        "40",
        "--n-test",
        "4",
        "--max-steps",
        "1",
        "--max-length",
        "96",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[7/7]" in printed and "WARNING" not in printed

    report = json.loads((out / "demo_report.json").read_text())
    test_csv = report["sample"]["test_csv"]
    assert validate_submission(submission, test_csv).rows == 4
    assert report["orderings"]["base_model"] == str(gemma3_270m_dir)
    assert "Q4_K_M rounding" in report["orderings"]["base_model_note"]
    assert "Q4_K_M rounding" in (out / "demo_report.md").read_text()

    comparison = json.loads((out / "orderings" / "report.json").read_text())
    artifacts = {run["variant"]: run["per_fold"][0]["artifact_dir"] for run in comparison["runs"]}
    assert set(artifacts) == {"ft-then-quant", "quant-then-ft"}
    for variant, artifact_dir in artifacts.items():
        manifest = json.loads((Path(artifact_dir) / MANIFEST_NAME).read_text())
        assert manifest["variant"] == variant and manifest["base_model"] == str(gemma3_270m_dir)
        assert manifest["format_config"]["template"] == "auto" and manifest["max_length"] == 96
        model_config = json.loads((Path(artifact_dir) / "model" / "config.json").read_text())
        assert model_config["model_type"] == "gemma3_text" and model_config["vocab_size"] == 262_144
    assert not (out / "orderings" / "tokenizer").exists()  # the checkpoint's own tokenizer, no demo BPE

    # predict served what the ship decision chose (the best CV of every candidate, or a simpler one within
    # noise
    # of it), no row from the fallback
    inference = report["inference"]
    candidates = report["orderings"]["candidates"]
    ship, complexity = comparison["ship"], {c["name"]: c["complexity"] for c in comparison["ship"]["ranking"]}
    assert (
        ship["lowest_cv"] == min(candidates, key=candidates.get) and ship["shipped"] == inference["shipped"]
    )
    assert (
        inference["shipped"] == ship["lowest_cv"]
        or complexity[inference["shipped"]] < complexity[ship["lowest_cv"]]
        and ship["lead_over_shipped"]["difference"] <= 2 * ship["lead_over_shipped"]["standard_error"]
    )
    assert inference["fallback_rows"] == 0 and sum(inference["rows_by_path"].values()) == 4
    predict_report = json.loads(submission.with_name("submission.inference.json").read_text())
    assert predict_report["artifact_dir"] == inference["artifact_dir"]
    shipped = json.loads((Path(inference["artifact_dir"]) / MANIFEST_NAME).read_text())
    models = (
        [inference["artifact_dir"]]
        if shipped.get("kind") != "ensemble"
        else [m["path"] for m in shipped["members"] if m["kind"] == "model"]
    )
    assert {str(Path(p).resolve()) for p in models} <= {str(Path(p).resolve()) for p in artifacts.values()}
    for model_dir in models[:1]:
        loaded = load_artifact(model_dir, device="cpu")  # checks its tokenizer against the model
        assert len(loaded.tokenizer) == 262_144
