"""Reading compare-orderings report folders for `combine` and `lever_table`: report.json's fields checked,
OOF rows refused unless they are probability vectors with the same labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import PROB_COLUMNS, load_oof, oof_probs, row_log_losses
from kaggle_utils.studies.orderings import OOF_FILE, REPORT_JSON

# An OOF row is a probability vector when p_a + p_b + p_tie is within this of 1 (float32 softmax rows are
# within 1e-6; the teacher reader uses the same bound).
PROB_SUM_TOLERANCE = 1e-3


def read_report(directory: Path) -> dict:
    """`directory`'s report.json as a dict (UsageError when unreadable or not a JSON object)."""
    path = directory / REPORT_JSON
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: cannot read the report ({error})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path}: not a compare-orderings report (a JSON object)")
    return report


def need_fields(path: Path, record, where: str, keys: Sequence[str]) -> None:
    """Refuse a report.json record (`where` in it: "setup", "runs[0] (v seed 42)") lacking one of `keys`."""
    if not isinstance(record, dict):
        raise UsageError(f"{path}: {where} is not a JSON object: not a compare-orderings report")
    missing = [key for key in keys if key not in record]
    if missing:
        raise UsageError(f"{path}: {where} has no field {missing[0]!r}: not a compare-orderings report")


def need_list(path: Path, record: dict, key: str, where: str) -> list:
    """`record[key]`, refused unless a non-empty list."""
    value = record[key]
    if not isinstance(value, list) or not value:
        raise UsageError(
            f"{path}: {where}, field {key!r} is not a non-empty list: not a compare-orderings report"
        )
    return value


def run_where(index: int, run: dict) -> str:
    """Where a run is in report.json, for error messages: "runs[0] (v seed 42)"."""
    return f"runs[{index}] ({run.get('variant')} seed {run.get('seed')})"


def check_lever_fields(directory: Path, report: dict) -> None:
    """The report.json fields `lever_table` reads."""
    path = directory / REPORT_JSON
    need_fields(path, report, "the report", ("setup", "runs"))
    need_fields(path, report["setup"], "setup", ("folds_file_hash", "folds_trained", "seeds"))
    need_list(path, report["setup"], "seeds", "setup")
    for index, run in enumerate(need_list(path, report, "runs", "the report")):
        need_fields(path, run, f"runs[{index}]", ("variant", "seed"))


def oof_rows(directory: Path, name: str) -> dict:
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


def check_same_labels(rows: dict, reference: dict) -> None:
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


def attach_row_losses(run: dict, directory: Path) -> dict:
    """The per-row quantized losses `decide_winner` pairs, rebuilt from the OOF file in id order (the rows
    themselves as `_rows`)."""
    rows = oof_rows(directory, f"{run['variant']}/seed{run['seed']}/quantized")
    return {
        **run,
        "_row_losses_quantized": row_log_losses(rows["labels"], rows["probs"]),
        "_ids": rows["ids"],
        "_rows": rows,
    }
