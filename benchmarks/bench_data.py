"""Load-and-parse speed of `load_competition` on a generated train file of the real size (57,477 rows).

Target: <= 10 s on the 2-core development machine. Generates the file once (timed separately), loads it
`--repeats` times, prints a table and writes benchmarks/results/bench_data.json with the device, date and
versions. Run: `.venv/bin/python benchmarks/bench_data.py` (or `make bench`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

import kaggle_utils
from kaggle_utils.core.machine import cpu_name as cpu_model
from kaggle_utils.core.machine import total_memory_gb
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.sample import generate_competition_files, sample_stats

REAL_TRAIN_ROWS = 57_477
TARGET_SECONDS = 10.0
RESULTS = Path(__file__).resolve().parent / "results" / "bench_data.json"


def cpu_description() -> dict[str, object]:
    """CPU model, usable cores and total memory: the machine the numbers belong to."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cores": cores,
        "memory_gb": total_memory_gb(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=REAL_TRAIN_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as workdir:
        start = time.perf_counter()
        files = generate_competition_files(workdir, n_train=args.rows, n_test=200, seed=args.seed)
        generate_seconds = time.perf_counter() - start
        file_mb = files.train_csv.stat().st_size / 1e6

        timings: list[float] = []
        loaded = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            loaded = load_competition(files.train_csv, split="train", progress=False)
            timings.append(time.perf_counter() - start)
        assert loaded is not None

    report = loaded.report
    median = statistics.median(timings)
    stats = sample_stats(loaded.frame)
    rows = [
        ("rows read", f"{report.rows_read:,}"),
        ("rows kept", f"{report.rows_kept:,}"),
        ("file size", f"{file_mb:,.1f} MB"),
        ("generate", f"{generate_seconds:.2f} s"),
        (f"load (median of {args.repeats})", f"{median:.2f} s"),
        ("load runs", ", ".join(f"{t:.2f}" for t in timings) + " s"),
        ("rows/s", f"{report.rows_read / median:,.0f}"),
        (
            "load average (1 min)",
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores",
        ),
        ("MB/s", f"{file_mb / median:,.1f}"),
        ("target", f"<= {TARGET_SECONDS:.0f} s: {'met' if median <= TARGET_SECONDS else 'MISSED'}"),
        ("repairs (fields)", f"{sum(report.repairs.values()):,}"),
    ]
    rows += [(f"  {kind}", str(count)) for kind, count in sorted(report.repairs.items())]
    rows += [(f"  observed {kind}", str(count)) for kind, count in sorted(report.observations.items())]
    rows += [(f"  dropped: {reason}", str(len(ids))) for reason, ids in sorted(report.dropped.items())]
    width = max(len(name) for name, _ in rows)
    print(f"bench_data: load_competition on a generated {args.rows:,}-row train file (seed {args.seed})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")

    result = {
        "benchmark": "bench_data",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": cpu_description(),
        # the machine is shared: a load average above the core count means the timings include contention
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": {
            "python": sys.version.split()[0],
            "polars": pl.__version__,
            "numpy": np.__version__,
            "kaggle_utils": kaggle_utils.__version__,
        },
        "params": {"rows": args.rows, "seed": args.seed, "repeats": args.repeats},
        "file_mb": round(file_mb, 2),
        "generate_seconds": round(generate_seconds, 3),
        "load_seconds": [round(t, 3) for t in timings],
        "load_seconds_median": round(median, 3),
        "rows_per_second": round(report.rows_read / median, 1),
        "target_seconds": TARGET_SECONDS,
        "target_met": median <= TARGET_SECONDS,
        "data_shape": stats,
        "report": report.to_dict(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
