"""The demo's report: `demo_report.json` / `demo_report.md`, and the one-line console summary of each step.

Usage: `write_reports(report, out_dir)`; `step_line(3, 7, key, brief(key, report), seconds)`, where `brief`
gives the step's key figures, or None for a step without one (its full line is shown instead).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kaggle_utils.core.fileio import atomic_write_bytes

# A console step line `[n/N] key: brief (12.3s)` stays within this many characters for the default demo.
MAX_STEP_LINE = 110


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    atomic_write_bytes(
        out_dir / "demo_report.json", json.dumps(report, indent=2, default=str).encode("utf-8")
    )
    atomic_write_bytes(out_dir / "demo_report.md", render_markdown(report).encode("utf-8"))


def render_markdown(report: dict[str, Any]) -> str:
    """demo_report.md: the step lines, data reports, folds, baseline, orderings, inference, submission."""
    lines = [
        "# Demo report",
        "",
        f"kaggle_utils {report['meta']['package_version']}, {report['meta']['created_at']}",
        "",
    ]
    lines += ["## Steps", "", *[f"- {line}" for line in report.get("steps", [])], ""]
    for key, section in _SECTIONS:
        if key in report:
            lines += section(report)
    return "\n".join(lines)


def _data_reports(report: dict[str, Any]) -> list[str]:
    lines = ["## Data reports", ""]
    for split, text in report["load_text"].items():
        lines += [f"### {split}", "", "```", text, "```", ""]
    return lines


def _folds(report: dict[str, Any]) -> list[str]:
    per_fold = report["folds"]["per_fold"]
    if not per_fold:
        return []
    columns = list(per_fold[0])
    lines = ["## Folds", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in per_fold]
    return [*lines, "", f"sha256 `{report['folds']['sha256']}`", ""]


def _baseline(report: dict[str, Any]) -> list[str]:
    base = report["baseline"]
    lines = [
        "## Baseline OOF log loss",
        "",
        "| predictor | log loss |",
        "|---|---|",
        f"| feature baseline ({base['model']}) | {base['log_loss']:.4f} |",
        f"| class prior | {base['prior_log_loss']:.4f} |",
        f"| uniform | {base['uniform_log_loss']:.4f} |",
        "",
        "per fold: " + ", ".join(f"{fold}: {value:.4f}" for fold, value in base["per_fold"].items()),
        "",
    ]
    if "competition_metric" in base:
        scores = base["competition_metric"]["scores"]
        lines += [
            "Competition metric (OOF): " + ", ".join(f"{name} {value:.4f}" for name, value in scores.items()),
            "",
        ]
    return lines


def _orderings(report: dict[str, Any]) -> list[str]:
    orderings = report["orderings"]
    lines = [
        f"## Both orderings ({_base_name(orderings)}, same folds and seed)",
        "",
        *([orderings["base_model_note"], ""] if orderings.get("base_model_note") else []),
        "| ordering | CV log loss own 16-bit reference | CV log loss shipped | QiD vs common reference "
        "| shipped − own reference | accuracy | train s | artifact MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in orderings["variants"].items():
        lines.append(
            f"| {name} | {v['cv_log_loss_16bit']:.4f} | {v['cv_log_loss_quantized']:.4f} "
            f"| {v['qid_vs_common']:+.4f} | {v['gap_vs_own_reference']:+.4f} "
            f"| {v['accuracy_quantized']:.3f} | {v['train_wall_time_s']:.1f} "
            f"| {v['artifact_bytes'] / 1e6:.2f} |"
        )
    if orderings.get("metric", "log_loss") != "log_loss":
        metric = ", ".join(
            f"{name} {v['cv_metric_quantized']:.4f}" for name, v in orderings["variants"].items()
        )
        lines += ["", f"Shipped CV {orderings['metric']}: {metric}"]
    lines += ["", orderings["decision"]["statement"], ""]
    if orderings.get("candidates"):
        lines += [
            "### What ships (every candidate, CV log loss on the same held-out rows)",
            "",
            "| candidate | CV log loss |",
            "|---|---|",
            *[f"| {name} | {loss:.4f} |" for name, loss in orderings["candidates"].items()],
            "",
            orderings["ship"]["statement"],
            "",
        ]
    return [*lines, f"full report: `{orderings['report_dir']}/report.md`", ""]


def _inference(report: dict[str, Any]) -> list[str]:
    inference = report["inference"]
    return [
        "## LLM inference",
        "",
        f"{inference['shipped']} (`{inference['artifact_dir']}`): {inference['validated_rows']} rows "
        f"validated; rows by path {inference['rows_by_path']}; fallback {inference['fallback_source']}",
        "",
    ]


def _submission(report: dict[str, Any]) -> list[str]:
    sub = report["submission"]
    return [
        "## Baseline submission",
        "",
        f"`{sub['path']}`: {sub['rows']} rows, validated; "
        f"{sub['renormalised_rows']} renormalised, {sub['fallback_rows']} fallback rows",
        "",
    ]


_SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[str]]]] = [
    ("load_text", _data_reports),
    ("folds", _folds),
    ("baseline", _baseline),
    ("orderings", _orderings),
    ("inference", _inference),
    ("submission", _submission),
]


def _base_name(orderings: dict[str, Any]) -> str:
    base = str(orderings.get("base_model", "tiny"))
    return "tiny Gemma-2" if base == "tiny" else f"base `{Path(base).name}`"


# ------------------------------------------------------------------------------------------ console briefs
def step_line(number: int, total: int, label: str, text: str, seconds: float) -> str:
    """`[3/7] folds: <text> (1.2s)`: how a step's line is printed and recorded."""
    return f"[{number}/{total}] {label}: {text} ({seconds:.1f}s)"


def brief(key: str, report: dict[str, Any]) -> str | None:
    """The key figures of step `key` from its section of `report`; None when the step has no brief."""
    summary = _BRIEFS.get(key)
    return None if summary is None or key not in report else summary(report)


def _sample_brief(report: dict[str, Any]) -> str:
    sample = report["sample"]
    return f"{sample['n_train']} train / {sample['n_test']} test rows, {sample['dialect']} format"


def _load_brief(report: dict[str, Any]) -> str:
    train, test = report["load"]["train"], report["load"]["test"]

    def repairs(split: dict[str, Any]) -> int:
        return sum(entry["count"] for entry in split["repairs"].values())

    return (
        f"train {train['rows_kept']}/{train['rows_read']} rows kept ({repairs(train)} repairs), "
        f"test {test['rows_kept']}/{test['rows_read']} ({repairs(test)} repairs)"
    )


def _folds_brief(report: dict[str, Any]) -> str:
    folds = report["folds"]
    sizes = [row["rows"] for row in folds["per_fold"]]
    return f"{folds['n_folds']} folds over {folds['groups']} prompt groups, sizes {sizes}"


def _baseline_brief(report: dict[str, Any]) -> str:
    base = report["baseline"]
    metric = base.get("competition_metric")
    competition = f"{metric['name']} {metric['scores'][metric['name']]:.4f}, " if metric else ""
    return (
        f"OOF {competition}log loss {base['log_loss']:.4f} (class prior {base['prior_log_loss']:.4f}, "
        f"uniform {base['uniform_log_loss']:.4f})"
    )


def _submission_brief(report: dict[str, Any]) -> str:
    return f"{report['submission']['rows']} rows written and validated (baseline)"


def _orderings_brief(report: dict[str, Any]) -> str:
    """The shipped CV log loss of each ordering, the paired SE of their gap and the verdict."""
    orderings = report["orderings"]
    decision = orderings["decision"]
    scores = ", ".join(
        f"{name} {v['cv_log_loss_quantized']:.4f}" for name, v in orderings["variants"].items()
    )
    if decision.get("standard_error") is None:
        return f"{scores}: {decision['winner']} lower"
    verdict = "within noise" if decision.get("within_noise") else f"{decision['winner']} wins"
    return f"{scores} (SE {decision['standard_error']:.4f}): {verdict}"


def _inference_brief(report: dict[str, Any]) -> str:
    inference = report["inference"]
    tta, fallback = inference["rows_by_path"].get("tta", 0), inference["fallback_rows"]
    warning = "WARNING " if fallback else ""
    return (
        f"{warning}{inference['shipped']}: {inference['validated_rows']} rows validated "
        f"({tta} with swap TTA, {fallback} fallback)"
    )


_BRIEFS: dict[str, Callable[[dict[str, Any]], str]] = {
    "sample": _sample_brief,
    "load": _load_brief,
    "folds": _folds_brief,
    "baseline": _baseline_brief,
    "submission": _submission_brief,
    "orderings": _orderings_brief,
    "inference": _inference_brief,
}
