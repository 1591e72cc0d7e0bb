"""Wall time of the two test tiers: `make test` (ruff, then pytest on xdist workers without the slow
tests) and `make test-slow` (the tests tests/conftest.py lists as slow).

Target: `make test` within 10 minutes on the 2-core development machine, set-up included. Prints a table and
writes benchmarks/results/tests.json with the date, machine and each tier's exit code and summary line.

    .venv/bin/python benchmarks/bench_tests.py                      # both tiers (the slow one takes long)
    .venv/bin/python benchmarks/bench_tests.py --tiers fast --select tests/core  # a quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from kaggle_utils.core.machine import cpu_name, total_memory_gb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tests.json"
TARGET_FAST_SECONDS = 600.0


def tier_commands(tier: str, workers: int, select: list[str]) -> list[list[str]]:
    """The commands `make test` (tier "fast") or `make test-slow` (tier "slow") runs, set-up left out."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    trees = ["kaggle_utils", "tests", "benchmarks"]
    if tier == "fast":
        return [
            [sys.executable, "-m", "ruff", "check", *trees],
            [sys.executable, "-m", "ruff", "format", "--check", "--quiet", *trees],
            [*pytest, "-n", str(workers), "--dist", "loadfile", "-m", "not slow", *select],
        ]
    return [[*pytest, "-n", str(workers), "--dist", "loadfile", "-m", "slow", *select]]


def run_tier(tier: str, workers: int, select: list[str]) -> dict[str, object]:
    """Run one tier's commands in order (stopping at the first failure); its wall time and outcome."""
    start = time.perf_counter()
    returncode, summary = 0, ""
    for command in tier_commands(tier, workers, select):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else done.stderr.strip()[-200:]
        returncode = done.returncode
        if returncode != 0:
            break
    return {
        "tier": tier,
        "command": " && ".join(" ".join(command) for command in tier_commands(tier, workers, select)),
        "wall_s": round(time.perf_counter() - start, 1),
        "returncode": returncode,
        "summary": summary,
    }


def machine() -> dict[str, object]:
    """CPU model, usable cores, memory and platform: the machine the times belong to."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "memory_gb": total_memory_gb(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", nargs="+", choices=("fast", "slow"), default=["fast", "slow"])
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers of the fast tier")
    parser.add_argument("--select", nargs="*", default=[], help="test paths to run instead of all of tests/")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    rows = []
    for tier in args.tiers:
        print(f"running the {tier} tier ...", flush=True)
        rows.append(run_tier(tier, args.workers, args.select))
    print(f"\n{'tier':<6} {'wall s':>8} {'exit':>5}  summary")
    for row in rows:
        print(f"{row['tier']:<6} {row['wall_s']:>8.1f} {row['returncode']:>5}  {row['summary']}")
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "python": platform.python_version(),
        "load_average_before": round(load_before, 2),
        "workers": args.workers,
        "selection": args.select or ["tests"],
        "target_fast_s": TARGET_FAST_SECONDS,
        "tiers": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0 if all(row["returncode"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
