"""The training and CV-report notebooks: paired with their scripts, pushable, and executed end to end on CPU.

The notebooks run under papermill (nbclient) with the .venv's kernel, a tiny Gemma-2 and the generated sample
data; the parameters cell is overridden exactly as a user would override it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

from kaggle_utils.core.config import KaggleConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.kaggle.workflow import build_kernel_folder, check_kernel_folder

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
MINE = ("train", "cv_report")
ORDERINGS = ("ft-then-quant", "quant-then-ft")  # one notebook, pushed as one kernel per ORDERING
TINY = {
    "train": {
        "max_steps": 2,
        "per_device_batch_size": 8,
        "grad_accum": 1,
        "eval_every_steps": 1,
        "save_every_steps": 1000,
    },
    "format": {"max_length": 128},
    "lora": {"r": 4, "alpha": 8},
    "folds": {"n_folds": 4},
    "model": {"gradient_checkpointing": False},
}


def _cells(notebook) -> list[tuple[str, str, list]]:
    return [(c.cell_type, c.source.strip(), list(c.metadata.get("tags", []))) for c in notebook.cells]


@pytest.mark.parametrize("name", [*MINE, "submission"])
def test_script_and_notebook_are_in_sync(name):
    """Reviews read the py:percent script; the .ipynb pushed to Kaggle must hold the same cells."""
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert _cells(script) == _cells(notebook)
    assert sum("parameters" in tags for _, _, tags in _cells(notebook)) == 1


@pytest.mark.parametrize("name", [*MINE, "submission"])
@pytest.mark.parametrize("suffix", [".py", ".ipynb"])
def test_every_notebook_carries_the_one_install_cell(name, suffix):
    """The offline-install code is written once (kaggle_tools/install_cell.py); each copy is that text."""
    from kaggle_utils.kaggle.install_cell import install_cell_problem

    assert install_cell_problem(NOTEBOOKS / f"{name}{suffix}") is None


@pytest.mark.parametrize(
    ("name", "ordering"), [("train", "ft-then-quant"), ("train", "quant-then-ft"), ("cv_report", None)]
)
def test_kernel_folder_builds_and_passes_the_check(name, ordering, tmp_path):
    source = "google/gemma-2/transformers/gemma-2-9b-it/2"
    cfg = KaggleConfig(build_dir=str(tmp_path), base_model_source=source)
    parameters = {"ORDERING": ordering} if ordering else None
    folder = build_kernel_folder(NOTEBOOKS / f"{name}.ipynb", cfg, owner="alice", parameters=parameters)
    check = check_kernel_folder(folder)
    assert check.ok, check.summary()
    metadata = check.metadata
    assert metadata["enable_internet"] is False
    assert metadata["enable_gpu"] is (name != "cv_report")
    assert metadata["model_sources"] == ([source] if ordering else [])
    assert {"alice/kaggle-utils-wheels", "alice/kaggle-utils-package"} <= set(metadata["dataset_sources"])
    kinds = {(ref.kind, ref.ref) for ref in check.inputs}
    if name == "cv_report":
        assert ("kernel", "arena-train-ft-then-quant") in kinds
    else:
        assert metadata["id"] == f"alice/arena-train-{ordering}"
        assert ("competition", "llm-classification-finetuning") in kinds


def _execute(name: str, parameters: dict, workdir: Path, tag: str = "") -> nbformat.NotebookNode:
    import papermill

    return papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(workdir / f"{name}{tag}.executed.ipynb"),
        parameters=parameters,
        kernel_name="python3",
        progress_bar=False,
        cwd=str(workdir),
    )


def test_training_notebook_refuses_an_unknown_ordering(tmp_path):
    """A misspelt ORDERING stops the run in its first package cell, naming the two orderings, before any
    work."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="ORDERING 'ft-then-qaunt' is not one of"):
        _execute(
            "train",
            {
                "ORDERING": "ft-then-qaunt",
                "TRAIN_PATH": str(tmp_path / "unused.csv"),
                "OUT_DIR": str(tmp_path / "out"),
            },
            tmp_path,
        )
    assert not (tmp_path / "out").exists()


def _outputs(notebook, mime: str) -> list:
    return [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if mime in o.get("data", {})
    ]


@pytest.fixture(scope="module")
def trained(sample_files, tmp_path_factory):
    """The training notebook executed once per ordering on the sample data; their output folders."""
    workdir = tmp_path_factory.mktemp("notebooks")
    outputs = {}
    for ordering in ORDERINGS:
        parameters = {
            "ORDERING": ordering,
            "TRAIN_PATH": str(sample_files.train_csv),
            "OUT_DIR": str(workdir / ordering),
            "OVERRIDES": TINY,
        }
        outputs[ordering] = (_execute("train", parameters, workdir, tag=f".{ordering}"), workdir / ordering)
    return workdir, outputs


@pytest.mark.slow
@pytest.mark.parametrize("ordering", ORDERINGS)
def test_training_notebook_runs_end_to_end(trained, ordering):
    from kaggle_utils.quant.manifest import read_manifest

    _, outputs = trained
    executed, out_dir = outputs[ordering]
    report = json.loads((out_dir / "report.json").read_text())
    assert [v["variant"] for v in report["variants"]] == [ordering]
    (run,) = report["runs"]
    assert [fold["fold"] for fold in run["per_fold"]] == [0]
    assert [point["step"] for point in run["per_fold"][0]["history"]] == [
        1,
        2,
    ]  # the tiny overrides reached it
    manifest = read_manifest(run["per_fold"][0]["artifact_dir"])
    assert manifest["ordering"] == ordering
    assert (out_dir / "report.png").stat().st_size > 0 and (out_dir / "oof.parquet").is_file()
    assert len(_outputs(executed, "image/png")) == 2  # the report chart and the learning curve
    markdown = "".join(o["data"]["text/markdown"] for o in _outputs(executed, "text/markdown"))
    assert f"| {ordering} |" in markdown


@pytest.mark.slow
def test_cv_report_notebook_joins_both_orderings(trained):
    workdir, outputs = trained
    out_dir = workdir / "cv_report"
    executed = _execute("cv_report", {"INPUT_ROOT": str(workdir), "OUT_DIR": str(out_dir)}, workdir)
    report = json.loads((out_dir / "report.json").read_text())
    assert sorted(v["variant"] for v in report["variants"]) == ["ft-then-quant", "quant-then-ft"]
    decision = report["decision"]
    assert {decision["winner"], decision["runner_up"]} == {"ft-then-quant", "quant-then-ft"}
    assert decision["standard_error"] > 0
    common = {"cv_log_loss_common_reference", "qid_vs_common"}  # the ft-then-quant kernel supplies these
    for ordering in ORDERINGS:
        single = json.loads((outputs[ordering][1] / "report.json").read_text())["variants"][0]
        joined = next(v for v in report["variants"] if v["variant"] == ordering)
        # numbers are carried over, not recomputed differently
        assert {k: v for k, v in joined.items() if k not in common} == {
            k: v for k, v in single.items() if k not in common
        }
    by_name = {v["variant"]: v for v in report["variants"]}
    reference = by_name["ft-then-quant"]["cv_log_loss_16bit"]["mean"]
    assert report["common_reference"]["variant"] == "ft-then-quant"
    for summary in by_name.values():  # QiD against the one common reference, also for the other kernel's run
        assert summary["qid_vs_common"]["mean"] == pytest.approx(
            summary["cv_log_loss_quantized"]["mean"] - reference
        )
    html = "".join(o["data"]["text/html"] for o in _outputs(executed, "text/html"))
    assert "cv_log_loss_quantized" in html and "prior_log_loss" in html  # the summary and per-fold tables
    assert len(_outputs(executed, "image/png")) == 2
    # A second run finds the same two training folders (its own output folder is not an input).
    _execute("cv_report", {"INPUT_ROOT": str(workdir), "OUT_DIR": str(out_dir)}, workdir)


@pytest.mark.slow
def test_reports_on_different_folds_are_refused(trained, tmp_path):
    from kaggle_utils.studies.combine import combine_reports

    _, outputs = trained
    first, second = (outputs[o][1] for o in ORDERINGS)
    altered = tmp_path / "altered"
    shutil.copytree(second, altered, ignore=shutil.ignore_patterns("runs", "base"))
    report = json.loads((altered / "report.json").read_text())
    report["setup"]["folds_file_hash"] = "0" * 64
    (altered / "report.json").write_text(json.dumps(report))
    with pytest.raises(UsageError, match="folds_file_hash .* identical folds"):
        combine_reports([first, altered], tmp_path / "out")
    with pytest.raises(UsageError, match="more than one"):
        combine_reports([first, first], tmp_path / "out")
    # the same join from the command line (`combine-reports`): one line and exit 2 when refused
    from kaggle_utils.cli.main import main

    assert main(["combine-reports", str(first), str(second), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.md").is_file()
    assert main(["combine-reports", str(first), str(altered), "--out", str(tmp_path / "cli2")]) == 2
