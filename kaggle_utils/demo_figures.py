"""The demo's headline figures: recorded from a `make demo` run, committed, and rendered into the README.

The README states what the demo prints. So that it cannot drift, the figures live in one committed file,
`reports/demo/headline.json`, written from a real run (`demo --record`), and the README's block between
`BEGIN`/`END` is rendered from that file. Two tests keep them honest: the README block equals the rendering of
the committed file, and a fresh default demo run reproduces the committed figures (within `TOLERANCE`, for
float noise across CPUs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kaggle_utils.errors import UsageError
from kaggle_utils.fileio import atomic_write_bytes

HEADLINE_PATH = Path("reports/demo/headline.json")
README_PATH = Path("README.md")
BEGIN = "<!-- demo-figures:begin (rendered from reports/demo/headline.json by `demo --record`; do not edit) -->"
END = "<!-- demo-figures:end -->"
TOLERANCE = 1e-3  # log-loss units: float noise across CPUs is ~1e-6; a stale figure is off by far more
_ORDERING_METRICS = ("cv_log_loss_16bit", "cv_log_loss_quantized", "qid_vs_common", "gap_vs_own_reference")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the README states, taken from a full demo report (`run_demo`'s return value)."""
    missing = [key for key in ("sample", "baseline", "orderings", "inference") if key not in report]
    if missing:
        raise UsageError(f"the demo report lacks {missing}: record figures from a full demo run, not --baseline-only")
    baseline, orderings = report["baseline"], report["orderings"]
    decision = orderings["decision"]
    return {
        "n_train": report["sample"]["n_train"],
        "n_test": report["sample"]["n_test"],
        "seed": report["sample"]["seed"],
        "baseline_log_loss": baseline["log_loss"],
        "prior_log_loss": baseline["prior_log_loss"],
        "orderings": {
            name: {metric: values[metric] for metric in _ORDERING_METRICS}
            for name, values in sorted(orderings["variants"].items())
        },
        "winner": decision["winner"],
        "difference": decision.get("difference"),
        "standard_error": decision.get("standard_error"),
        "within_noise": decision.get("within_noise"),
        "shipped": report["inference"]["shipped"],
        "ship_statement": orderings["ship"]["statement"],
        "candidates": orderings["candidates"],
        "shipped_rows_by_path": dict(sorted(report["inference"]["rows_by_path"].items())),
        "total_seconds": round(sum(report["timings_s"].values()), 1),
    }


def render(figures: dict[str, Any]) -> str:
    """The README paragraph for `figures` (Markdown, between the markers)."""
    def number(value: float | None, signed: bool = False) -> str:
        return "n/a" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")

    orderings = "; ".join(
        f"{name}: 16-bit (own reference) {number(v['cv_log_loss_16bit'])}, shipped "
        f"{number(v['cv_log_loss_quantized'])}, QiD vs the common 16-bit reference {number(v['qid_vs_common'], True)}"
        for name, v in figures["orderings"].items()
    )
    verdict = "within noise" if figures["within_noise"] else f"{figures['winner']} wins"
    return "\n".join([
        BEGIN,
        f"- `make demo` ({figures['n_train']:,} train / {figures['n_test']} test rows, fold 0, seed "
        f"{figures['seed']}; {figures['total_seconds']:.0f} s of steps in the recording run): baseline OOF log loss "
        f"{number(figures['baseline_log_loss'])} (class prior {number(figures['prior_log_loss'])}); {orderings}. "
        f"{figures['winner']} has the lower shipped CV log loss by {number(figures['difference'])} with a paired "
        f"standard error of {number(figures['standard_error'])}: **{verdict}**. The ship decision ranks every "
        "candidate by cross-fitted CV on the same rows (" + ", ".join(
            f"{name} {number(loss)}" for name, loss in figures.get("candidates", {}).items())
        + f"): {figures.get('ship_statement', '')}. Shipped: {figures['shipped']} "
        f"(rows by path {figures['shipped_rows_by_path']}).",
        END,
    ])


def readme_block(text: str, where: str | Path = README_PATH) -> str:
    """The block between the markers in README text (markers included)."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise UsageError(f"{where}: the demo-figures markers are missing")
    return text[start:stop + len(END)]


def record(report: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Write `reports/demo/headline.json` from a demo report and re-render the README block under `root`."""
    root = Path(root)
    figures = headline(report)
    atomic_write_bytes(root / HEADLINE_PATH, (json.dumps(figures, indent=2) + "\n").encode("utf-8"))
    readme = root / README_PATH
    text = readme.read_text(encoding="utf-8")
    atomic_write_bytes(readme, text.replace(readme_block(text, readme), render(figures)).encode("utf-8"))
    return figures


def compare_figures(recorded: dict[str, Any], fresh: dict[str, Any], tolerance: float = TOLERANCE) -> list[str]:
    """Where a fresh run's figures differ from the recorded ones (numbers beyond `tolerance`); empty if none.
    Wall time is not compared: it depends on the machine's load."""
    differences: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path == "total_seconds":
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key not in a or key not in b:
                    differences.append(f"{path}.{key}: only in {'recorded' if key in a else 'fresh'}")
                else:
                    walk(a[key], b[key], f"{path}.{key}" if path else key)
        elif isinstance(a, float) and isinstance(b, float):
            if abs(a - b) > tolerance:
                differences.append(f"{path}: recorded {a:.6f}, fresh {b:.6f}")
        elif a != b:
            differences.append(f"{path}: recorded {a!r}, fresh {b!r}")

    walk(recorded, fresh, "")
    return differences
