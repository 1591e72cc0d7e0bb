"""`train` under two processes (accelerate's launcher, gloo on CPU) against one process, same global batch.

One process with per-device batch 4 and grad_accum 2 takes micro-batches (2k, 2k+1) at step k; two processes
with batch 4 and grad_accum 1 take micro-batch 2k (rank 0) and 2k+1 (rank 1), and DDP averages their
gradients: the same examples, the same loss, so the runs differ only by the gloo all-reduce's float rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
from safetensors.torch import load_file

from kaggle_utils.data.sample import generate_competition_files

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = 16
CONFIG = """\
model: {{base_model: tiny, gradient_checkpointing: false}}
format: {{max_length: 128}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
quant: {{scheme: nf4}}
train:
  learning_rate: 0.001
  epochs: 1.0
  max_steps: {steps}
  per_device_batch_size: 4
  grad_accum: {grad_accum}
  warmup_ratio: 0.1
  save_every_steps: 2
  eval_rows_cap: 16
  cv_folds: [0]
"""
# Measured on 2 CPU cores (torch 1 thread per process): max |diff| of the LoRA/head weights, the held-out
# probabilities (16-bit and quantized) and the resumed run's were all exactly 0 (a/2 + b/2 in the same order
# either way). The tolerances allow the reduction order of other gloo/NCCL builds, ~1e-6 relative in fp32.
PROB_ATOL = 1e-5
WEIGHT_ATOL = 1e-5

pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(processes: int, ordering: str | None, config: Path, train_csv: Path, out: Path) -> list[str]:
    """`train --ordering ordering` under `processes`; with ordering None, one `compare-orderings` of both."""
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15 has no CPU multi-process
    # launcher without mpirun); --multi_gpu goes through torchrun and train_fold's Accelerator(cpu=True) then
    # joins a gloo process group.
    launcher = (
        [
            str(ACCELERATE),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
        if processes > 1
        else [sys.executable]
    )
    command = ["train", "--ordering", ordering] if ordering else ["compare-orderings"]
    return [
        *launcher,
        "-m",
        "kaggle_utils",
        *command,
        "--config",
        str(config),
        "--train",
        str(train_csv),
        "--out",
        str(out),
        "--threads",
        "1",
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(
    processes: int, ordering: str | None, config: Path, train_csv: Path, out: Path
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(processes, ordering, config, train_csv, out),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multiprocess")
    train_csv = generate_competition_files(root / "data", n_train=120, n_test=5, seed=0).train_csv
    configs = {}
    for processes, accum in ((1, 2), (2, 1)):
        configs[processes] = root / f"cfg{processes}.yaml"
        configs[processes].write_text(CONFIG.format(steps=STEPS, grad_accum=accum))
    return {"root": root, "train": train_csv, "configs": configs}


@pytest.fixture(scope="module")
def runs(setup) -> dict:
    """Both orderings by one process (one `compare-orderings`: one start-up, the same train_fold per ordering)
    and each ordering's `train` by two, once for the module."""
    began = time.perf_counter()
    one = setup["root"] / "one-process"
    _launch(1, None, setup["configs"][1], setup["train"], one)
    print(f"both orderings, 1 process: {time.perf_counter() - began:.1f} s")
    out = {"one": one}
    for ordering in ("ft-then-quant", "quant-then-ft"):
        began = time.perf_counter()
        target = setup["root"] / f"{ordering}-2p"
        out[ordering] = (target, _launch(2, ordering, setup["configs"][2], setup["train"], target))
        print(f"{ordering}, 2 processes: {time.perf_counter() - began:.1f} s")
    return out


def _fold_dir(out: Path, ordering: str) -> Path:
    return out / "runs" / "seed42" / ordering / "fold0"


def _final_checkpoint(out: Path, ordering: str) -> Path:
    checkpoints = sorted((_fold_dir(out, ordering) / "train" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"step-{STEPS:07d}"], checkpoints  # one, complete, no temp dir
    return checkpoints[0]


def _trainable(checkpoint: Path) -> dict:
    return {k.removeprefix("module."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _oof(out: Path, ordering: str) -> pl.DataFrame:
    return (
        pl.read_parquet(out / "oof.parquet")
        .filter(pl.col("name").str.starts_with(ordering))
        .sort("name", "id")
    )


@pytest.mark.slow
@pytest.mark.parametrize("ordering", ["ft-then-quant", "quant-then-ft"])
def test_two_processes_match_one_with_the_same_global_batch(runs, ordering):
    one, (two, done_two) = runs["one"], runs[ordering]
    one_ckpt, two_ckpt = _final_checkpoint(one, ordering), _final_checkpoint(two, ordering)

    # Two processes really ran: each saved its RNG state into the one checkpoint the main process renamed.
    assert sorted(p.name for p in two_ckpt.glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    # Everything else was written once, by the main process: the same files as the one-process run, less what
    # only compare-orderings writes (the report and the ship decision over both orderings).
    other = "quant-then-ft" if ordering == "ft-then-quant" else "ft-then-quant"
    compare_only = {"report.json", "report.md", "report.png", "ship.json", "reliability.png"}
    assert _files(two) - {str(two_ckpt.relative_to(two) / "random_states_1.pkl")} == {
        f
        for f in _files(one)
        if not f.startswith((f"runs/seed42/{other}/", "shipped/")) and f not in compare_only
    }
    assert done_two.stdout.count("artifact:") == 1  # one report line, from the main process

    weights_one, weights_two = _trainable(one_ckpt), _trainable(two_ckpt)
    assert weights_one.keys() == weights_two.keys() and weights_one
    weight_diff = max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one)
    oof_one, oof_two = _oof(one, ordering), _oof(two, ordering)
    assert oof_one.height > 0
    assert oof_one.select("name", "id", "label").equals(oof_two.select("name", "id", "label"))
    probs = ["p_a", "p_b", "p_tie"]
    prob_diff = float(np.abs(oof_one.select(probs).to_numpy() - oof_two.select(probs).to_numpy()).max())
    print(f"{ordering}: max |weight diff| {weight_diff:.3g}, max |prob diff| {prob_diff:.3g}")
    assert weight_diff < WEIGHT_ATOL
    assert prob_diff < PROB_ATOL

    # Token accounting counts the global batch once: the same real tokens as one process, not twice or half.
    state_one = json.loads((one_ckpt / "trainer_state.json").read_text())
    state_two = json.loads((two_ckpt / "trainer_state.json").read_text())
    assert state_one["global_step"] == state_two["global_step"] == STEPS
    assert state_one["tokens_seen"] == state_two["tokens_seen"] > 0
    loss_one = [h["train_loss"] for h in state_one["history"]]
    np.testing.assert_allclose([h["train_loss"] for h in state_two["history"]], loss_one, rtol=1e-5)


@pytest.mark.slow
def test_two_process_run_killed_after_a_checkpoint_resumes_to_the_same_result(setup, runs):
    ordering = "ft-then-quant"
    reference, _ = runs[ordering]
    out = setup["root"] / "killed"
    command = _command(2, ordering, setup["configs"][2], setup["train"], out)
    checkpoints = _fold_dir(out, ordering) / "train" / "checkpoints"
    launcher = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while (
            not list(checkpoints.glob("step-*")) and launcher.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.01)
    finally:
        # A crash of the whole job: torchrun starts each worker in its own session, so kill the tree,
        # not a group.
        tree = [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        launcher.wait()
        psutil.wait_procs(tree, timeout=30)
    saved = sorted(checkpoints.glob("step-*"))
    assert saved and not (_fold_dir(out, ordering) / "artifact").exists(), (
        "the run ended before it was killed"
    )
    state_file = saved[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["global_step"] < STEPS
    # A marker that only a resumed run carries on: the time already spent (it does not steer training).
    state["train_time_s"] += 1000.0
    state_file.write_text(json.dumps(state))

    done = _launch(2, ordering, setup["configs"][2], setup["train"], out)
    final = json.loads((_final_checkpoint(out, ordering) / "trainer_state.json").read_text())
    assert final["train_time_s"] > 1000.0, "the second launch started over instead of resuming"
    expected = json.loads((_final_checkpoint(reference, ordering) / "trainer_state.json").read_text())
    assert final["tokens_seen"] == expected["tokens_seen"]
    assert done.stdout.count("artifact:") == 1
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(
            _trainable(_final_checkpoint(out, ordering)).values(),
            _trainable(_final_checkpoint(reference, ordering)).values(),
            strict=True,
        )
    )
    probs = ["p_a", "p_b", "p_tie"]
    prob_diff = float(
        np.abs(
            _oof(out, ordering).select(probs).to_numpy() - _oof(reference, ordering).select(probs).to_numpy()
        ).max()
    )
    print(
        f"resumed after step {state['global_step']}: max |weight diff| {diff:.3g}, "
        f"max |prob diff| {prob_diff:.3g}"
    )
    assert diff < WEIGHT_ATOL and prob_diff < PROB_ATOL
