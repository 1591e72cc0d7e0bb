"""combine_reports: joining valid reports, and what it refuses before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kaggle_utils.cli.main import main
from kaggle_utils.core.errors import UsageError
from kaggle_utils.evaluate import cv_report
from kaggle_utils.evaluate.comparison_report import ComparisonReport
from kaggle_utils.studies import experiment
from kaggle_utils.studies import orderings as compare
from kaggle_utils.variants import registry as variant_registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _informative(labels: np.ndarray, sharp: float) -> np.ndarray:
    """Probabilities leaning towards each row's label by `sharp` (0: uniform)."""
    logits = np.zeros((len(labels), 3))
    logits[np.arange(len(labels)), labels] = sharp
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _joinable_report(
    tmp_path: Path,
    folder: str,
    variant: str,
    labels: np.ndarray,
    probs: np.ndarray,
    artifact_root: Path | None = None,
) -> Path:
    """A compare-orderings output folder as combine-reports reads it (report.json, oof.parquet, fold artifact
    folders), made by `aggregate_run` and `build_report` from given OOF rows: seed 42, two folds, ids 0..n-1,
    no training. `artifact_root`: record the fold artifacts there, outside the folder (as a Kaggle training
    kernel's /kaggle/working paths are)."""
    import time

    import torch

    from kaggle_utils.core.metrics import class_prior, make_oof, prior_log_loss, save_oof

    directory = tmp_path / folder
    directory.mkdir()
    ids = np.arange(len(labels))
    fold_of = ids % 2
    folds_out, tables = [], []
    for fold in (0, 1):
        rows = fold_of == fold
        artifact = (
            (artifact_root / f"{variant}-fold{fold}")
            if artifact_root is not None
            else directory / "runs" / "seed42" / variant / f"fold{fold}" / "artifact"
        )
        artifact.mkdir(parents=True)
        prior = class_prior(labels[~rows])
        train = {
            "best_eval_loss": 1.0,
            "selection": "inner",
            "wall_time_s": 1.0,
            "tokens_per_s": 100.0,
            "trainable_params": 10,
            "total_params": 100,
            "total_steps": 2,
            "best_step": 2,
            "history": [],
        }
        folds_out.append(
            {
                "fold": fold,
                "ids": ids[rows].tolist(),
                "labels": labels[rows],
                "probs_16bit": probs[rows],
                "probs_quantized": probs[rows],
                "train": train,
                "prior_log_loss": prior_log_loss(labels[rows], prior),
                "peak_rss_bytes": 1,
                "peak_cuda_bytes": None,
                "artifact_bytes": 1,
                "inference_rows_per_s": 1.0,
                "class_prior": prior.tolist(),
                "artifact_dir": str(artifact),
                "extras": {},
                "notes": [],
            }
        )
        for kind in ("16bit", "quantized"):
            tables.append(
                make_oof(
                    f"{variant}/seed42/{kind}",
                    ids[rows].tolist(),
                    np.full(rows.sum(), fold),
                    probs[rows],
                    labels[rows],
                )
            )
    chosen = variant_registry.resolve_variants([variant])
    run = cv_report.aggregate_run(chosen[0], 42, folds_out)
    report = cv_report.build_report(
        experiment.demo_config(),
        chosen,
        [42],
        [0, 1],
        [run],
        pl.DataFrame({"id": ids}),
        tmp_path / "folds.parquet",
        "f" * 64,
        torch.device("cpu"),
        time.perf_counter(),
    )
    report["skipped_variants"], report["ship"] = {}, None
    serialised = ComparisonReport.from_dict(report).to_dict()
    (directory / compare.REPORT_JSON).write_text(json.dumps(serialised, indent=2))
    save_oof(pl.concat(tables), directory / compare.OOF_FILE)
    return directory


@pytest.fixture
def two_reports(tmp_path):
    """Two joinable single-variant reports on the same 60 rows: ft-then-quant clearly better."""
    labels = np.random.default_rng(3).integers(0, 3, size=60)
    a = _joinable_report(tmp_path, "a", "ft-then-quant", labels, _informative(labels, 1.5))
    b = _joinable_report(tmp_path, "b", "quant-then-ft", labels, _informative(labels, 0.3))
    return a, b


def _edit_report(directory: Path, edit) -> None:
    path = directory / compare.REPORT_JSON
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))


def _files(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_combine_reports_joins_valid_reports(two_reports, tmp_path, capsys):
    a, b = two_reports
    assert main(["combine-reports", str(a), str(b), "--out", str(tmp_path / "joined")]) == 0
    assert "ft-then-quant has the lower quantized CV log loss" in capsys.readouterr().out
    joined = json.loads((tmp_path / "joined" / compare.REPORT_JSON).read_text())
    assert joined["decision"]["winner"] == "ft-then-quant" and joined["decision"]["difference"] > 0
    assert all((tmp_path / "joined" / name).is_file() for name in (compare.REPORT_MD, compare.OOF_FILE))


def test_combine_reports_refuses_an_output_that_is_contains_or_lies_inside_an_input(
    two_reports, tmp_path, capsys
):
    a, b = two_reports
    before = _files(tmp_path)
    for out, relation in ((a, "is"), (tmp_path, "contains"), (a / "joined", "is inside")):
        assert main(["combine-reports", str(a), str(b), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"refusing to write {out}: it {relation} the report folder {a}" in err
    assert _files(tmp_path) == before  # nothing written, nothing replaced


def test_combine_reports_refuses_an_output_around_or_inside_a_shipped_artifact_folder(tmp_path, capsys):
    """Artifacts recorded outside the report folder (a training kernel's /kaggle/working) are inputs too:
    the ship step reads them and writes its ensemble beside the output."""
    labels = np.random.default_rng(4).integers(0, 3, size=40)
    kernel = tmp_path / "kernel"
    a = _joinable_report(
        tmp_path, "a", "ft-then-quant", labels, _informative(labels, 1.0), artifact_root=kernel
    )
    b = _joinable_report(tmp_path, "b", "quant-then-ft", labels, _informative(labels, 0.5))
    before = _files(tmp_path)
    for out, relation in ((kernel, "contains"), (kernel / "ft-then-quant-fold0" / "x", "is inside")):
        assert main(["combine-reports", str(a), str(b), "--out", str(out)]) == 2
        assert f"it {relation} the artifact folder of ft-then-quant seed 42 fold 0" in capsys.readouterr().err
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cv_log_loss_quantized", 2.0),
        ("cv_log_loss_quantized", float("nan")),
        ("cv_log_loss_16bit", 0.1),
        ("rows", 59),
    ],
)
def test_combine_reports_refuses_a_report_whose_figures_its_oof_rows_contradict(
    two_reports, tmp_path, capsys, field, value
):
    a, b = two_reports

    def edit(report):
        report["runs"][0][field] = value

    _edit_report(a, edit)
    assert main(["combine-reports", str(a), str(b), "--out", str(tmp_path / "joined")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{a / compare.REPORT_JSON}: runs[0] (ft-then-quant seed 42), field '{field}' is" in err
    assert "report.json does not describe its OOF rows" in err
    assert not (tmp_path / "joined").exists()


def test_combine_reports_refuses_a_per_fold_figure_its_oof_rows_contradict(two_reports, tmp_path):
    a, b = two_reports

    def edit(report):
        report["runs"][0]["per_fold"][1]["log_loss_quantized"] += 0.01

    _edit_report(b, edit)
    with pytest.raises(
        UsageError,
        match=r"b/report.json: runs\[0\] \(quant-then-ft seed 42\) per_fold\[1\] "
        r"\(fold 1\), field 'log_loss_quantized' is",
    ):
        from kaggle_utils.studies.combine import combine_reports

        combine_reports([a, b], tmp_path / "joined")


def test_combine_reports_refuses_reports_on_other_labels_or_invalid_probabilities(tmp_path, capsys):
    """Same ids but another data set's labels, rows summing to 0.9, probabilities x5: the first offending id
    (in id order) and the field, in one line."""
    labels = np.random.default_rng(5).integers(0, 3, size=40)
    a = _joinable_report(tmp_path, "a", "ft-then-quant", labels, _informative(labels, 1.0))
    relabelled = labels.copy()
    relabelled[[7, 20]] = (labels[[7, 20]] + 1) % 3
    others = _joinable_report(tmp_path, "others", "quant-then-ft", relabelled, _informative(relabelled, 0.5))
    assert main(["combine-reports", str(a), str(others), "--out", str(tmp_path / "j1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        f"{others / compare.OOF_FILE}: id 7 (quant-then-ft/seed42/quantized), field 'label' is "
        f"{relabelled[7]} but {labels[7]} in {a / compare.OOF_FILE}"
    ) in err
    short = _informative(labels, 0.5)
    short[[3, 11]] *= 0.9
    scaled = _joinable_report(tmp_path, "short", "quant-then-ft", labels, short)
    assert main(["combine-reports", str(a), str(scaled), "--out", str(tmp_path / "j2")]) == 2
    assert (
        f"{scaled / compare.OOF_FILE}: id 3 (quant-then-ft/seed42/quantized), "
        "fields p_a+p_b+p_tie sum to 0.9, not 1"
    ) in capsys.readouterr().err
    five = _joinable_report(tmp_path, "five", "quant-then-ft", labels, _informative(labels, 0.5) * 5)
    assert main(["combine-reports", str(a), str(five), "--out", str(tmp_path / "j3")]) == 2
    assert (
        "id 0 (quant-then-ft/seed42/quantized), fields p_a+p_b+p_tie sum to 5, not 1"
        in capsys.readouterr().err
    )
    assert not any((tmp_path / name).exists() for name in ("j1", "j2", "j3"))


def test_combine_reports_names_a_missing_field_in_one_line(two_reports, tmp_path, capsys):
    a, b = two_reports
    original = (b / compare.REPORT_JSON).read_text()
    _edit_report(b, lambda report: report["runs"][0].pop("per_fold"))
    assert main(["combine-reports", str(a), str(b), "--out", str(tmp_path / "joined")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {b / compare.REPORT_JSON}: runs[0] (quant-then-ft seed 42) has no field 'per_fold': "
        "not a compare-orderings report"
    )
    _edit_report(b, lambda report: report["runs"][0].update(per_fold=[{"fold": 0}]))
    assert main(["combine-reports", str(a), str(b), "--out", str(tmp_path / "joined")]) == 2
    assert (
        f"{b / compare.REPORT_JSON}: runs[0] (quant-then-ft seed 42) per_fold[0] (fold 0) has no field "
        "'log_loss_16bit'"
    ) in capsys.readouterr().err
    (b / compare.REPORT_JSON).write_text(original)
    _edit_report(a, lambda report: report.pop("environment"))  # what report.md is drawn from
    assert main(["combine-reports", str(a), str(b), "--out", str(tmp_path / "joined")]) == 2
    assert f"{a / compare.REPORT_JSON} has no field 'environment'" in capsys.readouterr().err
    assert not (tmp_path / "joined").exists()
