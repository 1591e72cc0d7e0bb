"""Process-based inference workers (`InferenceConfig.worker_backend="process"`): one spawned process per
device, each holding its own replica, seen by the scheduler as an ordinary `forward(token_lists) -> probs`.
A child's OOM comes back as `torch.OutOfMemoryError`, another error as `WorkerError`, a dead or hung child as
`WorkerLost` (see docs/DESIGN_NOTES.md). `KAGGLE_UTILS_WORKER_FAULT` injects faults, for tests:
`<worker>:exit:<n>` (SIGKILL at its n-th batch), `<worker>:hang:<n>`, `<worker>:oom:<rows>`.

    pool, errors = start_workers(artifact_dir, devices, names, compute_dtype, threads, deadline=deadline)
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaggle_utils.core.config import FormatConfig
from kaggle_utils.inference.device_forward import (
    WorkerLost,
    describe_error,
    is_out_of_memory,
    make_forward,
    tokenizer_pad_id,
)
from kaggle_utils.quant.artifacts import TOKENIZER_DIR, _restore_tuples, load_artifact
from kaggle_utils.quant.manifest import read_manifest
from kaggle_utils.text.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
FAULT_ENV = "KAGGLE_UTILS_WORKER_FAULT"
_POLL_S = 0.2  # how often a waiting parent checks that its worker process is still alive
_CLOSE_S = 10.0  # how long a worker gets to exit after being told to, before it is killed


class WorkerError(RuntimeError):
    """A non-memory error raised by a batch inside a worker process (type and message of the original)."""


def load_preprocessing(artifact_dir: str | Path, verify_hashes: bool) -> tuple[Any, Any]:
    """The artifact's tokenizer and format settings, not its model (the parent encodes, children predict)."""

    root = Path(artifact_dir)
    manifest = read_manifest(root, verify_hashes=verify_hashes)
    tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    return tokenizer, FormatConfig(**_restore_tuples(FormatConfig, manifest["format_config"]))


def _fault(index: int, raw: str) -> tuple[str, int] | None:
    """This worker's injected fault from FAULT_ENV's value (read by the parent: a forkserver child has the
    server's environment, not the parent's current one), or None."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        worker, kind, value = raw.split(":")
        parsed = (int(worker), kind, int(value))
    except ValueError as error:
        raise ValueError(f"{FAULT_ENV}={raw!r}: expected <worker index>:exit|hang|oom:<n>") from error
    if parsed[0] != index:
        return None
    if kind not in ("exit", "hang", "oom"):  # only the named worker refuses it (a worker failing to start)
        raise ValueError(f"{FAULT_ENV}={raw!r}: unknown fault {kind!r} (exit, hang, oom)")
    return kind, parsed[2]


def _child_main(
    index: int,
    artifact_dir: str,
    device: str,
    compute_dtype: Any,
    threads: int,
    fault_spec: str,
    tasks: Any,
    results: Any,
) -> None:
    """Worker process: load the replica, say ready, then answer (task id, token lists) until None arrives."""

    try:
        torch.set_num_threads(threads)
        fault = _fault(index, fault_spec)
        loaded = load_artifact(artifact_dir, device=device, compute_dtype=compute_dtype, verify_hashes=False)
        forward = make_forward(loaded.model, tokenizer_pad_id(loaded.tokenizer), device)
    except Exception as error:
        results.put(("load_error", 0, describe_error(error)))
        return
    results.put(("ready", 0, os.getpid()))
    received = 0
    while (item := tasks.get()) is not None:
        task_id, seqs = item
        received += 1
        out_of_memory = False
        try:
            if fault is not None and fault[0] == "exit" and received >= fault[1]:
                os.kill(os.getpid(), signal.SIGKILL)
            if fault is not None and fault[0] == "hang" and received >= fault[1]:
                time.sleep(3600)
            if fault is not None and fault[0] == "oom" and len(seqs) > fault[1]:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV})")
            reply: tuple = ("ok", task_id, np.asarray(forward(seqs), dtype=np.float64))
        except Exception as error:
            out_of_memory = is_out_of_memory(error)
            reply = ("oom" if out_of_memory else "error", task_id, describe_error(error))
        if out_of_memory and str(device).startswith("cuda"):  # outside the except: failed frames are freed
            gc.collect()
            with torch.cuda.device(device):
                torch.cuda.empty_cache()
        results.put(reply)


class ProcessWorker:
    """The parent's handle on one worker process; calling it runs one batch there (see module docstring)."""

    def __init__(
        self,
        ctx: Any,
        index: int,
        name: str,
        artifact_dir: str | Path,
        device: str,
        compute_dtype: Any,
        threads: int,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self.deadline, self.clock, self.batch_timeout_s = deadline, clock, batch_timeout_s
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.process = ctx.Process(
            target=_child_main,
            name=f"inference-{name}",
            daemon=True,
            args=(
                index,
                str(artifact_dir),
                device,
                compute_dtype,
                threads,
                os.environ.get(FAULT_ENV, ""),
                self.tasks,
                self.results,
            ),
        )
        self.sent = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _receive(self, what: str, limit: float | None = None) -> tuple:
        """The next message, polling liveness; WorkerLost once the process is gone and nothing is left, or
        once `limit` (a clock() value) passed, after killing the process."""
        while True:
            try:
                return self.results.get(timeout=_POLL_S)
            except queue.Empty:
                if self.process.is_alive():
                    if limit is None or self.clock() < limit:
                        continue
                    self.process.kill()
                    self.process.join(timeout=_CLOSE_S)
                    raise WorkerLost(
                        f"worker process {self.name} (pid {self.pid}) gave no answer {what} "
                        f"by its time limit (deadline or batch_timeout_s); killed"
                    ) from None
            try:  # it may have answered just before exiting
                return self.results.get(timeout=_POLL_S)
            except queue.Empty:
                raise WorkerLost(
                    f"worker process {self.name} (pid {self.pid}) exited with code "
                    f"{self.process.exitcode} {what}"
                ) from None

    def wait_ready(self) -> None:
        kind, _, payload = self._receive("while loading the model", self.deadline)
        if kind != "ready":
            raise WorkerError(
                f"worker {self.name} could not load the model: {payload['type']}: {payload['message']}"
            )

    def __call__(self, seqs: list[list[int]]) -> np.ndarray:
        self.sent += 1
        limits = [self.deadline] if self.deadline is not None else []
        if self.batch_timeout_s is not None:
            limits.append(self.clock() + self.batch_timeout_s)
        self.tasks.put((self.sent, [list(seq) for seq in seqs]))
        while True:
            limit = min(limits, default=None)
            kind, task_id, payload = self._receive(f"during a batch of {len(seqs)} rows", limit)
            if task_id == self.sent:
                break
        if kind == "ok":
            return payload
        message = f"{payload['type']}: {payload['message']}"
        if kind == "oom":
            raise torch.OutOfMemoryError(f"worker {self.name}: {message}")
        raise WorkerError(f"worker {self.name}: {message}")

    def close(self) -> None:
        """Ask the process to exit; kill it if it does not within _CLOSE_S (a hung device must not block)."""
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.tasks.put(None)
            self.process.join(timeout=_CLOSE_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=_CLOSE_S)
        for channel in (self.tasks, self.results):
            channel.cancel_join_thread()
            channel.close()


# What the forkserver imports once, so each CPU worker forks with them loaded (10-20 s of imports otherwise,
# per worker, on a shared 2-core box).
_PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "kaggle_utils.quant.artifacts",
    "kaggle_utils.inference.device_forward",
    __name__,
]


def _context(devices: Sequence[str]) -> Any:
    """spawn for CUDA workers: nothing of the parent's CUDA state may reach a child (fork after CUDA is
    initialised is unsafe, and importing bitsandbytes may probe CUDA). CPU workers: a forkserver that
    imported the heavy modules once; a fresh process, not a fork of this one; its children never use CUDA."""
    on_cpu = all(device.startswith("cpu") for device in devices)
    if not on_cpu or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs (it already has them)
    return ctx


def start_workers(
    artifact_dir: str | Path,
    devices: Sequence[str],
    names: Sequence[str],
    compute_dtype: Any,
    threads: int,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    batch_timeout_s: float | None = None,
) -> tuple[list[ProcessWorker], list[dict]]:
    """Spawn one worker per device, loading in parallel; returns the ready ones and one error per failed one.

    Raises (after closing them all) only when no worker could load the model."""
    ctx = _context([str(device) for device in devices])
    workers = [
        ProcessWorker(
            ctx, index, name, artifact_dir, device, compute_dtype, threads, deadline, clock, batch_timeout_s
        )
        for index, (device, name) in enumerate(zip(devices, names, strict=True))
    ]
    for worker in workers:
        worker.process.start()
    ready: list[ProcessWorker] = []
    errors: list[dict] = []
    for worker in workers:
        try:
            worker.wait_ready()
            ready.append(worker)
        except (WorkerError, WorkerLost) as error:
            logger.error("inference worker %s not started: %s", worker.name, error)
            errors.append(
                {
                    "where": "starting worker",
                    "device": worker.name,
                    "type": type(error).__name__,
                    "message": str(error)[:500],
                }
            )
            worker.close()
    if not ready:
        raise WorkerError(
            "no inference worker process could load the model: "
            + "; ".join(error["message"] for error in errors)
        )
    return ready, errors
