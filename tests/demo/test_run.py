"""The demo end to end on a small generated set: valid submission, reports, determinism, extensible steps."""

from __future__ import annotations

import json

import polars as pl

from kaggle_utils.core.metrics import load_oof, score_oof
from kaggle_utils.data.folds import check_folds, load_folds
from kaggle_utils.data.submission import validate_submission
from kaggle_utils.demo.run import BASELINE_STEPS, DEMO_STEPS, DemoStep, run_demo


def test_demo_writes_a_valid_submission_and_reports(tmp_path):
    submission = tmp_path / "submissions" / "submission.csv"
    lines: list[str] = []
    report = run_demo(
        tmp_path / "demo", submission_path=submission, n_train=400, n_test=40, seed=0, echo=lines.append
    )

    assert len(lines) == len(DEMO_STEPS) + 1  # one line per step, then where the report is
    assert all(line.startswith(f"[{i}/{len(DEMO_STEPS)}]") for i, line in enumerate(lines[:-1], start=1))
    validated = validate_submission(submission, report["sample"]["test_csv"])
    assert validated.rows == 40

    out = tmp_path / "demo"
    on_disk = json.loads((out / "demo_report.json").read_text())
    assert set(on_disk) >= {
        "sample",
        "load",
        "folds",
        "baseline",
        "submission",
        "orderings",
        "inference",
        "timings_s",
        "steps",
        "meta",
    }
    assert (
        on_disk["baseline"]["log_loss"]
        < on_disk["baseline"]["prior_log_loss"]
        < on_disk["baseline"]["uniform_log_loss"]
    )
    markdown = (out / "demo_report.md").read_text()
    assert "| class prior |" in markdown and "data report" in markdown

    # the artifacts the report points at are the real ones
    train = pl.read_csv(report["sample"]["train_csv"], columns=["id"])
    folds = load_folds(out / "folds.parquet")
    assert folds.height == report["load"]["train"]["rows_kept"] <= train.height
    check_folds(folds)
    assert score_oof(load_oof(out / "oof.parquet")).log_loss == on_disk["baseline"]["log_loss"]

    # both orderings ran on the demo's own folds file, and the shipped submission is the LLM's, not the
    # baseline's
    comparison = json.loads((out / "orderings" / "report.json").read_text())
    assert comparison["setup"]["folds_file_hash"] == on_disk["folds"]["sha256"]
    assert set(on_disk["orderings"]["variants"]) == {"ft-then-quant", "quant-then-ft"}
    assert (out / "orderings" / "report.png").stat().st_size > 0
    inference = on_disk["inference"]
    assert inference["validated_rows"] == 40
    assert sum(inference["rows_by_path"].values()) == 40
    assert inference["rows_by_path"].get("fallback", 0) == 0
    # it ships the candidate with the best CV of everything it trained (or the baseline, prior, blend ...), or
    # a
    # simpler candidate within noise of it (candidates.select)
    candidates = on_disk["orderings"]["candidates"]
    assert {"ft-then-quant", "quant-then-ft", "feature-baseline", "class-prior", "blend"} <= set(candidates)
    ship, complexity = comparison["ship"], {c["name"]: c["complexity"] for c in comparison["ship"]["ranking"]}
    assert (
        ship["lowest_cv"] == min(candidates, key=candidates.get) and ship["shipped"] == inference["shipped"]
    )
    assert (
        inference["shipped"] == ship["lowest_cv"]
        or complexity[inference["shipped"]] < complexity[ship["lowest_cv"]]
        and ship["lead_over_shipped"]["difference"] <= 2 * ship["lead_over_shipped"]["standard_error"]
    )
    assert (out / "orderings" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "## What ships" in (out / "orderings" / "report.md").read_text()


def test_demo_is_deterministic_by_seed_and_takes_extra_steps(tmp_path):
    seen = {}

    def record_baseline_score(state):
        seen["log_loss"] = state.baseline.log_loss
        state.report["extra"] = {"rows": state.baseline.oof.height}
        return "recorded"

    steps = [
        *BASELINE_STEPS[:4],
        DemoStep("extra", "a later stage", record_baseline_score),
        BASELINE_STEPS[4],
    ]
    first = run_demo(
        tmp_path / "a", tmp_path / "a.csv", n_train=300, n_test=20, seed=5, steps=steps, echo=lambda _: None
    )
    second = run_demo(
        tmp_path / "b",
        tmp_path / "b.csv",
        n_train=300,
        n_test=20,
        seed=5,
        steps=BASELINE_STEPS,
        echo=lambda _: None,
    )

    assert first["extra"]["rows"] == first["baseline"]["rows"]
    assert seen["log_loss"] == first["baseline"]["log_loss"] == second["baseline"]["log_loss"]
    assert first["folds"]["sha256"] == second["folds"]["sha256"]
    assert "[5/6] a later stage: recorded" in first["steps"][4]
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
