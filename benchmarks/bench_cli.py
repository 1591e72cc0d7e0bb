"""How fast the CLI starts: `python -m kaggle_utils --help` and the import of `kaggle_utils.cli.main`.

Usage: `.venv/bin/python benchmarks/bench_cli.py [--repeats 3]`; prints a table (best of the repeats, wall
and CPU seconds of a fresh interpreter) and writes benchmarks/results/cli.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from kaggle_utils.core.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cli.json"
CASES = {
    "python -m kaggle_utils --help": [sys.executable, "-m", "kaggle_utils", "--help"],
    "import kaggle_utils.cli.main": [sys.executable, "-c", "import kaggle_utils.cli.main"],
    "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
}


def time_command(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `command` in a fresh process (CPU: user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    figures = {}
    for label, command in CASES.items():
        runs = [time_command(command) for _ in range(args.repeats)]
        figures[label] = {
            "wall_s": round(min(wall for wall, _ in runs), 3),
            "cpu_s": round(min(cpu for _, cpu in runs), 3),
        }
    print(f"{'command':<40} {'wall s':>8} {'CPU s':>8}  (best of {args.repeats})")
    for label, values in figures.items():
        print(f"{label:<40} {values['wall_s']:>8.2f} {values['cpu_s']:>8.2f}")
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": describe_machine(),
        "repeats": args.repeats,
        "figures": figures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"-> {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
