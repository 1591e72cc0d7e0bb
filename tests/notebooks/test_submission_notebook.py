"""The submission notebook, executed headless (papermill, this venv's python3 kernel) on CPU against a
Kaggle-like input folder holding tiny artifacts of both orderings; the submission it writes is validated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

from kaggle_utils.data.submission import validate_submission
from kaggle_utils.inference.report import report_path_for

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "submission.ipynb"
SCRIPT = NOTEBOOK.with_suffix(".py")


def test_notebook_and_its_script_are_paired_and_in_sync():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    script = jupytext.read(SCRIPT)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert [c.source for c in notebook.cells] == [c.source for c in script.cells]
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "INPUT_ROOT = None" in tagged[0].source
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")  # shipped clean


@pytest.fixture(scope="module")
def kaggle_input(tmp_path_factory, sample_files, demo_tokenizer):
    """/kaggle/input look-alike: competitions/<slug>/ with test.csv + sample_submission.csv, a decoy dataset
    with another test.csv, and two artifacts (so the notebook's hint parameter is exercised)."""
    from builders import build_tiny_artifacts

    root = tmp_path_factory.mktemp("kaggle_input")
    competition = root / "competitions" / "llm-classification-finetuning"
    competition.mkdir(parents=True)
    shutil.copy(sample_files.test_csv, competition / "test.csv")
    shutil.copy(sample_files.sample_submission_csv, competition / "sample_submission.csv")
    (root / "some-dataset").mkdir()
    shutil.copy(sample_files.test_csv, root / "some-dataset" / "test.csv")
    artifacts = build_tiny_artifacts(root / "models", demo_tokenizer, max_length=192)
    return root, artifacts


@pytest.mark.parametrize(
    ("ordering", "hint"), [("ft-then-quant", "models/ftq"), ("quant-then-ft", "models/qft")]
)
def test_notebook_runs_headless_and_writes_a_valid_submission(kaggle_input, ordering, hint, tmp_path):
    import papermill

    root, _ = kaggle_input
    out = tmp_path / "submission.csv"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={
            "INPUT_ROOT": str(root),
            "ARTIFACT_HINT": hint,
            "OUT": str(out),
            "DEVICE": "cpu",
            "TOKEN_BUDGET": 2048,
        },
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
        execution_timeout=300,
    )
    test_csv = root / "competitions" / "llm-classification-finetuning" / "test.csv"
    validate_submission(out, test_csv)
    report = json.loads(report_path_for(out).read_text())
    assert report["manifest"]["ordering"] == ordering
    assert report["test_path"] == str(test_csv)
    assert report["rows_by_path"]["tta"] == report["rows"] and not report["errors"]
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert f"{report['rows']} rows (tta {report['rows']})" in printed


def test_notebook_raises_after_writing_when_rows_fell_back_except_in_the_rerun(
    kaggle_input, tmp_path, monkeypatch
):
    import papermill

    root, _ = kaggle_input
    test_csv = root / "competitions" / "llm-classification-finetuning" / "test.csv"
    parameters = {
        "TEST_PATH": str(test_csv),
        "ARTIFACT_DIR": str(tmp_path / "no-such-artifact"),
        "DEVICE": "cpu",
        "TOKEN_BUDGET": 2048,
    }
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    out = tmp_path / "submission.csv"
    with pytest.raises(papermill.PapermillExecutionError, match="predicted by the fallback") as raised:
        papermill.execute_notebook(
            str(NOTEBOOK),
            str(tmp_path / "failed.ipynb"),
            parameters={**parameters, "OUT": str(out)},
            kernel_name="python3",
            progress_bar=False,
            cwd=str(tmp_path),
            execution_timeout=300,
        )
    assert raised.value.ename == "InferenceError"
    validate_submission(out, test_csv)  # written and validated before the raise
    executed = nbformat.read(tmp_path / "failed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "FALLBACK 40 of 40 rows" in printed

    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")  # the hidden rerun: keep the file, finish
    rerun = tmp_path / "rerun.csv"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "rerun.ipynb"),
        parameters={**parameters, "OUT": str(rerun)},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
        execution_timeout=300,
    )
    validate_submission(rerun, test_csv)


def test_notebook_writes_a_valid_file_before_raising_when_two_artifacts_are_attached_and_none_is_chosen(
    kaggle_input, tmp_path, monkeypatch
):
    import papermill

    root, _ = kaggle_input
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    out = tmp_path / "submission.csv"
    with pytest.raises(papermill.PapermillExecutionError, match="2 candidates for the artifact") as raised:
        papermill.execute_notebook(
            str(NOTEBOOK),
            str(tmp_path / "failed.ipynb"),
            parameters={"INPUT_ROOT": str(root), "OUT": str(out), "DEVICE": "cpu"},
            kernel_name="python3",
            progress_bar=False,
            cwd=str(tmp_path),
            execution_timeout=300,
        )
    assert (
        raised.value.ename == "UsageError"
        and "a fallback submission (uniform) was written" in raised.value.evalue
    )
    validate_submission(out, root / "competitions" / "llm-classification-finetuning" / "test.csv")


def test_the_notebook_keeps_the_hugging_face_hub_offline_before_anything_is_imported():
    script = jupytext.read(SCRIPT)
    first_code = next(c for c in script.cells if c.cell_type == "code")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert f'"{name}"' in first_code.source
    assert "os.environ.setdefault(" in first_code.source
