"""The benchmark scripts stay runnable: each runs end to end at a tiny size and records its machine.

These are smoke runs, not measurements (timings are never asserted); the recorded results in
benchmarks/results/ come from full-size runs. bench_qaware_int4.py is left out: it times fixed 9B-shaped layers
(minutes on 2 cores) and has no small size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE_RUNS = {
    "bench_data": ["--rows", "300", "--repeats", "1"],
    "bench_tokenize": ["--rows", "300", "--tokenizer-rows", "200", "--vocab-size", "512", "--max-lengths", "256",
                       "--skip-pair", "--survivors", "--long-cells", "1"],
    "bench_train": ["--steps", "1", "--warmup", "0", "--seq-len", "128"],
    "bench_inference": ["--rows", "20", "--max-length", "128", "--budgets", "1024", "--repeats", "1", "--skip-gpu"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_at_a_tiny_size_and_records_the_machine(script, tmp_path):
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SMOKE_RUNS[script], "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    machine = result.get("device") or result.get("environment")
    assert machine, f"{script} wrote no machine description"
    described = json.dumps(machine)
    assert any(key in described for key in ("cpu", "name", "cuda")), described
