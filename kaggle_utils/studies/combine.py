"""One comparison report from the training kernels' outputs.

On Kaggle each ordering trains in its own kernel (a session has 12 hours and one GPU pair), so the two halves of
`compare.compare_orderings` arrive as two output folders, each with its own report.json and oof.parquet. This
module joins them into the report `compare_orderings` would have written for both, after checking that they
are comparable (same folds file, same folds trained, same seeds), and decides the winner with
`cv_report.decide_winner` on the paired per-row losses of the OOF files.

What `combine_reports` and `lever_table` refuse (UsageError: one line, exit 2), before anything is written:

* an output folder that is, contains or lies inside an input: a report folder, or (combine) a fold artifact
  folder the ship step reads;
* a report.json lacking a field they read (named with its place, e.g. `runs[0] (v seed 42) has no field
  'per_fold'`);
* OOF rows that are not probability vectors (p_a+p_b+p_tie off 1 by more than `PROB_SUM_TOLERANCE`), or
  whose label for an id differs from the first input's: the first offending id (in id order), file and field;
* (combine) a report.json whose figures (rows, CV and per-fold log losses, accuracies, the dialect metric)
  differ from what its own OOF rows give by more than `FIGURE_TOLERANCE`, NaN included: the joined report
  carries report.json's figures and ranks by the rows, so the two must describe the same predictions.
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
from kaggle_utils.core.metrics import (
    PROB_COLUMNS,
    class_prior,
    load_oof,
    log_loss,
    oof_probs,
    row_log_losses,
    save_oof,
)
from kaggle_utils.data.dialects import get_dialect
from kaggle_utils.data.folds import load_folds
from kaggle_utils.evaluate.cv_report import (
    ComparisonReport,
    attach_common_reference,
    decide_winner,
    plot_report,
    render_markdown,
    summarise_variant,
)
from kaggle_utils.evaluate.ship import ShippedRun, ship_runs
from kaggle_utils.studies.orderings import OOF_FILE, REPORT_JSON, REPORT_MD, REPORT_PNG

# An OOF row is a probability vector when p_a + p_b + p_tie is within this of 1 (float32 softmax rows are
# within 1e-6; the teacher reader uses the same bound).
PROB_SUM_TOLERANCE = 1e-3
# report.json's figures and the same figures from its OOF rows agree within this (relative and absolute): JSON
# keeps floats exactly, so only the order of summation (rows sorted by id) differs.
FIGURE_TOLERANCE = 1e-6


def find_report_dirs(root: str | Path) -> list[Path]:
    """Every folder under `root` holding a report.json (the output of a training notebook or compare run)."""
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


def _read(directory: Path) -> dict:
    path = directory / REPORT_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot read the report ({error})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path}: not a compare-orderings report (a JSON object)")
    return report


def _need(path: Path, record, where: str, keys: Sequence[str]) -> None:
    """Refuse a report.json record (`where` in it: "setup", "runs[0] (v seed 42)") lacking one of `keys`."""
    if not isinstance(record, dict):
        raise UsageError(f"{path}: {where} is not a JSON object: not a compare-orderings report")
    missing = [key for key in keys if key not in record]
    if missing:
        raise UsageError(f"{path}: {where} has no field {missing[0]!r}: not a compare-orderings report")


def _need_list(path: Path, record: dict, key: str, where: str) -> list:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise UsageError(
            f"{path}: {where}, field {key!r} is not a non-empty list: not a compare-orderings report"
        )
    return value


def _run_where(index: int, run: dict) -> str:
    return f"runs[{index}] ({run.get('variant')} seed {run.get('seed')})"


def _check_lever_fields(directory: Path, report: dict) -> None:
    """The report.json fields `lever_table` reads."""
    path = directory / REPORT_JSON
    _need(path, report, "the report", ("setup", "runs"))
    _need(path, report["setup"], "setup", ("folds_file_hash", "folds_trained", "seeds"))
    _need_list(path, report["setup"], "seeds", "setup")
    for index, run in enumerate(_need_list(path, report, "runs", "the report")):
        _need(path, run, f"runs[{index}]", ("variant", "seed"))


def _check_combine_fields(directory: Path, report: dict) -> None:
    """The report.json fields `combine_reports` reads itself (report.md's are checked by drawing it)."""
    path = directory / REPORT_JSON
    _need(path, report, "the report", ("setup", "runs", "variants", "total_time_s"))
    _check_lever_fields(directory, report)
    for index, variant in enumerate(_need_list(path, report, "variants", "the report")):
        _need(path, variant, f"variants[{index}]", ("variant", "ordering", "description"))
    for index, run in enumerate(report["runs"]):
        where = _run_where(index, run)
        _need(
            path,
            run,
            where,
            ("rows", "cv_log_loss_16bit", "cv_log_loss_quantized", "prior_log_loss", "per_fold"),
        )
        for number, fold in enumerate(_need_list(path, run, "per_fold", where)):
            fold_where = f"{where} per_fold[{number}]" + (
                f" (fold {fold['fold']})" if isinstance(fold, dict) and "fold" in fold else ""
            )
            _need(
                path,
                fold,
                fold_where,
                ("fold", "log_loss_16bit", "log_loss_quantized", "best_step", "extras"),
            )


def _oof_rows(directory: Path, name: str) -> dict:
    """One OOF name's rows in id order, refused unless every row is a probability vector."""
    path = directory / OOF_FILE
    oof = load_oof(path, name=name).sort("id")
    probs = oof_probs(oof)
    sums = probs.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > PROB_SUM_TOLERANCE)
    if len(off):
        row = int(off[0])
        raise UsageError(
            f"{path}: id {oof['id'][row]!r} ({name}), fields {'+'.join(PROB_COLUMNS)} sum to "
            f"{sums[row]:.6g}, not 1 (tolerance {PROB_SUM_TOLERANCE:g}; {len(off)} of {len(sums)} "
            "rows off): not probabilities"
        )
    return {
        "path": path,
        "name": name,
        "ids": oof["id"].to_list(),
        "labels": oof["label"].to_numpy().astype(np.int64),
        "folds": oof["fold"].to_numpy(),
        "probs": probs,
    }


def _check_same_labels(rows: dict, reference: dict) -> None:
    """Refuse rows whose label for an id differs from the reference's (same ids, in the same order)."""
    differ = np.flatnonzero(rows["labels"] != reference["labels"])
    if len(differ):
        row = int(differ[0])
        raise UsageError(
            f"{rows['path']}: id {rows['ids'][row]!r} ({rows['name']}), field 'label' is "
            f"{rows['labels'][row]} but {reference['labels'][row]} in {reference['path']} "
            f"({reference['name']}; {len(differ)} of {len(rows['ids'])} ids "
            "differ): the reports do not describe the same rows"
        )


def _attach_row_losses(run: dict, directory: Path) -> dict:
    """The per-row quantized losses `decide_winner` pairs, rebuilt from the OOF file in id order (the rows
    themselves as `_rows`)."""
    rows = _oof_rows(directory, f"{run['variant']}/seed{run['seed']}/quantized")
    return {
        **run,
        "_row_losses_quantized": row_log_losses(rows["labels"], rows["probs"]),
        "_ids": rows["ids"],
        "_rows": rows,
    }


def _check_figures(directory: Path, index: int, run: dict, dialect_name: str) -> None:
    """Refuse a run whose report.json figures differ from what its OOF rows give (beyond `FIGURE_TOLERANCE`):
    rows, CV log loss (16-bit and quantized), their gap, accuracies, the dialect metric, per-fold log losses."""
    quantized = run["_rows"]
    plain = _oof_rows(directory, f"{run['variant']}/seed{run['seed']}/16bit")
    if plain["ids"] != quantized["ids"]:
        raise UsageError(
            f"{plain['path']}: {plain['name']} and {quantized['name']} hold other ids: not one run's OOF rows"
        )
    _check_same_labels(plain, quantized)
    labels, p16, pq = quantized["labels"], plain["probs"], quantized["probs"]
    path, where = directory / REPORT_JSON, _run_where(index, run)
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
    """A joined run as a ship candidate: its OOF rows (from its own oof.parquet), each row's training-part class
    prior (the report's per-fold `class_prior`) and its fold artifacts, found where this report lies when the
    recorded path (the training kernel's /kaggle/working) is not there."""
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
    the ship decision over every joined variant (first seed), the class prior, their calibrated versions and
    the blend (`ship.ship_runs`, written under `out_dir`): what the CV-report kernel ships.

    Refused before anything is written (module docstring): an `out_dir` that is, contains or lies inside a
    report folder or a fold artifact folder; reports on other folds, seeds, ids or labels; OOF rows that are
    not probabilities; a report.json lacking a field, or whose figures its own OOF rows contradict."""
    directories = [Path(d) for d in report_dirs]
    if not directories:
        raise UsageError("combine_reports needs at least one report folder")
    out = Path(out_dir)
    check_output_apart(out, [("report folder", d) for d in directories])
    reports = [_read(d) for d in directories]
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

    runs = [
        _attach_row_losses(run, d)
        for d, report in zip(directories, reports, strict=True)
        for run in report["runs"]
    ]
    for run in runs[1:]:
        if run["_ids"] != runs[0]["_ids"]:
            raise UsageError(
                f"{run['variant']} seed {run['seed']} was scored on other rows than {runs[0]['variant']}"
            )
        _check_same_labels(run["_rows"], runs[0]["_rows"])
    places = [
        (d, number, (report.get("dialect") or {}).get("name", "lmsys"))
        for d, report in zip(directories, reports, strict=True)
        for number in range(len(report["runs"]))
    ]
    for run, (directory, number, dialect) in zip(runs, places, strict=True):
        _check_figures(directory, number, run, dialect)
    combined = dict(reports[0])
    # QiD against the common reference: the ft-then-quant run (usually another kernel's report) gives it to all.
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


# Training settings a lever changes (report setup["train"]), shown beside each run of `lever_table`.
LEVER_SETTINGS: tuple[tuple[str, str], ...] = (
    ("train", "method"),
    ("train", "epochs"),
    ("train", "learning_rate"),
    ("train", "teacher_path"),
    ("train", "distill_weight"),
    ("train", "label_smoothing"),
    ("train", "pseudo_path"),
    ("train", "exclude_folds"),
)


def _lever_run(label: str, directory: Path, variant: str) -> dict:
    report = _read(directory)
    _check_lever_fields(directory, report)
    seed = report["setup"]["seeds"][0]
    runs = [run for run in report["runs"] if run["variant"] == variant and run["seed"] == seed]
    if not runs:
        raise UsageError(
            f"{directory}: no run of variant {variant!r} (has "
            f"{sorted({run['variant'] for run in report['runs']})})"
        )
    run = _attach_row_losses(runs[0], directory)
    setup = report["setup"]
    settings = {
        f"{section}.{key}": setup[section][key]
        for section, key in LEVER_SETTINGS
        if key in (setup.get(section) or {})
    }  # a report from before a setting existed lacks it
    return {
        "label": label,
        "directory": str(directory),
        "variant": variant,
        "seed": seed,
        "folds_file_hash": setup["folds_file_hash"],
        "folds_trained": setup["folds_trained"],
        "cv_log_loss": float(np.mean(run["_row_losses_quantized"])),
        "rows": len(run["_ids"]),
        "qid_vs_own_reference": run.get("gap_vs_own_reference"),
        "prior_log_loss": run.get("prior_log_loss"),
        "settings": settings,
        "_losses": run["_row_losses_quantized"],
        "_ids": run["_ids"],
        "_rows": run["_rows"],
    }


def lever_table(entries: Sequence[tuple[str, str | Path, str]], out_dir: str | Path) -> dict:
    """Runs made with different training levers (distillation, smoothing, full fine-tuning, another quantizer)
    on the same folds and seed, each against the first (the plain run): shipped CV log loss, the paired per-row
    difference (positive: better than the first) with its standard error, and each run's own QiD. `entries` are
    (label, report folder, variant); written to out_dir/levers.json and levers.md.

    Refused before anything is written (module docstring): an `out_dir` that is, contains or lies inside a
    report folder; runs on other folds, seed, ids or labels; OOF rows that are not probabilities; a report.json
    lacking a field it reads."""
    if len(entries) < 2:
        raise UsageError("lever_table needs a reference run and at least one other")
    out = Path(out_dir)
    check_output_apart(out, [("report folder", directory) for _, directory, _ in entries])
    labels = [label for label, _, _ in entries]
    if len(set(labels)) != len(labels):
        raise UsageError(f"lever labels must be unique, got {labels}")
    runs = [_lever_run(label, Path(directory), variant) for label, directory, variant in entries]
    reference = runs[0]
    for run in runs[1:]:
        for key in ("folds_file_hash", "folds_trained", "seed"):
            if run[key] != reference[key]:
                raise UsageError(
                    f"{run['label']} ({run['directory']}): {key} {run[key]!r} differs from "
                    f"{reference['label']}'s {reference[key]!r}; levers are compared on identical "
                    "folds and seed"
                )
        if run["_ids"] != reference["_ids"]:
            raise UsageError(f"{run['label']} was scored on other rows than {reference['label']}")
        _check_same_labels(run["_rows"], reference["_rows"])
    for run in runs[1:]:  # each run's settings: the lever settings that differ from the reference's
        run["settings"] = {
            k: v
            for k, v in run["settings"].items()
            if k in reference["settings"] and v != reference["settings"][k]
        }
    for run in runs:
        diff = reference["_losses"] - run["_losses"]
        run["vs_reference"] = float(diff.mean())
        run["paired_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff))) if run is not reference else None
    table = {
        "reference": reference["label"],
        "rows": reference["rows"],
        "seed": reference["seed"],
        "folds_file_hash": reference["folds_file_hash"],
        "folds_trained": reference["folds_trained"],
        "prior_log_loss": reference["prior_log_loss"],
        "runs": [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    (out / "levers.md").write_text(render_lever_table(table), encoding="utf-8")
    return table


def render_lever_table(table: dict) -> str:
    lines = [
        f"Shipped CV log loss on the same {table['rows']} held-out rows (folds {table['folds_trained']}, seed "
        f'{table["seed"]}, folds file sha256 {table["folds_file_hash"][:12]}); "vs {table["reference"]}" is '
        "the mean paired per-row difference (positive: better), with its standard error.",
        "",
        f"| run | variant | settings | shipped CV log loss | vs {table['reference']} | paired SE | "
        "QiD vs its 16-bit reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in table["runs"]:
        if run["label"] == table["reference"]:
            settings = "the reference"
        else:
            settings = (
                ", ".join(
                    f"{k.split('.')[1]}={_short_path(v) if k.endswith('_path') else v}"
                    for k, v in run["settings"].items()
                )
                or "—"
            )
        own = run["qid_vs_own_reference"]
        versus = "—" if run["paired_se"] is None else f"{run['vs_reference']:+.4f}"
        se = "—" if run["paired_se"] is None else f"{run['paired_se']:.4f}"
        lines.append(
            f"| {run['label']} | {run['variant']} | {settings} | {run['cv_log_loss']:.4f} | {versus} | "
            f"{se} | {'n/a' if own is None else f'{own:+.4f}'} |"
        )
    if table["prior_log_loss"] is not None:
        lines += ["", f"Class prior on the same rows: {table['prior_log_loss']:.4f}."]
    return "\n".join(lines) + "\n"


def _short_path(value) -> str:
    """A teacher / pseudo-label path as its last two parts (the run folder says which teacher)."""
    if value is None:
        return "none"
    parts = Path(str(value)).parts
    return "/".join(parts[-2:])
