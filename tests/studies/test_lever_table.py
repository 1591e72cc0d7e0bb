"""`lever-table`: runs trained with different levers, each against the plain one, paired on the same rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kaggle_utils.cli.main import main
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import make_oof, row_log_losses, save_oof
from kaggle_utils.studies.lever_table import lever_table


def _run_dir(tmp_path, name, variant, probs, labels, ids, folds_hash="a" * 64, train=None):
    """A compare-orderings output folder as far as lever_table reads it: report.json and oof.parquet."""
    directory = tmp_path / name
    directory.mkdir()
    setup = {
        "folds_file_hash": folds_hash,
        "folds_trained": [0],
        "seeds": [42],
        "train": {"method": "lora", "label_smoothing": 0.0, **(train or {})},
    }
    run = {"variant": variant, "seed": 42, "gap_vs_own_reference": 0.001, "prior_log_loss": 1.09}
    (directory / "report.json").write_text(json.dumps({"setup": setup, "runs": [run]}))
    save_oof(
        make_oof(f"{variant}/seed42/quantized", ids, np.zeros(len(ids)), probs, labels),
        directory / "oof.parquet",
    )
    return directory


def _probs(rng, n, sharp):
    logits = rng.normal(size=(n, 3)) * sharp
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_each_lever_is_paired_against_the_first_run_on_the_same_rows(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 200
    ids, labels = list(range(1000, 1000 + n)), rng.integers(0, 3, size=n)
    plain_probs, smoothed_probs = _probs(rng, n, 1.0), _probs(rng, n, 0.5)
    plain = _run_dir(tmp_path, "plain", "ft-then-quant-int8", plain_probs, labels, ids)
    smoothed = _run_dir(
        tmp_path,
        "smoothed",
        "ft-then-quant-int8",
        smoothed_probs,
        labels,
        ids,
        train={"label_smoothing": 0.1},
    )
    assert (
        main(
            [
                "lever-table",
                f"plain={plain}:ft-then-quant-int8",
                f"smoothing={smoothed}:ft-then-quant-int8",
                "--out",
                str(tmp_path / "table"),
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "table" / "levers.json").read_text())
    diff = row_log_losses(labels, plain_probs) - row_log_losses(labels, smoothed_probs)
    reference, lever = table["runs"]
    assert reference["paired_se"] is None and reference["vs_reference"] == 0.0
    assert lever["vs_reference"] == pytest.approx(diff.mean())
    assert lever["paired_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(n))
    assert lever["cv_log_loss"] == pytest.approx(row_log_losses(labels, smoothed_probs).mean())
    assert lever["settings"] == {"train.label_smoothing": 0.1}
    assert "| smoothing | ft-then-quant-int8 | label_smoothing=0.1 |" in capsys.readouterr().out


def test_levers_on_other_folds_other_rows_or_a_missing_variant_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    ids, labels = list(range(50)), rng.integers(0, 3, size=50)
    plain = _run_dir(tmp_path, "plain", "v", _probs(rng, 50, 1), labels, ids)
    other_folds = _run_dir(tmp_path, "folds", "v", _probs(rng, 50, 1), labels, ids, folds_hash="b" * 64)
    other_rows = _run_dir(tmp_path, "rows", "v", _probs(rng, 50, 1), labels, [i + 100 for i in ids])
    with pytest.raises(UsageError, match="folds_file_hash .* differs"):
        lever_table([("plain", plain, "v"), ("x", other_folds, "v")], tmp_path / "t1")
    with pytest.raises(UsageError, match="scored on other rows"):
        lever_table([("plain", plain, "v"), ("x", other_rows, "v")], tmp_path / "t2")
    with pytest.raises(UsageError, match="no run of variant 'w'"):
        lever_table([("plain", plain, "v"), ("x", plain, "w")], tmp_path / "t3")
    with pytest.raises(UsageError, match="unique"):
        lever_table([("plain", plain, "v"), ("plain", plain, "v")], tmp_path / "t4")
    assert main(["lever-table", f"plain={plain}", "x=y:v", "--out", str(tmp_path / "t5")]) == 2
    assert "is not LABEL=DIR:VARIANT" in capsys.readouterr().err


def test_lever_table_refuses_an_output_that_is_contains_or_lies_inside_a_report_folder(tmp_path, capsys):
    rng = np.random.default_rng(2)
    ids, labels = list(range(30)), rng.integers(0, 3, size=30)
    plain = _run_dir(tmp_path, "plain", "v", _probs(rng, 30, 1), labels, ids)
    other = _run_dir(tmp_path, "other", "v", _probs(rng, 30, 1), labels, ids)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for out, relation, folder in (
        (plain, "is", plain),
        (tmp_path, "contains", plain),
        (other / "table", "is inside", other),
    ):
        assert main(["lever-table", f"plain={plain}:v", f"other={other}:v", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"refusing to write {out}: it {relation} the report folder {folder}" in err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_lever_table_refuses_runs_on_other_labels_or_invalid_probabilities(tmp_path, capsys):
    """Same ids but another data set's labels, or rows that are not probability vectors: the first offending
    id (in id order), the file and the field, in one line and exit 2."""
    rng = np.random.default_rng(3)
    ids, labels = list(range(100, 140)), rng.integers(0, 3, size=40)
    plain = _run_dir(tmp_path, "plain", "v", _probs(rng, 40, 1), labels, ids)
    relabelled = labels.copy()
    relabelled[[5, 9]] = (labels[[5, 9]] + 1) % 3
    others = _run_dir(tmp_path, "others", "v", _probs(rng, 40, 1), relabelled, ids)
    with pytest.raises(
        UsageError,
        match=rf"others/oof.parquet: id 105 \(v/seed42/quantized\), field 'label' is "
        rf"{relabelled[5]} but {labels[5]} in .*plain/oof.parquet",
    ):
        lever_table([("plain", plain, "v"), ("x", others, "v")], tmp_path / "t1")
    five = _run_dir(tmp_path, "five", "v", _probs(rng, 40, 1) * 5, labels, ids)
    assert main(["lever-table", f"plain={plain}:v", f"x={five}:v", "--out", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{five}/oof.parquet: id 100 (v/seed42/quantized), fields p_a+p_b+p_tie sum to 5, not 1" in err
    short = _probs(rng, 40, 1)
    short[12] *= 0.5
    half = _run_dir(tmp_path, "half", "v", short, labels, ids)
    with pytest.raises(
        UsageError,
        match=r"half/oof.parquet: id 112 \(v/seed42/quantized\), fields p_a\+p_b\+p_tie "
        r"sum to 0.5, not 1",
    ):
        lever_table([("plain", plain, "v"), ("x", half, "v")], tmp_path / "t3")
    assert not any((tmp_path / name).exists() for name in ("t1", "t2", "t3"))


def test_lever_table_names_a_missing_report_field_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(4)
    ids, labels = list(range(30)), rng.integers(0, 3, size=30)
    plain = _run_dir(tmp_path, "plain", "v", _probs(rng, 30, 1), labels, ids)
    other = _run_dir(tmp_path, "other", "v", _probs(rng, 30, 1), labels, ids)
    report = json.loads((other / "report.json").read_text())
    del report["setup"]["folds_trained"]
    (other / "report.json").write_text(json.dumps(report))
    assert main(["lever-table", f"plain={plain}:v", f"other={other}:v", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {other}/report.json: setup has no field 'folds_trained': not a compare-orderings report"
    )
