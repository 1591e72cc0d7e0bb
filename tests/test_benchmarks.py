"""The benchmark scripts stay runnable: each runs end to end at a tiny size and records its machine.

These are smoke runs, not measurements (timings are never asserted); the recorded results in
benchmarks/results/ come from full-size runs. bench_qaware_int4.py is left out: it times fixed 9B-shaped
layers (minutes on 2 cores) and has no small size. bench_quant_error.py runs on a tiny random Gemma-3
checkpoint (the real one is Gemma 3 270M) and its JSON fields are checked.
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
    "bench_tokenize": [
        "--rows",
        "300",
        "--tokenizer-rows",
        "200",
        "--vocab-size",
        "512",
        "--max-lengths",
        "256",
        "--skip-pair",
        "--survivors",
        "--long-cells",
        "1",
    ],
    "bench_train": ["--steps", "1", "--warmup", "0", "--seq-len", "128"],
    "bench_inference": [
        "--rows",
        "20",
        "--max-length",
        "128",
        "--budgets",
        "1024",
        "--repeats",
        "1",
        "--skip-gpu",
    ],
    "bench_roofline": ["--tiny", "--seq-len", "64", "--batch", "2", "--steps", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_at_a_tiny_size_and_records_the_machine(script, tmp_path):
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SMOKE_RUNS[script], "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    machine = result.get("device") or result.get("environment")
    assert machine, f"{script} wrote no machine description"
    described = json.dumps(machine)
    assert any(key in described for key in ("cpu", "name", "cuda")), described


QUANT_ERROR_FIELDS = {
    "models": {"real", "random"},
    "per_model": {
        "layers_measured",
        "weight_stats_summary",
        "relative_weight_error_summary",
        "hidden_state_relative_error",
        "per_layer",
    },
    "schemes": {"nf4", "int8", "int4_rtn", "int4_hqq"},
}


def test_bench_quant_error_runs_on_a_tiny_checkpoint_and_records_every_field(demo_tokenizer, tmp_path):
    """A tiny random Gemma-3 checkpoint stands in for the real one: both passes, every scheme, 2 rows."""
    from kaggle_utils.core.config import ModelConfig
    from kaggle_utils.models.classifier import materialize_base
    from kaggle_utils.models.model_config import tiny_decoder_config

    config_json = tmp_path / "tiny-gemma3.json"
    tiny_decoder_config(
        "gemma3_text",
        len(demo_tokenizer),
        demo_tokenizer.pad_token_id,
        demo_tokenizer.bos_token_id,
        demo_tokenizer.eos_token_id,
    ).to_json_file(str(config_json))
    checkpoint = materialize_base(
        ModelConfig(base_model=str(config_json), init_seed=1),
        tmp_path / "ckpt",
        vocab_size=len(demo_tokenizer),
        pad_token_id=demo_tokenizer.pad_token_id,
    )
    demo_tokenizer.save_pretrained(str(checkpoint))
    out = tmp_path / "quant_error.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_quant_error.py"),
            "--model-dir",
            str(checkpoint),
            "--rows",
            "2",
            "--max-length",
            "256",
            "--note",
            "tiny smoke run",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (
        "cpu" in json.dumps(result["device"])
        and result["date"]
        and "bench_quant_error.py" in result["command"]
    )
    assert result["rows"] == 2 and out.with_suffix(".md").is_file()
    assert set(result["models"]) == QUANT_ERROR_FIELDS["models"]
    for data in result["models"].values():
        assert QUANT_ERROR_FIELDS["per_model"] <= set(data)
        assert data["layers_measured"] == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
        assert set(data["relative_weight_error_summary"]) == QUANT_ERROR_FIELDS["schemes"]
        for scheme in QUANT_ERROR_FIELDS["schemes"]:
            weight_error = data["relative_weight_error_summary"][scheme]
            # 4-bit formats lose about a tenth of a Gaussian weight's norm, row-wise int8 under 1%.
            assert 0.0 < weight_error["median"] <= weight_error["max"] < (0.02 if scheme == "int8" else 0.2)
        for scheme in (*QUANT_ERROR_FIELDS["schemes"], "int8_weight_only"):
            hidden = data["hidden_state_relative_error"][scheme]
            assert len(hidden["per_row"]) == 2 and 0.0 < hidden["mean"] <= hidden["max"]
