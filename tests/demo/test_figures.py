"""The README's demo figures are what `make demo` printed on the recording machine: the README block is the
exact rendering of the committed recording, and a fresh default demo on any machine lands within the stated
tolerance of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_utils.core.errors import UsageError
from kaggle_utils.demo import figures as demo_figures
from kaggle_utils.demo.run import run_demo

ROOT = Path(__file__).resolve().parents[2]


def _recorded() -> dict:
    return json.loads((ROOT / demo_figures.HEADLINE_PATH).read_text(encoding="utf-8"))


def test_readme_block_is_the_rendering_of_the_committed_figures():
    text = (ROOT / demo_figures.README_PATH).read_text(encoding="utf-8")
    assert demo_figures.readme_block(text) == demo_figures.render(_recorded())


def test_compare_figures_finds_a_moved_number_and_ignores_wall_time():
    recorded = _recorded()
    fresh = json.loads(json.dumps(recorded))
    fresh["total_seconds"] += 100.0
    fresh["recorded_on"] = {"cpu": "another CPU"}
    assert demo_figures.compare_figures(recorded, fresh) == []
    name = next(iter(fresh["orderings"]))
    fresh["orderings"][name]["cv_log_loss_quantized"] += 2 * demo_figures.FRESH_RUN_TOLERANCE
    fresh["shipped_rows_by_path"] = {**fresh["shipped_rows_by_path"], "fallback": 1}
    found = demo_figures.compare_figures(recorded, fresh)
    assert len(found) == 2 and any(f"orderings.{name}.cv_log_loss_quantized" in line for line in found)


def test_a_fresh_run_may_move_within_the_tolerance_and_a_within_noise_choice_may_flip():
    recorded = {
        "baseline_log_loss": 0.93,
        "winner": "a",
        "within_noise": False,
        "shipped": "blend",
        "ship_statement": "ship blend: 0.0005 lower; the lead is within noise",
        "candidates": {"blend": 0.8953},
    }
    fresh = {
        **recorded,
        "baseline_log_loss": 0.93 + 0.9 * demo_figures.FRESH_RUN_TOLERANCE,
        "shipped": "model",
        "ship_statement": "ship model",
        "candidates": {"blend": 0.8925},
    }
    assert demo_figures.compare_figures(recorded, fresh) == []
    assert demo_figures.compare_figures(recorded, {**fresh, "winner": "b"}) == [
        "winner: recorded 'a', fresh 'b'"
    ]
    assert demo_figures.compare_figures({**recorded, "within_noise": True}, {**fresh, "winner": "b"}) == []
    beyond = {**recorded, "ship_statement": "ship blend: 0.05 lower"}
    assert "shipped: recorded 'blend', fresh 'model'" in demo_figures.compare_figures(beyond, fresh)
    assert demo_figures.compare_figures(recorded, {**fresh, "candidates": {"other": 0.8953}}) == [
        "candidates.blend: only in recorded",
        "candidates.other: only in fresh",
    ]
    assert demo_figures.compare_figures(recorded, {**fresh, "baseline_log_loss": float("nan")}) == [
        "baseline_log_loss: recorded 0.930000, fresh nan"
    ]


def test_the_recording_names_its_machine_and_versions():
    machine = demo_figures.machine_record()
    assert machine["cpu"] and machine["cores"] and machine["python"]
    assert machine["packages"]["torch"] and machine["packages"]["transformers"]
    assert "recorded_on" in _recorded(), "headline.json must say which machine and versions made it"


def test_record_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{demo_figures.BEGIN}\nstale 0.9999\n{demo_figures.END}\nafter\n")
    report = {
        "sample": {"n_train": 2000, "n_test": 200, "seed": 0},
        "baseline": {"log_loss": 0.91, "prior_log_loss": 1.09},
        "orderings": {
            "variants": {
                "ft-then-quant": {
                    "cv_log_loss_16bit": 0.95,
                    "cv_log_loss_quantized": 0.951,
                    "qid_vs_common": 0.001,
                    "gap_vs_own_reference": 0.001,
                }
            },
            "decision": {
                "winner": "ft-then-quant",
                "difference": None,
                "standard_error": None,
                "within_noise": None,
            },
            "ship": {"shipped": "ft-then-quant", "statement": "ship ft-then-quant (model)", "artifact": "a"},
            "candidates": {"ft-then-quant": 0.951, "class-prior": 1.09},
        },
        "inference": {"shipped": "ft-then-quant", "rows_by_path": {"tta": 200}},
        "timings_s": {"a": 1.0, "b": 2.5},
    }
    figures = demo_figures.record(report, tmp_path)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("\nafter\n")
    assert "stale" not in text and demo_figures.readme_block(text) == demo_figures.render(figures)
    assert "ranks every candidate" in text and "class-prior 1.0900" in text
    assert json.loads((tmp_path / demo_figures.HEADLINE_PATH).read_text()) == figures
    with pytest.raises(UsageError, match="lacks"):
        demo_figures.headline({"sample": report["sample"], "baseline": report["baseline"]})


@pytest.mark.slow
def test_a_fresh_default_demo_reproduces_the_committed_figures(tmp_path):
    """The whole default demo (what `make demo` runs); minutes on 2 cores, run by CI."""
    report = run_demo(tmp_path / "demo", submission_path=tmp_path / "submission.csv", echo=lambda _: None)
    differences = demo_figures.compare_figures(_recorded(), demo_figures.headline(report))
    assert not differences, (
        f"a fresh default demo left the committed figures by more than {demo_figures.FRESH_RUN_TOLERANCE} "
        "(or changed a name or count): if the code changed them, rerun `python -m kaggle_utils demo --out "
        "runs/demo --record`: " + "; ".join(differences)
    )
