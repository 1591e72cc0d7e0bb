"""One model artifact run over the runtime's devices: load one replica per device (threads in this process,
one worker process each, or the TPU mesh), encode the rows, and run the schedule over them.

    views = run_models(artifact_dir, frame, cfg, deadline, clock, runtime, wrap_forward, report)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.inference import tpu, workers
from kaggle_utils.inference.device_forward import ForwardFn, make_forward, preflight_dtype, tokenizer_pad_id
from kaggle_utils.inference.report import InferenceReport
from kaggle_utils.inference.schedule import run_schedule
from kaggle_utils.inference.views import ViewPredictions, encode_views
from kaggle_utils.quant.artifacts import load_artifact

logger = logging.getLogger(__name__)

PREFLIGHT_ROWS = 4  # float16 compute: rows run once with every decoder layer watched before the schedule


@dataclass
class Replicas:
    """The loaded devices: one forward (and report name, and after-OOM hook) each, and what encodes rows."""

    tokenizer: Any
    format_config: Any
    forwards: list[ForwardFn]
    names: list[str]
    hooks: list[Callable[[], None] | None]
    pool: list[Any] = field(default_factory=list)  # worker processes, closed after the schedule
    first_model: Any = None  # the first in-process replica's model (the float16 preflight runs on it)

    def close(self) -> None:
        """Stop the worker processes, if any."""
        for worker in self.pool:
            worker.close()


def worker_names(devices: Sequence[str]) -> list[str]:
    """One report name per device: the device itself, numbered when it repeats (several CPU replicas)."""
    if len(set(devices)) == len(devices):
        return list(devices)
    return [f"{device}#{index}" for index, device in enumerate(devices)]


def _empty_cache_hook(device: str) -> Callable[[], None] | None:
    """After an out-of-memory on a CUDA device: free its cached blocks before the halved retry."""
    if not device.startswith("cuda"):
        return None

    def empty_cache() -> None:
        gc.collect()
        with torch.cuda.device(device):
            torch.cuda.empty_cache()

    return empty_cache


def _load_tpu(artifact_dir: str | Path, cfg: InferenceConfig) -> Replicas:
    """The artifact as plain bf16 weights sharded over the TPU cores: one forward for the whole mesh."""
    loaded = tpu.load_plain(artifact_dir, verify_hashes=cfg.verify_hashes)
    forward = tpu.make_forward(loaded.model, tokenizer_pad_id(loaded.tokenizer), cfg)
    return Replicas(loaded.tokenizer, loaded.format_config, [forward], ["xla"], [None])


def _start_processes(
    artifact_dir: str | Path,
    cfg: InferenceConfig,
    runtime: Any,
    deadline: float,
    clock: Callable[[], float],
    report: InferenceReport,
) -> Replicas:
    """One worker process per device (`workers.start_workers`); a worker that fails to start is recorded."""
    tokenizer, format_config = workers.load_preprocessing(artifact_dir, verify_hashes=cfg.verify_hashes)
    names = worker_names(runtime.devices)
    threads = max(1, torch.get_num_threads() // len(names)) if runtime.kind == "cpu" else 1
    pool, start_errors = workers.start_workers(
        artifact_dir,
        runtime.devices,
        names,
        runtime.compute_dtype,
        threads,
        deadline=deadline,
        clock=clock,
        batch_timeout_s=cfg.batch_timeout_s,
    )
    report.errors.extend(start_errors)
    # each child empties its own CUDA cache after an OOM
    return Replicas(
        tokenizer, format_config, list(pool), [w.name for w in pool], [None] * len(pool), pool=pool
    )


def _load_threads(artifact_dir: str | Path, cfg: InferenceConfig, runtime: Any) -> Replicas:
    """One replica per device in this process, each run from its own thread."""
    replicas = [
        load_artifact(  # the files are hashed once, by the first load
            artifact_dir,
            device=device,
            compute_dtype=runtime.compute_dtype,
            verify_hashes=cfg.verify_hashes and index == 0,
        )
        for index, device in enumerate(runtime.devices)
    ]
    forwards = [
        make_forward(rep.model, tokenizer_pad_id(rep.tokenizer), device)
        for rep, device in zip(replicas, runtime.devices, strict=True)
    ]
    return Replicas(
        replicas[0].tokenizer,
        replicas[0].format_config,
        forwards,
        worker_names(runtime.devices),
        [_empty_cache_hook(device) for device in runtime.devices],
        first_model=replicas[0].model,
    )


def load_replicas(
    artifact_dir: str | Path,
    cfg: InferenceConfig,
    runtime: Any,
    deadline: float,
    clock: Callable[[], float],
    report: InferenceReport,
) -> Replicas:
    """The artifact on every device of `runtime`: the TPU mesh, worker processes
    (`cfg.worker_backend="process"`), or threads."""
    if runtime.kind == "tpu":
        return _load_tpu(artifact_dir, cfg)
    if cfg.worker_backend == "process":
        return _start_processes(artifact_dir, cfg, runtime, deadline, clock, report)
    return _load_threads(artifact_dir, cfg, runtime)


def run_models(
    artifact_dir: str | Path,
    frame: Any,
    cfg: InferenceConfig,
    deadline: float,
    clock: Callable[[], float],
    runtime: Any,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None,
    report: InferenceReport,
) -> ViewPredictions:
    """Load, encode and schedule one model artifact's rows; timings, encoding and schedule go in `report`.
    `wrap_forward(forward, device_name)` wraps every device's forward (tests, benchmarks)."""
    report.runtime = runtime.to_dict()
    logger.info("runtime: %s", runtime.describe())
    began = clock()
    replicas = load_replicas(artifact_dir, cfg, runtime, deadline, clock, report)
    report.timings_s["load_models"] = clock() - began
    try:
        began = clock()
        encoded, original = encode_views(frame, replicas.tokenizer, replicas.format_config, cfg.tta_swap)
        report.encoding = original.summary()
        report.timings_s["encode"] = clock() - began
        if runtime.compute_dtype == torch.float16 and replicas.first_model is not None:
            report.dtype_preflight = preflight_dtype(  # refused here, not as NaN rows later
                replicas.first_model,
                tokenizer_pad_id(replicas.tokenizer),
                runtime.devices[0],
                encoded[0][:PREFLIGHT_ROWS],
                "inference.compute_dtype",
            )
        forwards = replicas.forwards
        if wrap_forward is not None:
            forwards = [wrap_forward(fn, name) for fn, name in zip(forwards, replicas.names, strict=True)]
        began = clock()
        views, schedule = run_schedule(
            encoded,
            forwards,
            cfg,
            deadline=deadline,
            clock=clock,
            names=replicas.names,
            on_oom=replicas.hooks,
        )
        report.timings_s["schedule"] = clock() - began
        report.schedule = schedule.to_dict()
    finally:
        replicas.close()
    return views
