"""The lever table: runs made with different training levers, each against a reference run on the same rows.

`lever_table([(label, report folder, variant), ...], out_dir)` writes levers.json and levers.md; the first
entry is the reference (the plain run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import check_output_apart
from kaggle_utils.studies.report_inputs import (
    attach_row_losses,
    check_lever_fields,
    check_same_labels,
    read_report,
)

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
    """One entry's run (first seed): its shipped CV log loss, per-row losses and lever settings."""
    report = read_report(directory)
    check_lever_fields(directory, report)
    seed = report["setup"]["seeds"][0]
    runs = [run for run in report["runs"] if run["variant"] == variant and run["seed"] == seed]
    if not runs:
        raise UsageError(
            f"{directory}: no run of variant {variant!r} (has "
            f"{sorted({run['variant'] for run in report['runs']})})"
        )
    run = attach_row_losses(runs[0], directory)
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
    """Each run against the first: shipped CV log loss, the paired per-row difference (positive: better) with
    its standard error, and its own QiD. Refused before anything is written: an `out_dir` overlapping a report
    folder; runs on other folds, seed, ids or labels; OOF rows that are not probabilities; a missing field."""
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
        check_same_labels(run["_rows"], reference["_rows"])
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
    """levers.md: the lever table as Markdown."""
    lines = [
        f"Shipped CV log loss on the same {table['rows']} held-out rows (folds {table['folds_trained']}, "
        f"seed {table['seed']}, folds file sha256 {table['folds_file_hash'][:12]}); "
        f'"vs {table["reference"]}" is '
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
