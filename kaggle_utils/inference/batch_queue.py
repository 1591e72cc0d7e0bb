"""The schedule's shared state: the queue of token-budget batches per view, the time guard that drops TTA or
stops before the deadline, the progress bar, and the per-device bookkeeping that becomes `ScheduleReport`.
Every `BatchQueue` method holds its lock; `schedule.run_schedule` drives it from one thread per device."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from kaggle_utils.core.config import LABEL_COLUMNS, InferenceConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.inference.device_forward import describe_error
from kaggle_utils.inference.views import ORIGINAL, VIEW_NAMES, ViewPredictions
from kaggle_utils.text.batching import token_budget_batches

logger = logging.getLogger(__name__)

ERRORS_KEPT = 20  # errors the report keeps (a run failing on every batch would otherwise fill it)


@dataclass
class Task:
    """One batch: rows of one view, and its padded token count (rows x longest row)."""

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
    nonfinite_rows: int = 0  # rows the model returned NaN/inf for (fp16 overflow): other view, exit 1
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
        """The report as JSON-ready data, each device's measured rate added."""
        data = asdict(self)
        for worker, stats in zip(data["workers"], self.workers, strict=True):
            worker["rate_tokens_per_s"] = stats.rate
        return data


class BatchQueue:
    """Shared queue of token-budget batches (longest first), the time guard, and the bookkeeping; every public
    method holds the lock. Build one per schedule; `close()` returns what was predicted and the report."""

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

        self.pending: list[deque[Task]] = []
        for view, seqs in enumerate(sequences):
            lengths = [len(seq) for seq in seqs]
            batches = token_budget_batches(lengths, cfg.token_budget, cfg.max_rows_per_batch)
            tasks = [
                Task(view, list(rows), len(rows) * max(lengths[r] for r in rows)) for rows in batches if rows
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
        """Padded tokens still queued in `views`."""
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
            kept: deque[Task] = deque()
            for task in self.pending[ORIGINAL]:
                rows = [row for row in task.rows if not covered[row]]
                dropped += len(task.rows) - len(rows)
                if rows:
                    kept.append(Task(ORIGINAL, rows, len(rows) * max(lengths[r] for r in rows)))
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
        """Empty every queue (its rows go to the fallback) and record why and when, once."""
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
        """The time guard: stop at the deadline; drop TTA passes when the projection overruns it."""
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
    def next_task(self, worker: int) -> Task | None:
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

    def complete(self, worker: int, task: Task, probs: np.ndarray, seconds: float, skipped: int = 0) -> None:
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

    def fail(self, worker: int, task: Task, error: BaseException) -> None:
        """A batch raised: record it; retire the device after `max_consecutive_failures` in a row."""
        with self.lock:
            stats = self.workers[worker]
            self.in_flight[task.view, task.rows] = False
            self.changed.notify_all()
            stats.failures += 1
            stats.consecutive_failures += 1
            self.report.batches_failed += 1
            if len(self.report.errors) < ERRORS_KEPT:
                self.report.errors.append(
                    {
                        "where": "batch",
                        "device": stats.name,
                        "view": VIEW_NAMES[task.view],
                        "rows": [int(row) for row in task.rows[:10]],
                        "n_rows": len(task.rows),
                        **describe_error(error),
                    }
                )
            self.bar.total -= len(task.rows)
            logger.error("device %s: batch of %d rows failed: %r", stats.name, len(task.rows), error)
            if stats.consecutive_failures >= self.cfg.max_consecutive_failures:
                stats.retired = f"{stats.consecutive_failures} consecutive failures"
                logger.error("device %s retired after %s", stats.name, stats.retired)
                if all(w.retired for w in self.workers):
                    self._stop("all devices retired", self.clock())

    def lose(self, worker: int, task: Task, error: BaseException) -> None:
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
            if len(self.report.errors) < ERRORS_KEPT:
                self.report.errors.append(
                    {
                        "where": "worker lost",
                        "device": stats.name,
                        "view": VIEW_NAMES[task.view],
                        "n_rows": len(task.rows),
                        **describe_error(error),
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
        """`worker` ran out of memory on `rows` x `length` tokens: from now on it runs at most `new_cap`."""
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
        """One row of `length` tokens did not fit in memory alone."""
        with self.lock:
            self.report.rows_out_of_memory += 1
            if len(self.report.errors) < ERRORS_KEPT:
                self.report.errors.append(
                    {
                        "where": "row",
                        "device": self.workers[worker].name,
                        "length": length,
                        **describe_error(error),
                    }
                )
            logger.error(
                "device %s: one row of %d tokens does not fit in memory alone",
                self.workers[worker].name,
                length,
            )

    def finish_worker(self, worker: int) -> None:
        """`worker` stopped: its finish time is when it went idle, not when the last batch elsewhere ended."""
        with self.lock:
            idle = self.idle_since[worker]
            self.workers[worker].finished_at = (self.clock() if idle is None else idle) - self.started

    def interrupt(self) -> None:
        """Ctrl-C: stop handing out batches; what was predicted is kept."""
        with self.lock:
            self.stop_requested = True
            self._stop("interrupted", self.clock())
            self.changed.notify_all()

    def close(self) -> tuple[ViewPredictions, ScheduleReport]:
        """Close the progress bar and return the predictions and the finished report."""
        self.bar.close()
        report = self.report
        report.rows_done_per_view = [int(row_done.sum()) for row_done in self.done]
        report.padding_efficiency = self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
        report.elapsed_s = self.clock() - self.started
        return ViewPredictions(self.probs, self.done), report
