"""The demo's console lines: each step's brief, built from the recorded figures, fits in 110 characters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kaggle_utils.demo import figures as demo_figures
from kaggle_utils.demo.report import MAX_STEP_LINE, brief, step_line
from kaggle_utils.demo.run import DEMO_STEPS, REAL_DEMO_STEPS

ROOT = Path(__file__).resolve().parents[2]


def recorded_report(*, wsdm: bool = False, fallback_rows: int = 0) -> dict[str, Any]:
    """A demo report's step sections holding the figures of reports/demo/headline.json (the README's run)."""
    figures = json.loads((ROOT / demo_figures.HEADLINE_PATH).read_text(encoding="utf-8"))
    repairs = {"kind": {"count": 29}, "other": {"count": 1000}}
    split = {"rows_kept": 1999, "rows_read": 2000, "repairs": repairs}
    baseline = {
        "log_loss": figures["baseline_log_loss"],
        "prior_log_loss": figures["prior_log_loss"],
        "uniform_log_loss": 1.0986122886681098,
    }
    if wsdm:
        baseline["competition_metric"] = {"name": "accuracy", "scores": {"accuracy": 0.5432}}
    return {
        "sample": {"n_train": figures["n_train"], "n_test": figures["n_test"], "dialect": "lmsys"},
        "load": {"train": split, "test": split},
        "folds": {"n_folds": 5, "groups": 1807, "per_fold": [{"rows": 4000}] * 5},
        "baseline": baseline,
        "submission": {"rows": 20000},
        "orderings": {
            "variants": figures["orderings"],
            "decision": {
                "winner": figures["winner"],
                "difference": figures["difference"],
                "standard_error": figures["standard_error"],
                "within_noise": figures["within_noise"],
            },
        },
        "inference": {
            "shipped": figures["shipped"],
            "validated_rows": 20000,
            "rows_by_path": {
                "tta": 19000,
                "original_only": 400,
                "swapped_only": 300,
                "fallback": fallback_rows,
            },
            "fallback_rows": fallback_rows,
        },
    }


def test_every_step_line_fits_in_110_characters():
    for steps in (DEMO_STEPS, REAL_DEMO_STEPS):
        for report in (recorded_report(), recorded_report(wsdm=True, fallback_rows=300)):
            for number, step in enumerate(steps, start=1):
                text = brief(step.key, report)
                assert text is not None, step.key
                line = step_line(number, len(steps), step.key, text, 9999.9)
                assert len(line) <= MAX_STEP_LINE, (len(line), line)


def test_the_brief_carries_the_key_figures_and_is_none_for_an_unknown_step():
    report = recorded_report()
    assert f"{report['baseline']['log_loss']:.4f}" in brief("baseline", report)
    orderings = brief("orderings", report)
    for name, values in report["orderings"]["variants"].items():
        assert f"{name} {values['cv_log_loss_quantized']:.4f}" in orderings
    assert "wins" in orderings or "within noise" in orderings
    assert report["inference"]["shipped"] in brief("inference", report)
    assert brief("extra", {**report, "extra": {}}) is None
    assert step_line(5, 6, "a later stage", "recorded", 0.04) == "[5/6] a later stage: recorded (0.0s)"
