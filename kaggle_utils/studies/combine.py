"""One comparison report from the training kernels' outputs.

Each ordering trains in its own Kaggle kernel, so the halves of `orderings.compare_orderings` arrive as
separate folders (report.json + oof.parquet). `combine_reports(report_dirs, out_dir)` checks they are
comparable (same folds file, folds and seeds; same rows and labels; figures matching the OOF rows) and writes
the joined report with the winner and the ship decision. What it refuses: docs/DESIGN_NOTES.md,
"studies/combine.py".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import check_output_apart
from kaggle_utils.core.metrics import class_prior, load_oof, log_loss, oof_probs, save_oof
from kaggle_utils.data.dialects import get_dialect
from kaggle_utils.data.folds import load_folds
from kaggle_utils.evaluate.comparison_report import ComparisonReport
from kaggle_utils.evaluate.cv_report import attach_common_reference, decide_winner, summarise_variant
from kaggle_utils.evaluate.report_render import plot_report, render_markdown
from kaggle_utils.evaluate.ship import ShippedRun, ship_runs
from kaggle_utils.studies.orderings import OOF_FILE, REPORT_JSON, REPORT_MD, REPORT_PNG
from kaggle_utils.studies.report_inputs import (
    attach_row_losses,
    check_lever_fields,
    check_same_labels,
    need_fields,
    need_list,
    oof_rows,
    read_report,
    run_where,
)

# report.json's figures and the same figures from its OOF rows agree within this (relative and absolute): JSON
# keeps floats exactly, so only the order of summation (rows sorted by id) differs.
FIGURE_TOLERANCE = 1e-6


def find_report_dirs(root: str | Path) -> list[Path]:
    """Every folder under `root` holding a report.json (a training notebook's or compare run's output)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    found = sorted(
        Path(dirpath) for dirpath, _dirs, files in os.walk(root, followlinks=True) if REPORT_JSON in files
    )
    if not found:
        raise UsageError(
            f"no {REPORT_JSON} under {root}: run the training notebooks (or compare-orderings) first"
        )
    return found


def _check_combine_fields(directory: Path, report: dict) -> None:
    """The report.json fields `combine_reports` reads itself (report.md's are checked by drawing it)."""
    path = directory / REPORT_JSON
    need_fields(path, report, "the report", ("setup", "runs", "variants", "total_time_s"))
    check_lever_fields(directory, report)
    for index, variant in enumerate(need_list(path, report, "variants", "the report")):
        need_fields(path, variant, f"variants[{index}]", ("variant", "ordering", "description"))
    for index, run in enumerate(report["runs"]):
        where = run_where(index, run)
        need_fields(
            path,
            run,
            where,
            ("rows", "cv_log_loss_16bit", "cv_log_loss_quantized", "prior_log_loss", "per_fold"),
        )
        for number, fold in enumerate(need_list(path, run, "per_fold", where)):
            fold_where = f"{where} per_fold[{number}]" + (
                f" (fold {fold['fold']})" if isinstance(fold, dict) and "fold" in fold else ""
            )
            need_fields(
                path,
                fold,
                fold_where,
                ("fold", "log_loss_16bit", "log_loss_quantized", "best_step", "extras"),
            )


def _check_figures(directory: Path, index: int, run: dict, dialect_name: str) -> None:
    """Refuse a run whose report.json figures (rows, CV and per-fold log losses, accuracies, the dialect
    metric) differ from what its OOF rows give by more than `FIGURE_TOLERANCE`."""
    quantized = run["_rows"]
    plain = oof_rows(directory, f"{run['variant']}/seed{run['seed']}/16bit")
    if plain["ids"] != quantized["ids"]:
        raise UsageError(
            f"{plain['path']}: {plain['name']} and {quantized['name']} hold other ids: not one run's OOF rows"
        )
    check_same_labels(plain, quantized)
    labels, p16, pq = quantized["labels"], plain["probs"], quantized["probs"]
    path, where = directory / REPORT_JSON, run_where(index, run)
    metric = get_dialect(dialect_name).metric
    figures = {
        "rows": len(labels),
        "cv_log_loss_16bit": log_loss(labels, p16),
        "cv_log_loss_quantized": log_loss(labels, pq),
    }
    figures["gap_vs_own_reference"] = figures["cv_log_loss_quantized"] - figures["cv_log_loss_16bit"]
    figures.update(
        accuracy_16bit=float((p16.argmax(1) == labels).mean()),
        accuracy_quantized=float((pq.argmax(1) == labels).mean()),
        cv_metric_16bit=metric(labels, p16),
        cv_metric_quantized=metric(labels, pq),
    )
    recorded = [
        (where, key, run.get(key), value)
        for key, value in figures.items()
        if run.get(key) is not None or key in ("rows", "cv_log_loss_16bit", "cv_log_loss_quantized")
    ]
    trained = {int(fold) for fold in np.unique(quantized["folds"])}
    folds = {fold["fold"] for fold in run["per_fold"]}
    if folds != trained:
        raise UsageError(
            f"{path}: {where}, field 'per_fold' has folds {sorted(folds, key=str)} but its OOF rows "
            f"({quantized['path']}, {quantized['name']}) folds {sorted(trained)}"
        )
    for number, fold in enumerate(run["per_fold"]):
        held = quantized["folds"] == fold["fold"]
        fold_where = f"{where} per_fold[{number}] (fold {fold['fold']})"
        recorded += [
            (fold_where, "log_loss_16bit", fold["log_loss_16bit"], log_loss(labels[held], p16[held])),
            (fold_where, "log_loss_quantized", fold["log_loss_quantized"], log_loss(labels[held], pq[held])),
        ]
    for place, key, value, computed in recorded:
        if not _agrees(value, computed):
            raise UsageError(
                f"{path}: {place}, field {key!r} is {value!r} but its OOF rows ({quantized['path']}) "
                f"give {computed:.6g}: report.json does not describe its OOF rows (edited, or from "
                "another run)"
            )


def _agrees(recorded, computed: float) -> bool:
    """A recorded figure is a finite number equal to the computed one within `FIGURE_TOLERANCE`."""
    if isinstance(recorded, bool) or not isinstance(recorded, int | float) or not math.isfinite(recorded):
        return False
    return math.isclose(recorded, computed, rel_tol=FIGURE_TOLERANCE, abs_tol=FIGURE_TOLERANCE)


def _fold_artifact(directory: Path, run: dict, fold: dict) -> Path:
    """A fold's shipped artifact: the recorded folder, or the same place under this report's folder when the
    recorded one (the training kernel's /kaggle/working) is not there."""
    recorded = fold.get("artifact_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return directory / "runs" / f"seed{run['seed']}" / run["variant"] / f"fold{fold['fold']}" / "artifact"


def _shipped_run(directory: Path, run: dict) -> ShippedRun:
    """A joined run as a ship candidate: its OOF rows, each row's training-part class prior (the report's
    per-fold `class_prior`) and its fold artifacts (`_fold_artifact`)."""
    name = f"{run['variant']}/seed{run['seed']}/quantized"
    oof = load_oof(directory / OOF_FILE, name=name).sort("id")
    priors = {fold["fold"]: fold.get("class_prior") for fold in run["per_fold"]}
    if any(prior is None for prior in priors.values()):
        raise UsageError(
            f"{directory}: report.json has no per-fold class_prior (written before the ship decision "
            "existed): retrain to rank its candidates"
        )
    artifacts = [str(_fold_artifact(directory, run, fold)) for fold in run["per_fold"]]
    return ShippedRun(
        name=run["variant"],
        ids=oof["id"].to_list(),
        labels=oof["label"].to_numpy().astype(np.int64),
        probs=oof_probs(oof),
        row_priors=np.array([priors[f] for f in oof["fold"].to_list()]),
        artifact_dirs=artifacts,
    )


def _ship_joined(directories: list[Path], reports: list[dict], out: Path) -> dict:
    """`ship.ship_runs` over the joined reports' first-seed runs; prompt groups from a source's folds.parquet
    (each row its own group when none is there: said in the decision)."""
    seed = reports[0]["setup"]["seeds"][0]
    folds_files = [d / "folds.parquet" for d in directories if (d / "folds.parquet").is_file()]
    folds = load_folds(folds_files[0]) if folds_files else None
    runs = [
        _shipped_run(d, run)
        for d, report in zip(directories, reports, strict=True)
        for run in report["runs"]
        if run["seed"] == seed
    ]
    ids = runs[0].ids
    groups = (
        dict(zip(folds["id"].to_list(), folds["group"].to_list(), strict=True))
        if folds is not None
        else {row_id: str(row_id) for row_id in ids}
    )
    prior = class_prior(runs[0].labels)  # of the OOF rows: every training row when every fold was trained
    dialect = (reports[0].get("dialect") or {}).get("name", "lmsys")
    decision, shipped = ship_runs(runs, groups, prior, out, dialect)
    record = {**decision.to_dict(), "artifact": str(shipped), "reliability_png": "reliability.png"}
    if folds is None:
        record["statement"] += " (no folds.parquet beside the reports: each row was its own cross-fit group)"
    return record


def combine_reports(report_dirs: Sequence[str | Path], out_dir: str | Path) -> ComparisonReport:
    """Join the reports of `report_dirs` into out_dir/report.json, report.md, report.png and oof.parquet, with
    the ship decision over every joined variant (`ship.ship_runs`): what the CV-report kernel ships.
    Refused before anything is written (UsageError): see docs/DESIGN_NOTES.md, "studies/combine.py"."""
    directories = [Path(d) for d in report_dirs]
    if not directories:
        raise UsageError("combine_reports needs at least one report folder")
    out = Path(out_dir)
    check_output_apart(out, [("report folder", d) for d in directories])
    reports = [read_report(d) for d in directories]
    names = _check_joinable(directories, reports, out)
    runs = _joined_runs(directories, reports)
    combined = _combined_report(directories, reports, runs, names)
    out.mkdir(parents=True, exist_ok=True)
    try:
        combined["ship"] = _ship_joined(directories, reports, out)
    except UsageError as error:  # e.g. reports written before the ship decision: joined, but not ranked
        combined["ship"], combined["ship_skipped"] = None, str(error)
    (out / REPORT_JSON).write_text(json.dumps(combined, indent=2), encoding="utf-8")
    (out / REPORT_MD).write_text(render_markdown(combined), encoding="utf-8")
    plot_report(combined, out / REPORT_PNG)
    oof = pl.concat([load_oof(d / OOF_FILE) for d in directories], how="vertical")
    save_oof(oof, out / OOF_FILE, append=False)
    return ComparisonReport.from_dict(combined)


def _check_joinable(directories: list[Path], reports: list[dict], out: Path) -> list[str]:
    """Refuse reports lacking a field, an `out` overlapping a fold artifact, other folds or seeds, or a
    variant in two reports. Returns the joined variant names."""
    for directory, report in zip(directories, reports, strict=True):
        _check_combine_fields(directory, report)
    check_output_apart(
        out,
        [
            (
                f"artifact folder of {run['variant']} seed {run['seed']} fold {fold['fold']}",
                _fold_artifact(d, run, fold),
            )
            for d, report in zip(directories, reports, strict=True)
            for run in report["runs"]
            for fold in run["per_fold"]
        ],
    )
    first = reports[0]["setup"]
    for directory, report in zip(directories[1:], reports[1:], strict=True):
        setup = report["setup"]
        for key in ("folds_file_hash", "folds_trained", "seeds"):
            if setup[key] != first[key]:
                raise UsageError(
                    f"{directory}: {key} {setup[key]!r} differs from {directories[0]}'s {first[key]!r}; "
                    "the orderings must be trained on identical folds and seeds to be compared"
                )
    names = [variant["variant"] for report in reports for variant in report["variants"]]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise UsageError(f"variants {duplicated} appear in more than one of {[str(d) for d in directories]}")
    return names


def _joined_runs(directories: list[Path], reports: list[dict]) -> list[dict]:
    """Every report's runs with their per-row losses from the OOF files, refused unless all are on the same
    ids and labels and each report.json's figures match its own OOF rows."""
    runs = [
        attach_row_losses(run, d)
        for d, report in zip(directories, reports, strict=True)
        for run in report["runs"]
    ]
    for run in runs[1:]:
        if run["_ids"] != runs[0]["_ids"]:
            raise UsageError(
                f"{run['variant']} seed {run['seed']} was scored on other rows than {runs[0]['variant']}"
            )
        check_same_labels(run["_rows"], runs[0]["_rows"])
    places = [
        (d, number, (report.get("dialect") or {}).get("name", "lmsys"))
        for d, report in zip(directories, reports, strict=True)
        for number in range(len(report["runs"]))
    ]
    for run, (directory, number, dialect) in zip(runs, places, strict=True):
        _check_figures(directory, number, run, dialect)
    return runs


def _combined_report(
    directories: list[Path], reports: list[dict], runs: list[dict], names: list[str]
) -> dict:
    """The joined report's JSON form (the first report's setup, every report's variants and runs), checked
    to draw as report.md."""
    combined = dict(reports[0])
    # QiD against the common reference: the ft-then-quant run (often another kernel's report) gives it to all
    combined["common_reference"] = attach_common_reference(runs)
    combined["variants"] = [
        summarise_variant(runs, v["variant"], v["ordering"], v["description"])
        for report in reports
        for v in report["variants"]
    ]
    combined["runs"] = [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs]
    combined["decision"] = decide_winner(runs, names)
    combined["total_time_s"] = sum(report["total_time_s"] for report in reports)
    combined["sources"] = [str(d) for d in directories]
    try:  # what report.md is drawn from comes from the first report: a field it lacks, named before writing
        render_markdown({**combined, "ship": None})
    except KeyError as error:
        raise UsageError(
            f"{directories[0] / REPORT_JSON} has no field {error.args[0]!r} (report.md is drawn "
            "from it): not a compare-orderings report"
        ) from None
    return combined
