"""The README's demo figures: recorded from one `make demo` run into reports/demo/headline.json, rendered
into the README between `BEGIN`/`END`, and compared with a fresh run (`compare_figures`). The two contracts
and their tolerance: docs/DESIGN_NOTES.md (demo: the README figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.machine import describe_machine

HEADLINE_PATH = Path("reports/demo/headline.json")
README_PATH = Path("README.md")
BEGIN = (
    "<!-- demo-figures:begin (rendered from reports/demo/headline.json by `demo --record`; do not edit) -->"
)
END = "<!-- demo-figures:end -->"
# Log-loss units: how far a fresh same-seed run may move (measured moves: docs/RESULTS.md).
FRESH_RUN_TOLERANCE = 0.01
TOLERANCE = FRESH_RUN_TOLERANCE
_NOT_COMPARED = ("total_seconds", "recorded_on")
_RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "numpy",
    "polars",
    "scikit-learn",
)


def machine_record() -> dict[str, Any]:
    """Where figures were made: date, CPU model, core count, Python and the libraries' versions."""
    import datetime
    import platform
    from importlib import metadata

    versions = {}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.date.today().isoformat(),
        **describe_machine(),
        "python": platform.python_version(),
        "packages": versions,
    }


_ORDERING_METRICS = ("cv_log_loss_16bit", "cv_log_loss_quantized", "qid_vs_common", "gap_vs_own_reference")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the README states, taken from a full demo report (`run_demo`'s return value)."""
    missing = [key for key in ("sample", "baseline", "orderings", "inference") if key not in report]
    if missing:
        raise UsageError(
            f"the demo report lacks {missing}: record figures from a full demo run, not --baseline-only"
        )
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
        "recorded_on": machine_record(),
    }


def render(figures: dict[str, Any]) -> str:
    """The README paragraph for `figures` (Markdown, between the markers)."""

    def number(value: float | None, signed: bool = False) -> str:
        return "n/a" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")

    orderings = "; ".join(
        f"{name}: 16-bit (own reference) {number(v['cv_log_loss_16bit'])}, shipped "
        f"{number(v['cv_log_loss_quantized'])}, QiD vs the common 16-bit reference "
        f"{number(v['qid_vs_common'], True)}"
        for name, v in figures["orderings"].items()
    )
    verdict = "within noise" if figures["within_noise"] else f"{figures['winner']} wins"
    candidates = ", ".join(f"{name} {number(loss)}" for name, loss in figures.get("candidates", {}).items())
    return "\n".join(
        [
            BEGIN,
            f"- `make demo` ({figures['n_train']:,} train / {figures['n_test']} test rows, fold 0, seed "
            f"{figures['seed']}; {figures['total_seconds']:.0f} s of steps in the recording run): baseline "
            f"OOF log loss {number(figures['baseline_log_loss'])} (class prior "
            f"{number(figures['prior_log_loss'])}); {orderings}. {figures['winner']} has the lower shipped "
            f"CV log loss by {number(figures['difference'])} with a paired standard error of "
            f"{number(figures['standard_error'])}: **{verdict}**. The ship decision ranks every candidate by "
            f"cross-fitted CV on the same rows ({candidates}), ships the simplest candidate within noise "
            "(2 paired standard errors) of the lowest, and reports the nested CV of that rule (chosen inside "
            f"each split, scored on it): {figures.get('ship_statement', '')}. Shipped: {figures['shipped']} "
            f"(rows by path {figures['shipped_rows_by_path']}).",
            _machine_line(figures.get("recorded_on")),
            END,
        ]
    )


def _machine_line(machine: dict[str, Any] | None) -> str:
    """The README line naming the machine and versions that made the figures, and how far they move."""
    if not machine:
        where = "on a machine and versions that were not recorded"
    else:
        packages = machine.get("packages", {})
        versions = ", ".join(
            f"{name} {packages[name]}"
            for name in ("torch", "transformers", "peft", "bitsandbytes")
            if packages.get(name)
        )
        where = (
            f"on {machine['date']}, {machine['cpu']} ({machine['cores']} cores), Python {machine['python']}, "
            f"{versions}"
        )
    return (
        f"- These are one machine's figures, recorded {where}. A fresh `make demo` elsewhere lands within "
        f"±{FRESH_RUN_TOLERANCE} of each (a test checks it; measured moves in docs/RESULTS.md)."
    )


def readme_block(text: str, where: str | Path = README_PATH) -> str:
    """The block between the markers in README text (markers included)."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise UsageError(f"{where}: the demo-figures markers are missing")
    return text[start : stop + len(END)]


def record(report: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Write `reports/demo/headline.json` from a demo report and re-render the README block under `root`."""
    root = Path(root)
    figures = headline(report)
    atomic_write_bytes(root / HEADLINE_PATH, (json.dumps(figures, indent=2) + "\n").encode("utf-8"))
    readme = root / README_PATH
    text = readme.read_text(encoding="utf-8")
    atomic_write_bytes(readme, text.replace(readme_block(text, readme), render(figures)).encode("utf-8"))
    return figures


def compare_figures(
    recorded: dict[str, Any], fresh: dict[str, Any], tolerance: float = FRESH_RUN_TOLERANCE
) -> list[str]:
    """Where a fresh run's figures leave the recorded ones; empty if none. Numbers may move by `tolerance`,
    names and counts must match; the winner and shipped candidate only when recorded beyond noise."""
    differences: list[str] = []
    skip = set(_NOT_COMPARED)
    if recorded.get("within_noise"):
        skip.update(("winner", "within_noise"))
    if "within noise" in str(recorded.get("ship_statement", "")):
        skip.update(("shipped", "ship_statement"))

    def walk(a: Any, b: Any, path: str) -> None:
        if path in skip:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                child = f"{path}.{key}" if path else key
                if child in skip:
                    continue
                if key not in a or key not in b:
                    differences.append(f"{child}: only in {'recorded' if key in a else 'fresh'}")
                else:
                    walk(a[key], b[key], child)
        elif isinstance(a, float) and isinstance(b, float):
            if not abs(a - b) <= tolerance:
                differences.append(f"{path}: recorded {a:.6f}, fresh {b:.6f}")
        elif a != b:
            differences.append(f"{path}: recorded {a!r}, fresh {b!r}")

    walk(recorded, fresh, "")
    return differences
