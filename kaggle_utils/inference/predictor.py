"""Offline prediction that always leaves a valid `submission.csv` inside Kaggle's 9 hours.

Two layers:

* `run_schedule`: the engine. It knows nothing of models: it takes token sequences (one list per view: the
  original order and, with TTA, the A/B-swapped order), one `forward(list_of_token_lists) -> probs (B, 3)`
  callable per device and a clock. Work is cut into token-budget batches, longest first, and every device
  pulls the next batch from one shared queue, so the split between devices is by tokens, not rows, and no
  device idles while another has work left. Out-of-memory halves the batch and retries the same rows (and
  remembers the smaller size for that device). The time guard measures each device's tokens/s after its
  warm-up batches: when the projection overruns the deadline it drops the swapped view for the rows not yet
  done; a batch that cannot finish before the deadline is not started. An exception in a batch is logged
  and its rows left to the other view or the fallback; a device failing repeatedly is retired. A forward
  raising `WorkerLost` (its worker process died: `workers.py`, `InferenceConfig.worker_backend="process"`)
  retires that device at once and puts the batch back at the head of the queue for the others; idle workers
  wait while batches are in flight, so such a batch is never stranded.
* `predict`: artifact + test file -> submission. Arguments a user can fix (token budget, deadline, a device
  that is not there, an output that is an input or not a regular file) are refused before anything is
  written. It then writes a fallback submission first (so a valid file exists from the first seconds; when
  the output path already holds a valid submission for this test file, the fallback goes beside it as
  `<stem>.fallback.csv` instead, so an interrupted run never replaces a good file with the fallback), loads
  one model replica per device (threads here, or one worker process each), runs the engine, combines the
  views (mean of the original and the un-swapped swapped prediction), fills every row no model pass served
  with the cheapest good prediction (baseline model, else the class prior from the manifest, else uniform),
  writes the submission atomically and a JSON report beside it with how many rows each path served. The file
  is the competition dialect's (`dialects.py`, named in the artifact's manifest): LMSYS's three probability
  columns, or WSDM's `id, winner`. An ensemble artifact (manifest `kind: ensemble`, `ensembles.py`) runs
  each member through the same steps, cheapest model first under the one deadline (or one member per device
  with `ensemble_layout="member_per_device"`), and blends them by the manifest's weights, renormalised per
  row over the members that served it: the time guard cuts the most expensive member's rows first.
* `score_rows`: the same encoding, schedule and view combination for labelled rows, without deadline or
  fallback: cross-validation scores the shipped model with it, so CV and the submission cannot drift apart.

Error policy (decided here): after the test ids are read, no exception escapes `predict` by default, because
on Kaggle any exception fails the submission even when the file exists; errors are logged, counted and
written to the report. `InferenceConfig.raise_after_write=True` (CLI `--strict`) re-raises the first one,
but only after the valid file is on disk. Rows served by the fallback are a failure of the run, not of the
file: `raise_if_fallback` (called by the CLI, which then exits 1, and by the submission notebook after it
wrote and validated the file) raises when any row fell back, except in Kaggle's hidden competition rerun
(KAGGLE_IS_COMPETITION_RERUN), where the file must be kept and the notebook must finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from kaggle_utils.core.config import LABEL_COLUMNS, DataConfig, InferenceConfig, validate_section
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.environment import (
    default_submission_path,
    is_competition_rerun,
    on_kaggle,
    use_offline_hub,
)
from kaggle_utils.core.errors import SubmissionError, UsageError
from kaggle_utils.core.fileio import atomic_write_bytes, check_output_apart, check_output_target
from kaggle_utils.data.dialects import dialect_names, dialect_of_manifest, get_dialect
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.submission import read_test_ids
from kaggle_utils.evaluate.calibration import apply_calibration
from kaggle_utils.evaluate.ensembles import BlendedRows, blend_members
from kaggle_utils.inference import tpu, workers
from kaggle_utils.inference.device_forward import (  # WorkerLost, make_forward, is_out_of_memory: part of this API too
    ForwardFn,
    WorkerLost,
    _describe_error,
    _pad_id,
    is_out_of_memory,
    make_forward,
    preflight_dtype,
)
from kaggle_utils.inference.inputs import find_inputs, find_test_file
from kaggle_utils.models.runtime import detect_runtime
from kaggle_utils.quant.artifacts import MANIFEST_NAME, check_ensemble_manifest, load_artifact
from kaggle_utils.text.batching import token_budget_batches
from kaggle_utils.text.formatting import (
    TTA_SPACES,
    average_views,
    encode_both_orders,
    encode_rows,
    swap_probs,
)
from kaggle_utils.train.baseline import BaselineModel, baseline_manifest_path

logger = logging.getLogger(__name__)

VIEW_NAMES: tuple[str, ...] = ("original", "swapped")
ORIGINAL, SWAPPED = 0, 1
# How each row's final prediction was made (the report counts rows per path).
PATH_TTA, PATH_ORIGINAL, PATH_SWAPPED, PATH_FALLBACK = "tta", "original_only", "swapped_only", "fallback"
# An ensemble's rows: every member served the row, or only some (weights renormalised over those).
PATH_ALL_MEMBERS, PATH_SOME_MEMBERS = "all_members", "some_members"
PREFLIGHT_ROWS = (
    4  # float16 compute: rows run once with every decoder layer watched before the schedule starts
)
_ERRORS_KEPT = 20


class InferenceError(RuntimeError):
    """Raised only with `raise_after_write=True`, after the submission was written; wraps the first error."""


# ----------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    view: int
    rows: list[int]
    padded_tokens: int


@dataclass
class WorkerStats:
    """One device's share of the work: batches, padded tokens, busy seconds, and why it stopped early."""

    name: str
    batches: int = 0
    rows: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    busy_seconds: float = 0.0
    finished_at: float = 0.0  # seconds after the schedule started
    oom_retries: int = 0
    token_cap: int | None = None  # padded tokens per forward after an OOM
    failures: int = 0
    retired: str = ""
    # rate measurement (after warm-up)
    measured_tokens: int = 0
    measured_seconds: float = 0.0
    consecutive_failures: int = 0

    @property
    def rate(self) -> float | None:
        """Padded tokens per busy second after warm-up; None until one measured batch exists."""
        return self.measured_tokens / self.measured_seconds if self.measured_seconds > 0 else None


@dataclass
class ScheduleReport:
    """What the engine did: per view and per device, what the time guard decided, every error."""

    rows: int
    views: int
    batches_planned: int
    batches_done: int = 0
    batches_failed: int = 0
    rows_done_per_view: list[int] = field(default_factory=list)
    nonfinite_rows: int = (
        0  # rows the model returned NaN/inf for (fp16 overflow): other view/fallback, exit 1
    )
    rows_out_of_memory: int = 0  # rows that did not fit in memory even alone
    workers_lost: int = 0  # worker processes that died mid-run (their device retired)
    rows_requeued: int = 0  # row passes of a lost worker's in-flight batch, put back for the others to redo
    padding_efficiency: float = 1.0  # real tokens / padded tokens over the batches run
    tta_dropped: bool = False
    tta_dropped_after_s: float | None = None
    tta_rows_dropped: int = 0
    stopped: str = ""  # "deadline" | "all devices retired" | "interrupted" | ""
    stopped_after_s: float | None = None
    rows_not_reached: int = 0  # row-views never started (deadline, retired devices)
    projected_total_s: float | None = None  # last projection of the whole schedule (from its start)
    elapsed_s: float = 0.0
    workers: list[WorkerStats] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    oom_events: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for worker, stats in zip(data["workers"], self.workers, strict=True):
            worker["rate_tokens_per_s"] = stats.rate
        return data


@dataclass
class ViewPredictions:
    """(views, rows, 3) probabilities in each view's own column order; `done` marks the rows served."""

    probs: np.ndarray
    done: np.ndarray


class _Scheduler:
    """Shared queue of token-budget batches, the time guard, and the bookkeeping; every method holds the lock."""

    def __init__(
        self,
        sequences: Sequence[Sequence[Sequence[int]]],
        n_workers: int,
        worker_names: Sequence[str],
        cfg: InferenceConfig,
        deadline: float | None,
        clock: Callable[[], float],
        progress: bool,
    ) -> None:
        self.sequences = sequences
        self.n_views = len(sequences)
        self.n_rows = len(sequences[0])
        self.cfg = cfg
        self.deadline = deadline
        self.clock = clock
        self.started = clock()
        self.lock = threading.Lock()
        # Signalled whenever a batch ends: an idle worker waits on it while another's batch is in flight,
        # since a lost worker's batch comes back to the queue.
        self.changed = threading.Condition(self.lock)
        self.stop_requested = False

        self.pending: list[deque[_Task]] = []
        for view, seqs in enumerate(sequences):
            lengths = [len(seq) for seq in seqs]
            batches = token_budget_batches(lengths, cfg.token_budget, cfg.max_rows_per_batch)
            tasks = [
                _Task(view, list(rows), len(rows) * max(lengths[r] for r in rows)) for rows in batches if rows
            ]
            self.pending.append(deque(tasks))
        self.probs = np.full((self.n_views, self.n_rows, len(LABEL_COLUMNS)), np.nan)
        self.done = np.zeros((self.n_views, self.n_rows), dtype=bool)
        self.in_flight = np.zeros((self.n_views, self.n_rows), dtype=bool)
        self.workers = [WorkerStats(name=str(name)) for name in worker_names]
        # when each worker found the queue empty and began waiting on in-flight batches (its real finish time
        # unless a lost worker's batch comes back to it)
        self.idle_since: list[float | None] = [None] * len(self.workers)
        self.report = ScheduleReport(
            rows=self.n_rows,
            views=self.n_views,
            batches_planned=sum(len(q) for q in self.pending),
            workers=self.workers,
        )
        self.real_tokens = 0
        self.padded_tokens = 0
        total = sum(len(task.rows) for queue in self.pending for task in queue)
        self.bar = progress_bar(total=total, unit="row", desc="inference", enabled=progress, smoothing=0.1)

    # -- layout -------------------------------------------------------------------------------------------
    def _view_order(self, worker: int) -> list[int]:
        """shared_queue: original first for everyone; view_per_device: device i starts on view i % views."""
        first = worker % self.n_views if self.cfg.layout == "view_per_device" else ORIGINAL
        return [first] + [view for view in range(self.n_views) if view != first]

    # -- time guard ---------------------------------------------------------------------------------------
    def _throughput(self) -> float | None:
        """Sum of the measured per-device rates; devices still warming up count as the mean measured one."""
        active = [w for w in self.workers if not w.retired]
        rates = [w.rate for w in active if w.rate]
        if not rates:
            return None
        return sum(rates) / len(rates) * len(active)

    def _pending_tokens(self, views: Sequence[int]) -> int:
        return sum(task.padded_tokens for view in views for task in self.pending[view])

    def _drop_tta(self, now: float, throughput: float) -> None:
        """Drop swapped passes, longest first (the most time per row freed, so the most rows keep TTA), until
        the projection fits the deadline; once none is left, original passes of rows the swapped view already
        served are dropped too (they have a prediction)."""
        dropped = 0
        pending = self._pending_tokens(range(self.n_views))
        for view in range(1, self.n_views):
            queue = self.pending[view]
            while queue and now + pending / throughput > self.deadline:
                task = queue.popleft()
                pending -= task.padded_tokens
                dropped += len(task.rows)
        if (
            all(not self.pending[view] for view in range(1, self.n_views))
            and now + pending / throughput > self.deadline
        ):
            covered = self.done[1:].any(axis=0) | self.in_flight[1:].any(axis=0)
            lengths = [len(seq) for seq in self.sequences[ORIGINAL]]
            kept: deque[_Task] = deque()
            for task in self.pending[ORIGINAL]:
                rows = [row for row in task.rows if not covered[row]]
                dropped += len(task.rows) - len(rows)
                if rows:
                    kept.append(_Task(ORIGINAL, rows, len(rows) * max(lengths[r] for r in rows)))
            self.pending[ORIGINAL] = kept
        if not dropped:
            return
        if not self.report.tta_dropped:
            self.report.tta_dropped = True
            self.report.tta_dropped_after_s = now - self.started
        self.report.tta_rows_dropped += dropped
        self.bar.total -= dropped
        self.bar.refresh()
        logger.warning(
            "time guard: projected to overrun the deadline; swap TTA dropped for %d more row passes", dropped
        )

    def _stop(self, reason: str, now: float) -> None:
        not_reached = sum(len(task.rows) for queue in self.pending for task in queue)
        for queue in self.pending:
            queue.clear()
        if not self.report.stopped:
            self.report.stopped = reason
            self.report.stopped_after_s = now - self.started
        self.report.rows_not_reached += not_reached
        self.bar.total -= not_reached
        self.bar.refresh()
        if not_reached:
            logger.warning("inference stopped (%s): %d row passes left to the fallback", reason, not_reached)

    def _guard(self, now: float) -> None:
        if self.deadline is None:
            return
        if now >= self.deadline:
            self._stop("deadline", now)
            return
        throughput = self._throughput()
        if throughput is None:
            return
        projected = now + self._pending_tokens(range(self.n_views)) / throughput
        self.report.projected_total_s = projected - self.started
        if projected > self.deadline and self.n_views > 1:
            self._drop_tta(now, throughput)

    # -- worker API ---------------------------------------------------------------------------------------
    def next_task(self, worker: int) -> _Task | None:
        """The next batch for `worker`; None when it should stop. With the queue empty it waits while other
        workers still have batches in flight (one of them may die and its batch come back)."""
        with self.lock:
            stats = self.workers[worker]
            while True:
                if self.stop_requested or stats.retired:
                    return None
                now = self.clock()
                self._guard(now)
                for view in self._view_order(worker):
                    if not self.pending[view]:
                        continue
                    task = self.pending[view][0]
                    rate = stats.rate or (self._throughput() or 0.0) / max(1, len(self.workers))
                    if (
                        self.deadline is not None
                        and rate > 0
                        and (now + task.padded_tokens / rate > self.deadline)
                    ):
                        self._stop("deadline", now)
                        return None
                    self.pending[view].popleft()
                    self.in_flight[view, task.rows] = True
                    self.idle_since[worker] = None
                    return task
                if not self.in_flight.any():
                    return None
                if self.idle_since[worker] is None:
                    self.idle_since[worker] = now
                self.changed.wait(timeout=0.5)

    def complete(self, worker: int, task: _Task, probs: np.ndarray, seconds: float, skipped: int = 0) -> None:
        """Store a finished batch; `skipped` rows (NaN) did not fit in memory even alone."""
        with self.lock:
            stats = self.workers[worker]
            lengths = [len(self.sequences[task.view][row]) for row in task.rows]
            finite = np.all(np.isfinite(probs), axis=1)
            rows = np.asarray(task.rows)
            self.probs[task.view, rows[finite]] = probs[finite]
            self.done[task.view, rows[finite]] = True
            self.in_flight[task.view, rows] = False
            self.report.nonfinite_rows += int((~finite).sum()) - skipped
            stats.batches += 1
            stats.rows += len(task.rows)
            stats.padded_tokens += task.padded_tokens
            stats.real_tokens += sum(lengths)
            stats.busy_seconds += seconds
            stats.consecutive_failures = 0
            if stats.batches > self.cfg.warmup_batches:
                stats.measured_tokens += task.padded_tokens
                stats.measured_seconds += seconds
            self.report.batches_done += 1
            self.changed.notify_all()
            self.real_tokens += sum(lengths)
            self.padded_tokens += task.padded_tokens
            self.bar.update(len(task.rows))
            throughput = self._throughput()
            if throughput:
                projected = self.report.projected_total_s
                self.bar.set_postfix(
                    tok_s=f"{throughput:,.0f}",
                    tta="off" if self.report.tta_dropped else "on",
                    projected_h="-" if projected is None else f"{projected / 3600:.2f}",
                    refresh=False,
                )

    def fail(self, worker: int, task: _Task, error: BaseException) -> None:
        with self.lock:
            stats = self.workers[worker]
            self.in_flight[task.view, task.rows] = False
            self.changed.notify_all()
            stats.failures += 1
            stats.consecutive_failures += 1
            self.report.batches_failed += 1
            if len(self.report.errors) < _ERRORS_KEPT:
                self.report.errors.append(
                    {
                        "where": "batch",
                        "device": stats.name,
                        "view": VIEW_NAMES[task.view],
                        "rows": [int(row) for row in task.rows[:10]],
                        "n_rows": len(task.rows),
                        **_describe_error(error),
                    }
                )
            self.bar.total -= len(task.rows)
            logger.error("device %s: batch of %d rows failed: %r", stats.name, len(task.rows), error)
            if stats.consecutive_failures >= self.cfg.max_consecutive_failures:
                stats.retired = f"{stats.consecutive_failures} consecutive failures"
                logger.error("device %s retired after %s", stats.name, stats.retired)
                if all(w.retired for w in self.workers):
                    self._stop("all devices retired", self.clock())

    def lose(self, worker: int, task: _Task, error: BaseException) -> None:
        """`worker` is gone (its process died): retire it now and put its in-flight batch back at the head of
        its view's queue, so a surviving worker redoes those rows; with no worker left, stop (fallback)."""
        with self.lock:
            stats = self.workers[worker]
            self.in_flight[task.view, task.rows] = False
            stats.failures += 1
            stats.retired = f"worker lost: {error}"
            self.report.workers_lost += 1
            self.report.rows_requeued += len(task.rows)
            self.pending[task.view].appendleft(task)
            if len(self.report.errors) < _ERRORS_KEPT:
                self.report.errors.append(
                    {
                        "where": "worker lost",
                        "device": stats.name,
                        "view": VIEW_NAMES[task.view],
                        "n_rows": len(task.rows),
                        **_describe_error(error),
                    }
                )
            logger.error(
                "device %s lost (%s); its batch of %d rows goes back to the queue",
                stats.name,
                error,
                len(task.rows),
            )
            if all(w.retired for w in self.workers):
                self._stop("all devices retired", self.clock())
            self.changed.notify_all()

    def record_oom(self, worker: int, rows: int, length: int, new_cap: int) -> None:
        with self.lock:
            stats = self.workers[worker]
            stats.oom_retries += 1
            stats.token_cap = new_cap
            self.report.oom_events.append(
                {"device": stats.name, "rows": rows, "length": length, "new_cap": new_cap}
            )
            logger.warning(
                "device %s: out of memory on %d x %d tokens; retrying in halves", stats.name, rows, length
            )

    def record_row_oom(self, worker: int, length: int, error: BaseException) -> None:
        with self.lock:
            self.report.rows_out_of_memory += 1
            if len(self.report.errors) < _ERRORS_KEPT:
                self.report.errors.append(
                    {
                        "where": "row",
                        "device": self.workers[worker].name,
                        "length": length,
                        **_describe_error(error),
                    }
                )
            logger.error(
                "device %s: one row of %d tokens does not fit in memory alone",
                self.workers[worker].name,
                length,
            )

    def finish_worker(self, worker: int) -> None:
        with self.lock:
            idle = self.idle_since[worker]
            self.workers[worker].finished_at = (self.clock() if idle is None else idle) - self.started

    def interrupt(self) -> None:
        with self.lock:
            self.stop_requested = True
            self._stop("interrupted", self.clock())
            self.changed.notify_all()

    def close(self) -> tuple[ViewPredictions, ScheduleReport]:
        self.bar.close()
        report = self.report
        report.rows_done_per_view = [int(row_done.sum()) for row_done in self.done]
        report.padding_efficiency = self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
        report.elapsed_s = self.clock() - self.started
        return ViewPredictions(self.probs, self.done), report


def _forward_with_backoff(
    scheduler: _Scheduler,
    worker: int,
    forward: ForwardFn,
    seqs: list[list[int]],
    on_oom: Callable[[], None] | None,
) -> tuple[np.ndarray, int]:
    """Run `seqs` in chunks under the device's token cap; on OOM halve the chunk and retry the same rows.

    The cap (padded tokens per forward) is kept for the device's later batches, so one OOM is paid once, not
    on every batch of that size. A single row that does not fit comes back as NaN (not served) and is counted
    in the returned number of skipped rows.
    """
    stats = scheduler.workers[worker]
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
                scheduler.record_row_oom(worker, len(chunk[0]), error)
            else:
                scheduler.record_oom(worker, len(chunk), length, (len(chunk) // 2) * length)
        if out_of_memory:
            # Outside the except block, so the failed forward's frames (and their activations) are freed first.
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
    scheduler: _Scheduler, worker: int, forward: ForwardFn, on_oom: Callable[[], None] | None
) -> None:
    try:
        while (task := scheduler.next_task(worker)) is not None:
            seqs = [list(scheduler.sequences[task.view][row]) for row in task.rows]
            began = scheduler.clock()
            try:
                probs, skipped = _forward_with_backoff(scheduler, worker, forward, seqs, on_oom)
            except WorkerLost as error:  # the device is gone: its rows are redone by the others
                scheduler.lose(worker, task, error)
                break
            except Exception as error:  # logged and counted; the rows go to the other view or the fallback
                scheduler.fail(worker, task, error)
                continue
            scheduler.complete(worker, task, probs, scheduler.clock() - began, skipped)
    finally:
        scheduler.finish_worker(worker)


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

    `sequences[v][i]` is row i's token ids in view v (view 0 original, view 1 swapped). `deadline` is a
    `clock()` value. Never raises for a failing batch: see the module docstring.
    """
    cfg = cfg or InferenceConfig()
    if not forwards:
        raise ValueError("run_schedule needs at least one forward function (one per device)")
    if not sequences or any(len(view) != len(sequences[0]) for view in sequences):
        raise ValueError("every view must hold one token sequence per row")
    names = list(names) if names is not None else [f"device{i}" for i in range(len(forwards))]
    hooks = list(on_oom) if on_oom is not None else [None] * len(forwards)
    scheduler = _Scheduler(sequences, len(forwards), names, cfg, deadline, clock, cfg.progress)
    try:
        if len(forwards) == 1:
            _worker_loop(scheduler, 0, forwards[0], hooks[0])
        else:
            threads = [
                threading.Thread(
                    target=_worker_loop,
                    args=(scheduler, i, fn, hooks[i]),
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
        scheduler.interrupt()
        logger.error("interrupted: writing what was predicted, the rest from the fallback")
    return scheduler.close()


# ----------------------------------------------------------------------------------------------------------
# Combining views and the fallback
# ----------------------------------------------------------------------------------------------------------


def combine_views(
    views: ViewPredictions, fallback: np.ndarray, tta_space: str = "prob"
) -> tuple[np.ndarray, np.ndarray]:
    """Final (n, 3) probabilities and each row's path: both views averaged where both ran
    (`formatting.average_views` in `tta_space`), the one view that ran, else the fallback row."""

    probs, done = views.probs, views.done
    has_original = done[ORIGINAL]
    has_swapped = done[SWAPPED] if len(done) > 1 else np.zeros_like(has_original)
    final = np.array(fallback, dtype=np.float64, copy=True)
    paths = np.full(len(final), PATH_FALLBACK, dtype=object)
    final[has_original] = probs[ORIGINAL, has_original]
    paths[has_original] = PATH_ORIGINAL
    if len(done) > 1:
        unswapped = swap_probs(probs[SWAPPED])  # read back in the original order
        only_swapped = has_swapped & ~has_original
        both = has_swapped & has_original
        final[only_swapped] = unswapped[only_swapped]
        paths[only_swapped] = PATH_SWAPPED
        final[both] = average_views(probs[ORIGINAL, both], probs[SWAPPED, both], tta_space)
        paths[both] = PATH_TTA
    return final, paths


def encode_views(
    frame: Any, tokenizer: Any, format_config: Any, tta_swap: bool
) -> tuple[list[list[list[int]]], Any]:
    """The token sequences of every view (original, and the A/B-swapped one with TTA) and the original view's
    encoding (its `summary()` goes in reports): the one place both CV and `predict` format rows."""
    if tta_swap:
        original, swapped = encode_both_orders(frame, tokenizer, format_config)
        return [original.input_ids, swapped.input_ids], original
    original = encode_rows(frame, tokenizer, format_config)
    return [original.input_ids], original


@dataclass
class ScoredRows:
    """What `score_rows` returns: the final probabilities (what a submission of these rows would hold), each
    view's own probabilities (for studies of the TTA combination) and the throughput."""

    probs: np.ndarray
    views: ViewPredictions
    rows_per_s: float
    schedule: ScheduleReport


def score_rows(
    model: Any,
    tokenizer: Any,
    format_config: Any,
    frame: Any,
    cfg: InferenceConfig,
    device: str | torch.device = "cpu",
    manifest: dict | None = None,
) -> ScoredRows:
    """Predict labelled rows exactly as `predict` would: the same encoding, forward, token-budget schedule
    (`cfg.token_budget`, `cfg.max_rows_per_batch`) and view combination. Cross-validation scores the shipped
    model with this, so whatever later changes the submission's probabilities changes CV with it.

    Unlike `predict` there is no deadline and no fallback: a row that no view served raises (a CV figure with
    holes would be wrong), naming the schedule's first error. `manifest`: the artifact's (its `tta_space` and
    `calibration`, applied by `model_probabilities` as `predict` applies them)."""
    sequences, _ = encode_views(frame, tokenizer, format_config, cfg.tta_swap)
    forward = make_forward(model, _pad_id(tokenizer), str(device))
    began = time.perf_counter()
    views, schedule = run_schedule(sequences, [forward], cfg, names=[str(device)])
    elapsed = time.perf_counter() - began
    served = views.done.any(axis=0)
    if not served.all():
        first = schedule.errors[0] if schedule.errors else {"message": "no error recorded"}
        raise InferenceError(
            f"scoring left {int((~served).sum())} of {len(served)} rows unpredicted "
            f"(first error: {first.get('type', '')} {first.get('message', '')})"
        )
    if cfg.tta_swap and not views.done.all():
        raise InferenceError(
            f"scoring served only one view of {int((~views.done.all(axis=0)).sum())} rows: "
            "CV must score both TTA views as the submission would"
        )
    probs, _ = model_probabilities(views, manifest)
    rows_per_s = len(served) / elapsed if elapsed > 0 else float("nan")
    return ScoredRows(probs=probs, views=views, rows_per_s=rows_per_s, schedule=schedule)


def model_probabilities(views: ViewPredictions, manifest: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """What a model artifact predicts: its views combined in the manifest's `tta_space` ("prob" unless
    chosen otherwise on OOF), then the manifest's `calibration` (none unless fitted on OOF). Rows no view
    served are NaN, for the caller's fallback. `predict`, ensemble members and `score_rows` all go through
    here, so a post-processing step added to a manifest changes CV and the submission together."""
    manifest = manifest or {}
    probs, paths = combine_views(
        views,
        np.full((views.probs.shape[1], len(LABEL_COLUMNS)), np.nan),
        str(manifest.get("tta_space") or "prob"),
    )
    return calibrate_served(probs, manifest.get("calibration")), paths


def calibrate_served(probs: np.ndarray, calibration: dict | None) -> np.ndarray:
    """`calibration.apply_calibration` on the rows that have a prediction; NaN rows stay NaN."""
    if not calibration:
        return probs
    served = np.all(np.isfinite(probs), axis=1)
    out = probs.copy()
    if served.any():
        out[served] = apply_calibration(probs[served], calibration)
    return out


def class_prior_from_manifest(manifest: dict | None) -> np.ndarray | None:
    """`class_prior` in the manifest as [a, b, tie] or {winner_model_a|a: ..}; None when absent or unusable."""
    raw = (manifest or {}).get("class_prior")
    if raw is None:
        return None
    if isinstance(raw, dict):
        keys = [
            (column, column.removeprefix("winner_model_").removeprefix("winner_")) for column in LABEL_COLUMNS
        ]
        values = [raw.get(full, raw.get(short)) for full, short in keys]
    else:
        values = list(raw)
    try:
        prior = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if (
        prior.shape != (len(LABEL_COLUMNS),)
        or not np.all(np.isfinite(prior))
        or np.any(prior < 0)
        or prior.sum() <= 0
    ):
        return None
    return prior / prior.sum()


def fallback_predictions(
    frame: Any, n_rows: int, baseline_path: str | Path | None, manifest: dict | None
) -> tuple[np.ndarray, str, list[dict]]:
    """The cheap prediction for rows no model pass served: baseline model, else class prior, else uniform.

    Returns (probs (n, 3), source name, errors met on the way); never raises.
    """
    errors: list[dict] = []
    if baseline_path is not None and frame is not None:
        try:
            probs = np.asarray(BaselineModel.load(baseline_path).predict_proba(frame), dtype=np.float64)
            if probs.shape != (n_rows, len(LABEL_COLUMNS)) or not np.all(np.isfinite(probs)):
                raise ValueError(
                    f"baseline returned shape {probs.shape} (or non-finite values) for {n_rows} rows"
                )
            return probs, f"baseline model {baseline_path}", errors
        except Exception as error:  # the baseline is an optional helper: fall through to the prior
            errors.append({"where": "fallback baseline", **_describe_error(error)})
            logger.error("fallback baseline %s unusable (%r); using the class prior", baseline_path, error)
    prior = class_prior_from_manifest(manifest)
    if prior is not None:
        return np.tile(prior, (n_rows, 1)), "class prior from manifest", errors
    uniform = np.full(len(LABEL_COLUMNS), 1.0 / len(LABEL_COLUMNS))
    return np.tile(uniform, (n_rows, 1)), "uniform", errors


# ----------------------------------------------------------------------------------------------------------
# predict(): artifact + test file -> submission
# ----------------------------------------------------------------------------------------------------------


@dataclass
class InferenceReport:
    """Everything a silent Kaggle rerun cannot tell you; written as JSON beside the submission."""

    submission_path: str
    test_path: str
    artifact_dir: str
    dialect: str = ""  # the competition dialect the file was written in (dialects.py)
    rows: int = 0
    rows_by_path: dict[str, int] = field(default_factory=dict)
    fallback_source: str = ""
    tta_requested: bool = True
    runtime: dict = field(default_factory=dict)
    kaggle: dict = field(default_factory=dict)  # on_kaggle, competition_rerun (which run wrote this report)
    manifest: dict = field(default_factory=dict)
    data_report: dict = field(default_factory=dict)
    encoding: str = ""  # truncation summary of the original view
    schedule: dict = field(default_factory=dict)
    submission: dict = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    deadline_s: float | None = None  # seconds from predict()'s start left for the whole run
    fallback_file: str = ""  # where the early fallback submission was written (the output, or beside it)
    members: list[dict] = field(default_factory=list)  # an ensemble's members: weight, rows served, schedule
    # Rows a model predicted (an ensemble's: rows a model member served; an ensemble of baseline / prior members
    # only: rows any member served). None of them: the run's file goes beside a valid previous submission.
    model_rows: int = 0
    previous_kept: bool = False  # a valid previous submission stayed at `submission_path` (see `predict`)
    report_written: bool = False
    dtype_preflight: dict | None = None  # float16 compute only: devices.check_dtype_range on the first rows
    errors: list[dict] = field(default_factory=list)

    @property
    def nonfinite_rows(self) -> int:
        """Row views the model returned NaN/inf for (the schedule's count): the run fails (exit 1) on any."""
        return int(self.schedule.get("nonfinite_rows", 0))

    @property
    def written_path(self) -> Path:
        """The file this run's predictions are in: `submission_path`, or beside it when the previous was kept."""
        return Path(self.fallback_file if self.previous_kept else self.submission_path)

    @property
    def report_path(self) -> Path:
        return report_path_for(self.written_path)

    @property
    def fallback_rows(self) -> int:
        """Rows no model pass served (the baseline / class prior / uniform predicted them)."""
        return int(self.rows_by_path.get(PATH_FALLBACK, 0))

    def summary(self) -> str:
        """One line; it starts with the fallback count when any row fell back, the thing to see first."""
        paths = ", ".join(f"{name} {count}" for name, count in self.rows_by_path.items() if count)
        text = f"{self.written_path}: {self.rows} rows ({paths}); fallback = {self.fallback_source}"
        if self.previous_kept:
            text += f"; the valid previous {self.submission_path} kept"
        if self.fallback_rows:
            text = f"FALLBACK {self.fallback_rows} of {self.rows} rows; " + text
        if self.nonfinite_rows:
            text += f"; NON-FINITE {self.nonfinite_rows} row views"
        if self.schedule.get("tta_dropped"):
            text += f"; TTA dropped for {self.schedule['tta_rows_dropped']} row passes"
        if self.schedule.get("workers_lost"):
            text += (
                f"; {self.schedule['workers_lost']} worker process(es) lost, "
                f"{self.schedule['rows_requeued']} row passes re-queued"
            )
        if self.schedule.get("stopped"):
            text += f"; stopped: {self.schedule['stopped']}"
        if self.members:
            text += "; members: " + ", ".join(
                f"{m['name']} {m['rows_served']}/{self.rows}" for m in self.members
            )
        if self.errors:
            text += f"; {len(self.errors)} error(s), first: {self.errors[0].get('type')}: {self.errors[0].get('message')}"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def report_path_for(submission_path: str | Path) -> Path:
    path = Path(submission_path)
    return path.with_name(path.stem + ".inference.json")


def fallback_path_for(submission_path: str | Path) -> Path:
    """Where the early fallback goes while a valid previous submission is kept at the output path."""
    path = Path(submission_path)
    return path.with_name(path.stem + ".fallback" + (path.suffix or ".csv"))


def raise_if_fallback(report: InferenceReport) -> None:
    """Raise InferenceError when any row was served by the fallback, the model returned a non-finite row (it
    is never a quiet hand-off to the other view), or an ensemble member with a weight served none of the rows
    (it failed entirely: the blend shipped is not what was predicted), after the file was written; in Kaggle's
    hidden competition rerun only log it (the written file is the submission and the notebook must finish)."""
    silent = [
        member
        for member in report.members
        if member.get("weight") and not member.get("rows_served") and report.rows
    ]
    if not report.fallback_rows and not silent and not report.nonfinite_rows:
        return

    nonfinite = (
        f"the model returned non-finite probabilities (NaN/inf, e.g. float16 overflow) for "
        f"{report.nonfinite_rows} row views of {report.rows} rows"
    )
    if report.nonfinite_rows and not report.fallback_rows:
        message = f"{nonfinite}; their other view served them"
    elif report.fallback_rows:
        message = (
            f"{report.fallback_rows} of {report.rows} rows were predicted by the fallback "
            f"({report.fallback_source}), not the model"
        ) + (f"; {nonfinite}" if report.nonfinite_rows else "")
    else:
        member = silent[0]
        first = next(
            (
                error
                for error in report.errors
                if error.get("where") == f"ensemble member {member['name']}"
                or error.get("member") == member["name"]
            ),
            {},
        )
        message = (
            f"ensemble member {member['name']} served none of the {report.rows} rows "
            f"({first.get('type', 'no error recorded')}: {first.get('message', '')}); the other members "
            f"predicted them"
        )
    if report.previous_kept:
        message += (
            f"; the valid previous submission {report.submission_path} was kept; this run's file is "
            f"{report.written_path} (--write-fallback-over-previous writes it at the output instead): "
            f"{report.summary()}"
        )
    else:
        message += f"; the submission was written: {report.summary()}"
    if is_competition_rerun():
        logger.warning("competition rerun, so not failing: %s", message)
        return
    raise InferenceError(message)


def validate_inference_config(cfg: InferenceConfig) -> None:
    """Refuse settings that cannot work, before anything is written (a NaN deadline would disable the guard).
    The rules are the config's own (`config.validate_section`), re-checked here because a caller may have
    changed a field after building the config."""
    validate_section(cfg)


def predict_inputs(
    artifact_dir: str | Path | None, test_path: str | Path, fallback_path: str | Path | None = None
) -> list[tuple[str, Path]]:
    """Every file and folder `predict` reads, as (what, path) for `fileio.check_output_apart`: the test file, the
    fallback baseline and its manifest, the artifact, and an ensemble's members (a model member's folder, a
    baseline member's file and its manifest). The manifest is read leniently: one that cannot be read names
    no members (the run then falls back and says why)."""
    inputs: list[tuple[str, Path]] = [("test file", Path(test_path))]
    if fallback_path is not None:
        inputs += [
            ("fallback baseline", Path(fallback_path)),
            ("fallback baseline's manifest", baseline_manifest_path(fallback_path)),
        ]
    if artifact_dir is None:
        return inputs
    inputs.append(("artifact", Path(artifact_dir)))
    try:
        manifest = json.loads((Path(artifact_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return inputs
    if not isinstance(manifest, dict) or manifest.get("kind") != "ensemble":
        return inputs
    for index, entry in enumerate(manifest.get("members") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            continue
        path = Path(entry["path"])
        path = path if path.is_absolute() else Path(os.path.normpath(Path(artifact_dir) / path))
        name = f"ensemble member {entry.get('name') or f'members[{index}]'}"
        inputs.append((name, path))
        if not path.is_dir():  # a baseline member: its sha256 manifest beside it is read too
            inputs.append((f"{name}'s manifest", baseline_manifest_path(path)))
    return inputs


def predict(
    artifact_dir: str | Path | None,
    test_path: str | Path,
    out_path: str | Path,
    cfg: InferenceConfig | None = None,
    *,
    fallback_path: str | Path | None = None,
    data_cfg: DataConfig | None = None,
    started_at: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    runtime: Any = None,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None = None,
    dialect: str | None = None,
    fallback_over_previous: bool = False,
    input_error: BaseException | None = None,
) -> InferenceReport:
    """Write a valid submission for `test_path` with the artifact's model; see the module docstring.

    Which file a run leaves (the one rule; the CLI and the notebook follow it):

    * Refused before anything is written (UsageError, CLI exit 2): invalid settings, a device that is not
      there, unreadable test ids, and an output (the submission, its `.inference.json` report, the
      `.fallback.csv` beside it and that file's report) that is, contains or lies inside anything the run
      reads (`predict_inputs`: the test file, the fallback baseline, the artifact, every ensemble member).
    * A valid file exists from the first seconds: the fallback (baseline, else the manifest's class prior,
      else uniform) is written at `out_path`, or beside it as `<stem>.fallback.csv` when `out_path` already
      holds a valid submission for this test file (so a run killed midway leaves the previous file in place).
    * At the end the predictions are written at `out_path`, except when no row came from a model
      (`InferenceReport.model_rows == 0`: a broken artifact, every member of an ensemble's models failing,
      unreadable test rows) and `out_path` holds a valid previous submission: that file is kept and this run's
      fallback-filled file stays beside it (`report.previous_kept`, `report.written_path`), its report beside
      it. `fallback_over_previous=True` (CLI `--write-fallback-over-previous`) writes it at `out_path`
      instead, and so does Kaggle's competition rerun (KAGGLE_IS_COMPETITION_RERUN), where a valid file is
      what scores.
    * Any fallback row (or an ensemble member that served no row) is a failed run: `raise_if_fallback`, which
      the CLI (exit 1) and the notebook call after the file is written, except in the competition rerun.
    * The file cannot be written (disk full, no permission): `fileio.WriteError` naming the path (CLI: one
      line, exit 2); the previous file is intact.

    `artifact_dir` None (with `input_error`): no artifact could be chosen; every row is the fallback's.
    `input_error`: a problem met before predict (`run_submission`: finding the inputs, refused settings):
    recorded first, and no model runs.

    The competition dialect (how the test file is read, which submission file is written and validated) is
    `dialect` when given, else the manifest's `dialect` field, else LMSYS (artifacts from before the field).
    A `data_cfg` whose format is another dialect is refused.

    `started_at` (epoch seconds, e.g. the notebook's first cell) makes the deadline count time already spent.
    `clock` and `wrap_forward(forward, device_name)` are seams for tests and benchmarks (fault injection, fake
    time). Raises (UsageError, before writing anything) for invalid settings, a requested device that is not
    there, an output that is an input or not a regular file, or unreadable test ids; otherwise only when the
    file cannot be written, or after writing with `raise_after_write`. Fallback rows do not raise here: see
    `raise_if_fallback`.
    """

    cfg = cfg or InferenceConfig()
    validate_inference_config(cfg)
    use_offline_hub()  # nothing here downloads; bitsandbytes' import would otherwise ask the Hub for a kernel
    chosen = resolve_dialect(artifact_dir, dialect, test_path)
    if data_cfg is not None and data_cfg.format != chosen.name:
        raise UsageError(
            f"data format {data_cfg.format!r} but the dialect is {chosen.name!r} "
            f"({'given' if dialect else 'from the artifact manifest'}): they must agree"
        )
    out_path = Path(out_path)
    inputs = predict_inputs(artifact_dir, test_path, fallback_path)
    for output in (
        out_path,
        report_path_for(out_path),
        fallback_path_for(out_path),
        report_path_for(fallback_path_for(out_path)),
    ):
        check_output_target(output)
        check_output_apart(output, inputs)
    runtime_error: Exception | None = None
    if runtime is None:
        try:
            runtime = detect_runtime(cfg)  # a device asked for but not there: a usage error, up front
        except UsageError:
            raise
        except Exception as error:  # e.g. a CUDA driver failing to initialise: no model, but still a file
            runtime_error = error
    began = clock()
    spent_before = max(0.0, time.time() - started_at) if started_at is not None else 0.0
    budget = (cfg.deadline_hours - cfg.safety_margin_hours) * 3600.0 - spent_before
    deadline = began + budget
    report = InferenceReport(
        submission_path=str(out_path),
        test_path=str(test_path),
        artifact_dir=str(artifact_dir) if artifact_dir is not None else "",
        tta_requested=cfg.tta_swap,
        deadline_s=budget,
        dialect=chosen.name,
    )

    report.kaggle = {"on_kaggle": on_kaggle(), "competition_rerun": is_competition_rerun()}
    first_error: BaseException | None = None

    def record(where: str, error: BaseException) -> None:
        nonlocal first_error
        first_error = first_error or error
        report.errors.append({"where": where, **_describe_error(error)})
        logger.error("%s failed: %r (rows go to the fallback)", where, error)

    if input_error is not None:
        record("the inputs and settings", input_error)

    # 1. The ids every row needs, read directly; then the parsed rows (a parse failure leaves ids only).
    ids = read_test_ids(test_path)
    report.rows = len(ids)
    frame = None
    try:
        loaded = load_competition(test_path, data_cfg or chosen.data_config(), split="test")
        frame = loaded.frame
        report.data_report = loaded.report.to_dict()
        frame_ids = frame["id"].cast(pl.String).str.strip_chars().to_list()
        if frame_ids != ids.to_list():
            raise UsageError(
                f"{test_path}: parsed rows do not match the file's ids in order ({len(frame_ids)} "
                f"parsed, {len(ids)} ids)"
            )
    except Exception as error:
        record("reading test rows", error)
        frame = None
    report.timings_s["read_test"] = clock() - began

    # 2. The fallback, and a valid submission made of it before any model work.
    manifest = _read_manifest(artifact_dir, record) if artifact_dir is not None else {}
    report.manifest = {key: manifest.get(key) for key in _MANIFEST_KEYS if key in manifest}
    fallback, report.fallback_source, fallback_errors = fallback_predictions(
        frame, len(ids), fallback_path, manifest
    )
    report.errors.extend(fallback_errors)
    early = out_path
    if out_path.is_file():
        try:  # a valid submission for this test file stays in place until the new one is complete
            chosen.validate(out_path, test_path)
            early = fallback_path_for(out_path)
        except SubmissionError:
            pass  # not a valid file for this test set: the fallback replaces it at once
    chosen.write(ids, fallback, early, expected_ids=ids)
    report.fallback_file = str(early)
    views = ViewPredictions(
        np.full((1, len(ids), len(LABEL_COLUMNS)), np.nan), np.zeros((1, len(ids)), dtype=bool)
    )
    blended: BlendedRows | None = None

    # 3. Models and the schedule; any failure here leaves the fallback in place.
    if input_error is not None or artifact_dir is None:
        pass  # recorded above: nothing to run
    elif runtime_error is not None:
        record("detecting the runtime", runtime_error)
    elif frame is not None:
        try:
            if manifest.get("kind") == "ensemble":
                blended = _run_ensemble(
                    artifact_dir, manifest, frame, cfg, deadline, clock, runtime, wrap_forward, report
                )
            else:
                views = _run_models(artifact_dir, frame, cfg, deadline, clock, runtime, wrap_forward, report)
        except Exception as error:
            record("model inference", error)

    # 4. Combine, fill, write, report.
    if blended is not None:
        final, paths = fill_blend(blended, fallback)
        path_names: tuple[str, ...] = (PATH_ALL_MEMBERS, PATH_SOME_MEMBERS, PATH_FALLBACK)
    else:
        final, paths = model_probabilities(views, manifest)
        unserved = paths == PATH_FALLBACK
        final[unserved] = fallback[unserved]
        path_names = (PATH_TTA, PATH_ORIGINAL, PATH_SWAPPED, PATH_FALLBACK)
        report.model_rows = int((~unserved).sum())
    report.rows_by_path = {name: int((paths == name).sum()) for name in path_names}
    # No row from a model: a valid previous file stays (this run's file beside it), unless asked otherwise.
    report.previous_kept = (
        early != out_path
        and report.rows > 0
        and report.model_rows == 0
        and not fallback_over_previous
        and not is_competition_rerun()
    )
    submission = chosen.write(ids, final, report.written_path, expected_ids=ids)
    report.submission = submission.to_dict()
    if early != out_path and not report.previous_kept:
        for stale in (early, report_path_for(early)):  # the fallback beside, and a report an earlier run left
            with contextlib.suppress(OSError):
                stale.unlink()
    report.timings_s["total"] = clock() - began
    for error in report.schedule.get("errors", []):
        report.errors.append(error)
    _write_report(report, record)
    (logger.warning if report.fallback_rows else logger.info)(report.summary())
    if cfg.raise_after_write and (first_error is not None or report.errors):
        raise InferenceError(
            f"inference had errors (the submission was written from the fallback where needed): "
            f"{report.summary()}"
        ) from first_error
    return report


def _write_report(report: InferenceReport, record: Callable[[str, BaseException], None]) -> None:
    """The JSON report beside the submission. The submission is already complete, so a failure here is
    recorded, not raised, and a report left by an earlier run is removed (it would describe another file)."""
    path = report.report_path
    report.report_written = True  # what the file says; reset when it could not be written
    try:
        atomic_write_bytes(path, json.dumps(report.to_dict(), indent=2, default=str).encode("utf-8"))
    except Exception as error:
        report.report_written = False
        record(f"writing the report {path}", error)
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                path.unlink()


_MANIFEST_KEYS = (
    "kind",
    "members",
    "calibration",
    "tta_space",
    "ordering",
    "variant",
    "base_model",
    "quant_scheme",
    "dtype",
    "max_length",
    "template_version",
    "cv_scores",
    "package_version",
    "created_at",
    "class_prior",
    "dialect",
)


def resolve_dialect(
    artifact_dir: str | Path | None, dialect: str | None = None, test_path: str | Path | None = None
) -> Any:
    """The `Dialect` to read the test file and write the submission with: `dialect` when given, else the
    artifact manifest's (LMSYS when the field is absent). With no readable manifest (the run will fall back on
    every row and report why), the one dialect whose test file has `test_path`'s suffix (test.parquet: WSDM),
    so even that fallback file is the competition's format; else LMSYS. UsageError, before anything is
    written, for an unknown name."""
    if dialect is not None:
        return get_dialect(dialect)
    try:
        manifest = json.loads((Path(artifact_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):  # TypeError: no artifact (None)
        manifest = None
    if isinstance(manifest, dict):
        return dialect_of_manifest(manifest)
    if test_path is not None:
        suffix = Path(test_path).suffix.lower()
        matching = [name for name in dialect_names() if Path(get_dialect(name).test_file).suffix == suffix]
        if len(matching) == 1:
            return get_dialect(matching[0])
    return dialect_of_manifest(None)


def _read_manifest(artifact_dir: str | Path, record: Callable[[str, BaseException], None]) -> dict:
    """The manifest alone (cheap: the fallback needs its class prior before any model is loaded)."""
    path = Path(artifact_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return manifest
    except Exception as error:
        record(f"reading {path}", error)
        return {}


def _run_models(
    artifact_dir: str | Path,
    frame: Any,
    cfg: InferenceConfig,
    deadline: float,
    clock: Callable[[], float],
    runtime: Any,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None,
    report: InferenceReport,
) -> ViewPredictions:
    report.runtime = runtime.to_dict()
    logger.info("runtime: %s", runtime.describe())

    began = clock()
    pool: list[Any] = []
    replicas: list[Any] = []
    names = worker_names(runtime.devices)
    hooks: list[Callable[[], None] | None] = [None] * len(names)
    if runtime.kind == "tpu":
        loaded = tpu.load_plain(artifact_dir, verify_hashes=cfg.verify_hashes)
        tokenizer, format_config = loaded.tokenizer, loaded.format_config
        forwards = [tpu.make_forward(loaded.model, _pad_id(loaded.tokenizer), cfg)]
        names, hooks = ["xla"], [None]
    elif cfg.worker_backend == "process":
        tokenizer, format_config = workers.load_preprocessing(artifact_dir, verify_hashes=cfg.verify_hashes)
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
        forwards, names = list(pool), [worker.name for worker in pool]
        hooks = [None] * len(pool)  # each child empties its own CUDA cache after an OOM
    else:
        for index, device in enumerate(runtime.devices):  # the files are hashed once, by the first load
            replicas.append(
                load_artifact(
                    artifact_dir,
                    device=device,
                    compute_dtype=runtime.compute_dtype,
                    verify_hashes=cfg.verify_hashes and index == 0,
                )
            )
        tokenizer, format_config = replicas[0].tokenizer, replicas[0].format_config
        forwards = [
            make_forward(rep.model, _pad_id(rep.tokenizer), device)
            for rep, device in zip(replicas, runtime.devices, strict=True)
        ]
        hooks = [_empty_cache_hook(device) for device in runtime.devices]
    report.timings_s["load_models"] = clock() - began

    try:
        began = clock()
        encoded, original = encode_views(frame, tokenizer, format_config, cfg.tta_swap)
        report.encoding = original.summary()
        report.timings_s["encode"] = clock() - began
        if runtime.compute_dtype == torch.float16 and replicas:  # refused here, not as NaN rows later
            report.dtype_preflight = preflight_dtype(
                replicas[0].model,
                _pad_id(tokenizer),
                runtime.devices[0],
                encoded[0][:PREFLIGHT_ROWS],
                "inference.compute_dtype",
            )

        if wrap_forward is not None:
            forwards = [wrap_forward(fn, name) for fn, name in zip(forwards, names, strict=True)]
        began = clock()
        views, schedule = run_schedule(
            encoded, forwards, cfg, deadline=deadline, clock=clock, names=names, on_oom=hooks
        )
        report.timings_s["schedule"] = clock() - began
        report.schedule = schedule.to_dict()
    finally:
        for worker in pool:
            worker.close()
    return views


# ----------------------------------------------------------------------------------------------------------
# Ensembles: several members, each predicted through `_run_models`, blended by the manifest's weights
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EnsembleMember:
    """One member of an ensemble artifact: a model artifact folder, a feature-baseline JSON file, or a class
    prior (a constant row: blended with a model it shrinks over-confident predictions; alone it is what small
    data can make the best thing to ship)."""

    name: str
    kind: str  # "model" | "baseline" | "prior"
    weight: float
    path: Path | None = None
    prior: tuple[float, ...] | None = None
    tta_space: str | None = None  # a model member's TTA space, chosen on OOF (else its own manifest's)

    @property
    def is_model(self) -> bool:
        return self.kind == "model"

    def cost(self) -> int:
        """Bytes on disk: the proxy for a member's time per token (a 9B model costs more than a 2B one)."""
        if not self.is_model or self.path is None:
            return 0
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


MEMBER_KINDS = ("model", "baseline", "prior")


def fill_blend(blended: BlendedRows, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blend where some member served a row, `fallback` elsewhere; and each row's path name."""
    final = np.array(fallback, dtype=np.float64, copy=True)
    paths = np.full(len(final), PATH_FALLBACK, dtype=object)
    some = blended.members_served > 0
    final[some] = blended.probs[some]
    paths[some] = PATH_SOME_MEMBERS
    paths[blended.members_served == blended.n_members] = PATH_ALL_MEMBERS
    return final, paths


def ensemble_members(
    ensemble_dir: str | Path, manifest: dict, verify_hashes: bool = True
) -> list[EnsembleMember]:
    """The members the manifest names: `kind` model (an artifact folder), baseline (a baseline JSON file) or
    prior (`prior`: three probabilities); paths relative to the ensemble folder, or absolute. A member without
    `kind` is a baseline when its path is a file, else a model. A manifest with a `files` table (a
    self-contained ensemble, `ship.write_shipped`) is checked first: members inside the folder, every file
    listed and matching its sha256 unless `verify_hashes` is off (`artifacts.check_ensemble_manifest`, an
    ArtifactError naming the file)."""
    where = Path(ensemble_dir) / MANIFEST_NAME
    if "files" in manifest:
        check_ensemble_manifest(ensemble_dir, manifest, verify_hashes=verify_hashes)
    members = []
    for index, entry in enumerate(manifest.get("members") or []):
        try:
            weight = float(entry["weight"])
            path = Path(entry["path"]) if entry.get("path") else None
            if path is not None and not path.is_absolute():
                path = Path(ensemble_dir) / path
            kind = entry.get("kind") or ("baseline" if path is not None and path.is_file() else "model")
            prior = tuple(float(v) for v in entry["prior"]) if kind == "prior" else None
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"{where}: members[{index}] is malformed ({error!r})") from error
        if kind not in MEMBER_KINDS:
            raise UsageError(f"{where}: members[{index}].kind {kind!r} is not one of {list(MEMBER_KINDS)}")
        if not (math.isfinite(weight) and weight >= 0):
            raise UsageError(f"{where}: members[{index}].weight must be >= 0 and finite, got {weight}")
        if kind != "prior" and path is None:
            raise UsageError(f"{where}: members[{index}] ({kind}) needs a path")
        if prior is not None and (len(prior) != len(LABEL_COLUMNS) or min(prior) < 0 or sum(prior) <= 0):
            raise UsageError(
                f"{where}: members[{index}].prior must be {len(LABEL_COLUMNS)} non-negative numbers"
            )
        tta_space = entry.get("tta_space")
        if tta_space is not None and tta_space not in TTA_SPACES:
            raise UsageError(f"{where}: members[{index}].tta_space must be one of {list(TTA_SPACES)}")
        members.append(
            EnsembleMember(
                name=str(entry.get("name") or (path.name if path else kind)),
                kind=kind,
                weight=weight,
                path=path,
                prior=prior,
                tta_space=tta_space,
            )
        )
    if not members or sum(m.weight for m in members) <= 0:
        raise UsageError(f"{where}: an ensemble needs members with positive weight")
    if not math.isfinite(sum(m.weight for m in members)):
        raise UsageError(
            f"{where}: the members' weights sum to inf (not finite): "
            f"{[m.weight for m in members]}; give weights that sum to a finite number (e.g. 1)"
        )
    names = [m.name for m in members]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"{where}: member names must be unique, repeated: {repeated}")
    return members


def _run_ensemble(
    ensemble_dir: str | Path,
    manifest: dict,
    frame: Any,
    cfg: InferenceConfig,
    deadline: float,
    clock: Callable[[], float],
    runtime: Any,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None,
    report: InferenceReport,
) -> BlendedRows:
    """Predict every member and blend. Baseline members first (cheap, every row); model members cheapest first
    under the one deadline, so when time runs short it is the most expensive member whose TTA, then rows, the
    time guard drops; its rows are then blended from the members that served them. A member that fails is
    recorded and left out of its rows' blend. With `ensemble_layout="member_per_device"` and at least one
    device per model member, members run side by side, one (or more) devices each, under the same deadline."""
    members = ensemble_members(ensemble_dir, manifest, verify_hashes=cfg.verify_hashes)
    # a self-contained ensemble's files were all checked just now: its model members are not hashed again
    member_cfg = dataclasses.replace(cfg, verify_hashes=False) if "files" in manifest else cfg
    n_rows = frame.height
    probs: dict[str, np.ndarray] = {}
    member_reports: dict[str, InferenceReport] = {}
    nonfinite: dict[str, int] = {}  # members' rows that were not finite (a NaN prior, a broken baseline)

    def run_member(member: EnsembleMember, member_runtime: Any) -> None:
        member_report = InferenceReport(
            submission_path=report.submission_path,
            test_path=report.test_path,
            artifact_dir=str(member.path or member.kind),
        )
        member_reports[member.name] = member_report
        probs[member.name] = np.full((n_rows, len(LABEL_COLUMNS)), np.nan)
        try:
            if member.kind == "prior":
                prior = np.asarray(member.prior, dtype=np.float64)
                probs[member.name] = np.tile(prior / prior.sum(), (n_rows, 1))
                nonfinite[member.name] = _record_nonfinite(
                    member, probs[member.name], member_report, f"prior {list(member.prior)} is not finite"
                )
                return
            if member.kind == "baseline":
                predicted = np.asarray(BaselineModel.load(member.path).predict_proba(frame), dtype=np.float64)
                if predicted.shape != (n_rows, len(LABEL_COLUMNS)):
                    raise ValueError(f"baseline member returned shape {predicted.shape} for {n_rows} rows")
                probs[member.name] = predicted
                bad = ~np.all(np.isfinite(predicted), axis=1)
                if bad.any():
                    nonfinite[member.name] = _record_nonfinite(
                        member,
                        predicted,
                        member_report,
                        f"{member.path} predicted non-finite probabilities "
                        f"(first id {frame['id'][int(np.argmax(bad))]})",
                    )
                return
            views = _run_models(
                member.path, frame, member_cfg, deadline, clock, member_runtime, wrap_forward, member_report
            )
            member_manifest = json.loads((member.path / MANIFEST_NAME).read_text(encoding="utf-8"))
            if member.tta_space:
                member_manifest = {**member_manifest, "tta_space": member.tta_space}
            probs[member.name], _ = model_probabilities(views, member_manifest)
        except Exception as error:  # the other members still serve these rows
            member_report.errors.append({"where": f"ensemble member {member.name}", **_describe_error(error)})
            logger.error(
                "ensemble member %s failed: %r (its rows are blended from the others)", member.name, error
            )

    models = sorted((m for m in members if m.is_model), key=EnsembleMember.cost)
    for member in (m for m in members if not m.is_model):
        run_member(member, runtime)
    layout = cfg.ensemble_layout
    if layout == "member_per_device" and (len(runtime.devices) < len(models) or runtime.kind == "tpu"):
        logger.warning(
            "ensemble_layout member_per_device needs a device per model member (%d members, %d "
            "devices): running them one after the other",
            len(models),
            len(runtime.devices),
        )
        layout = "sequential (member_per_device needs a device per member)"
    if layout == "member_per_device":
        threads = [
            threading.Thread(
                target=run_member,
                daemon=True,
                name=f"member-{member.name}",
                args=(member, dataclasses.replace(runtime, devices=runtime.devices[i :: len(models)])),
            )
            for i, member in enumerate(models)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    else:
        for member in models:
            run_member(member, runtime)

    blended = blend_members([probs[m.name] for m in members], [m.weight for m in members])
    weighted = [m for m in members if m.weight > 0]
    counted = [
        m for m in weighted if m.is_model
    ] or weighted  # no model member: what ships is the blend itself
    report.model_rows = int(
        np.any([np.all(np.isfinite(probs[m.name]), axis=1) for m in counted], axis=0).sum()
    )
    blended.probs = calibrate_served(blended.probs, manifest.get("calibration"))  # the blend's own, if fitted
    report.runtime = runtime.to_dict()
    report.schedule = {"ensemble_layout": layout}
    for member in members:
        served = np.all(np.isfinite(probs[member.name]), axis=1)
        member_report = member_reports[member.name]
        report.members.append(
            {
                "name": member.name,
                "path": str(member.path) if member.path else None,
                "weight": member.weight,
                "kind": member.kind,
                "rows_served": int(served.sum()),
                "rows_nonfinite": nonfinite.get(member.name, 0),
                "schedule": member_report.schedule,
                "timings_s": member_report.timings_s,
            }
        )
        report.errors.extend(member_report.errors)
        for error in member_report.schedule.get("errors", []):
            report.errors.append({"member": member.name, **error})
    return blended


def _record_nonfinite(
    member: EnsembleMember, probs: np.ndarray, member_report: InferenceReport, what: str
) -> int:
    """Count a member's non-finite rows (left out of their blend, like rows it did not serve), record why in
    its errors, and return the count."""
    bad = int((~np.all(np.isfinite(probs), axis=1)).sum())
    if not bad:
        return 0
    message = f"{what}: left out of the blend of {bad} of {len(probs)} rows"
    member_report.errors.append(
        {"where": f"ensemble member {member.name}", "type": "NonFiniteProbabilities", "message": message}
    )
    logger.error("ensemble member %s: %s", member.name, message)
    return bad


def worker_names(devices: Sequence[str]) -> list[str]:
    """One report name per device: the device itself, numbered when it repeats (several CPU replicas)."""
    if len(set(devices)) == len(devices):
        return list(devices)
    return [f"{device}#{index}" for index, device in enumerate(devices)]


def _empty_cache_hook(device: str) -> Callable[[], None] | None:
    if not device.startswith("cuda"):
        return None

    def empty_cache() -> None:

        gc.collect()
        with torch.cuda.device(device):
            torch.cuda.empty_cache()

    return empty_cache


def run_submission(
    input_root: str | Path | None = None,
    *,
    artifact_dir: str | Path | None = None,
    test_path: str | Path | None = None,
    out_path: str | Path | None = None,
    cfg: InferenceConfig | Mapping[str, Any] | None = None,
    fallback_path: str | Path | None = None,
    artifact_hint: str | None = None,
    test_hint: str | None = None,
    started_at: float | None = None,
    fail_on_fallback: bool = True,
    dialect: str | None = None,
    fallback_over_previous: bool = False,
) -> InferenceReport:
    """The submission notebook's one call: find what is not given under `input_root` (see
    `runtime.find_inputs`: a given `artifact_dir` / `test_path` is used as it is, never searched for; hints are
    whole names in the path), default the output to /kaggle/working/submission.csv on Kaggle (else
    submissions/submission.csv), predict, and validate the written file against the test file.

    `cfg`: an `InferenceConfig`, or its fields as a mapping (the notebook's parameters), built here so that
    refused settings are handled like any other failure below. Whatever fails before the model runs (no
    artifact or several and none chosen, refused settings or dialect), a valid file is written first when the
    test file is known (every row from the fallback: the given or found baseline, else the artifact's class
    prior, else uniform; `predict`'s rules on a previous file hold), then the error is raised with
    "; a fallback submission (...) was written to <path>" added, except in Kaggle's competition rerun, where
    it is logged and the report returned (the file is what scores). Without a test file nothing can be
    written, and the error is raised at once.

    With `fail_on_fallback` it then raises (`raise_if_fallback`) when any row fell back, except in the
    competition rerun; the notebook passes False, prints the summary, then calls `raise_if_fallback` itself.
    `dialect` None: the artifact manifest's (LMSYS or WSDM: which test file is read and which submission
    file is written and validated). `fallback_over_previous`: see `predict`."""

    use_offline_hub()
    out_path = Path(out_path) if out_path is not None else default_submission_path()
    problem: UsageError | None = None
    try:
        cfg = _inference_config(cfg)
    except UsageError as error:
        problem, cfg = error, None
    if artifact_dir is None or test_path is None:
        try:
            found = find_inputs(
                input_root,
                artifact_hint=artifact_hint,
                test_hint=test_hint,
                artifact_dir=artifact_dir,
                test_path=test_path,
            )
            logger.info("found: %s", found.describe())
            artifact_dir, test_path = found.artifact_dir, found.test_path
            fallback_path = fallback_path or found.baseline_path
        except UsageError as error:
            problem = problem or error
            if test_path is None:
                test_path = find_test_file(input_root, test_hint)  # without it no file can be written
    if problem is None:
        try:
            report = predict(
                artifact_dir,
                test_path,
                out_path,
                cfg,
                fallback_path=fallback_path,
                started_at=started_at,
                dialect=dialect,
                fallback_over_previous=fallback_over_previous,
            )
        except UsageError as error:  # refused before anything was written (or the file could not be written)
            problem = error
    if problem is not None:
        try:
            report = predict(
                artifact_dir,
                test_path,
                out_path,
                InferenceConfig(device="cpu", progress=False),
                fallback_path=fallback_path,
                started_at=started_at,
                dialect=dialect if dialect in dialect_names() else None,
                fallback_over_previous=fallback_over_previous,
                input_error=problem,
            )
        except UsageError as error:  # e.g. the output itself refused: nothing can be written
            raise problem from error
        resolve_dialect(artifact_dir, report.dialect, test_path).validate(report.written_path, test_path)
        message = f"{problem}; a fallback submission ({report.fallback_source}) was written to {report.written_path}"
        if is_competition_rerun():
            logger.error("competition rerun, so not failing: %s", message)
            return report
        raise type(problem)(message) from problem
    resolve_dialect(artifact_dir, report.dialect, test_path).validate(report.written_path, test_path)
    if fail_on_fallback:
        raise_if_fallback(report)
    return report


def _inference_config(cfg: InferenceConfig | Mapping[str, Any] | None) -> InferenceConfig:
    """`cfg` as an InferenceConfig: None -> the defaults; a mapping -> its fields (unknown names refused)."""
    if cfg is None or isinstance(cfg, InferenceConfig):
        return cfg or InferenceConfig()
    known = {f.name for f in dataclasses.fields(InferenceConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UsageError(f"unknown inference settings {unknown} (known: {sorted(known)})")
    return InferenceConfig(**cfg)
