"""Run token sequences on one or more devices: every device pulls the next token-budget batch from one shared
queue (`batch_queue.BatchQueue`), out-of-memory halves the batch and retries the same rows, and a failing
batch or a lost worker never raises. The engine knows nothing of models: a device is a
`forward(list_of_token_lists) -> probs (B, 3)` callable.

    views, report = run_schedule([original_ids, swapped_ids], [forward], cfg, deadline=deadline)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from kaggle_utils.core.config import LABEL_COLUMNS, InferenceConfig
from kaggle_utils.inference.batch_queue import BatchQueue, ScheduleReport
from kaggle_utils.inference.device_forward import ForwardFn, WorkerLost, is_out_of_memory
from kaggle_utils.inference.views import ViewPredictions

logger = logging.getLogger(__name__)


def _forward_with_backoff(
    queue: BatchQueue,
    worker: int,
    forward: ForwardFn,
    seqs: list[list[int]],
    on_oom: Callable[[], None] | None,
) -> tuple[np.ndarray, int]:
    """Run `seqs` in chunks under the device's token cap (kept for its later batches); on OOM halve the chunk
    and retry the same rows. Returns (probs, skipped): a row too big even alone comes back NaN and counts as
    skipped."""
    stats = queue.workers[worker]
    length = max(len(seq) for seq in seqs)
    outputs = []
    start = skipped = 0
    while start < len(seqs):
        per_chunk = len(seqs) if stats.token_cap is None else max(1, stats.token_cap // length)
        chunk = seqs[start : start + per_chunk]
        out_of_memory = False
        try:
            probs = np.asarray(forward(chunk), dtype=np.float64)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = True
            if len(chunk) == 1:  # cannot be halved: this row alone is left to the other view / the fallback
                queue.record_row_oom(worker, len(chunk[0]), error)
            else:
                queue.record_oom(worker, len(chunk), length, (len(chunk) // 2) * length)
        if out_of_memory:
            # Outside the except block, so the failed forward's frames (and activations) are freed first.
            if on_oom is not None:
                on_oom()
            if len(chunk) == 1:
                outputs.append(np.full((1, len(LABEL_COLUMNS)), np.nan))
                start += 1
                skipped += 1
            continue
        if probs.shape != (len(chunk), len(LABEL_COLUMNS)):
            raise ValueError(f"forward returned shape {probs.shape} for {len(chunk)} rows")
        outputs.append(probs)
        start += len(chunk)
    return np.concatenate(outputs), skipped


def _worker_loop(
    queue: BatchQueue, worker: int, forward: ForwardFn, on_oom: Callable[[], None] | None
) -> None:
    """One device's thread: take batches from `queue` until it says stop, and report each back to it."""
    try:
        while (task := queue.next_task(worker)) is not None:
            seqs = [list(queue.sequences[task.view][row]) for row in task.rows]
            began = queue.clock()
            try:
                probs, skipped = _forward_with_backoff(queue, worker, forward, seqs, on_oom)
            except WorkerLost as error:  # the device is gone: its rows are redone by the others
                queue.lose(worker, task, error)
                break
            except Exception as error:  # logged and counted; the rows go to the other view or the fallback
                queue.fail(worker, task, error)
                continue
            queue.complete(worker, task, probs, queue.clock() - began, skipped)
    finally:
        queue.finish_worker(worker)


def run_schedule(
    sequences: Sequence[Sequence[Sequence[int]]],
    forwards: Sequence[ForwardFn],
    cfg: InferenceConfig | None = None,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    names: Sequence[str] | None = None,
    on_oom: Sequence[Callable[[], None] | None] | None = None,
) -> tuple[ViewPredictions, ScheduleReport]:
    """Predict every view of every row with one worker thread per `forwards` entry (one per device).
    `sequences[v][i]` is row i's token ids in view v (0 original, 1 swapped); `deadline` is a `clock()` value;
    `on_oom[i]` runs after device i ran out of memory. A failing batch never raises."""
    cfg = cfg or InferenceConfig()
    if not forwards:
        raise ValueError("run_schedule needs at least one forward function (one per device)")
    if not sequences or any(len(view) != len(sequences[0]) for view in sequences):
        raise ValueError("every view must hold one token sequence per row")
    names = list(names) if names is not None else [f"device{i}" for i in range(len(forwards))]
    hooks = list(on_oom) if on_oom is not None else [None] * len(forwards)
    queue = BatchQueue(sequences, len(forwards), names, cfg, deadline, clock, cfg.progress)
    try:
        if len(forwards) == 1:
            _worker_loop(queue, 0, forwards[0], hooks[0])
        else:
            threads = [
                threading.Thread(
                    target=_worker_loop,
                    args=(queue, i, fn, hooks[i]),
                    name=f"inference-{names[i]}",
                    daemon=True,
                )
                for i, fn in enumerate(forwards)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
    except KeyboardInterrupt:
        queue.interrupt()
        logger.error("interrupted: writing what was predicted, the rest from the fallback")
    return queue.close()
