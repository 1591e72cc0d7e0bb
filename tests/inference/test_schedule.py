"""The scheduling engine with fake devices and a fake clock: token-budget batches over devices, out-of-memory
backoff, the time guard, failing and lost devices, and TTA through the real formatting."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
import torch
from builders import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaggle_utils.core.config import FormatConfig, InferenceConfig
from kaggle_utils.inference.device_forward import WorkerLost
from kaggle_utils.inference.schedule import run_schedule
from kaggle_utils.inference.views import PATH_FALLBACK, PATH_SWAPPED, PATH_TTA, combine_views
from kaggle_utils.text.batching import padding_efficiency, token_budget_batches
from kaggle_utils.text.encode import encode_both_orders
from kaggle_utils.text.swap import swap_frame, swap_probs

SWAP_MARKER = (
    1  # first token of every swapped-view sequence in the fake data, so a fake device can tell views
)


# fakes: a deterministic model, devices that fail on cue, token views


def fake_probs(seq) -> np.ndarray:
    """A deterministic, position-asymmetric 'model' of one row (depends on every token and the length)."""
    seq = np.asarray(seq, dtype=np.float64)
    logits = np.array([np.sin(seq).sum(), np.cos(seq[::2]).sum(), len(seq) / 50.0])
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


class FakeDevice:
    """forward(list of token lists) -> probs, recording calls; optional fake cost, OOM and failures."""

    def __init__(
        self,
        clock=None,
        seconds_per_token=0.0,
        sleep_per_token=0.0,
        oom_above=None,
        fail_calls=(),
        always_fail=False,
    ):
        self.clock, self.seconds_per_token, self.sleep_per_token = clock, seconds_per_token, sleep_per_token
        self.oom_above, self.fail_calls, self.always_fail = oom_above, set(fail_calls), always_fail
        self.calls: list[list[list[int]]] = []
        self.tokens = 0

    def __call__(self, seqs):
        self.calls.append([list(seq) for seq in seqs])
        padded = len(seqs) * max(len(seq) for seq in seqs)
        if self.always_fail or len(self.calls) in self.fail_calls:
            raise ValueError(f"fake failure on call {len(self.calls)}")
        if self.oom_above is not None and padded > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        if self.clock is not None:
            self.clock.advance(padded * self.seconds_per_token)
        if self.sleep_per_token:
            time.sleep(padded * self.sleep_per_token)
        self.tokens += padded
        return np.stack([fake_probs(seq) for seq in seqs])


def make_views(n: int = 120, seed: int = 0, tta: bool = True) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 120, size=n)
    original = [rng.integers(3, 1000, size=length).tolist() for length in lengths]
    views = [original]
    if tta:
        views.append([[SWAP_MARKER, *seq[::-1][:-1]] for seq in original])  # same length, different tokens
    return views


def engine_cfg(**overrides) -> InferenceConfig:
    values = {"token_budget": 512, "max_rows_per_batch": 16, "warmup_batches": 1, "progress": False}
    return InferenceConfig(**{**values, **overrides})


def expected(views) -> np.ndarray:
    return np.stack([[fake_probs(seq) for seq in view] for view in views])


def test_every_row_is_served_once_per_view_longest_first():
    views = make_views()
    device = FakeDevice()
    result, report = run_schedule(views, [device], engine_cfg())
    assert result.done.all()
    np.testing.assert_allclose(result.probs, expected(views))
    assert report.batches_done == report.batches_planned and report.batches_failed == 0
    assert sum(len(call) for call in device.calls) == 2 * len(views[0])
    first_lengths = [max(len(seq) for seq in call) for call in device.calls[: len(device.calls) // 2]]
    assert first_lengths == sorted(first_lengths, reverse=True)  # original view, longest batch first
    lengths = [len(seq) for seq in views[0]]
    planned = token_budget_batches(lengths, 512, 16)
    assert report.padding_efficiency == pytest.approx(padding_efficiency(lengths, planned))


def test_two_devices_split_the_work_by_tokens_and_each_row_runs_once():
    views = make_views(n=200)
    devices = [FakeDevice(sleep_per_token=2e-6), FakeDevice(sleep_per_token=2e-6)]
    result, report = run_schedule(views, devices, engine_cfg(), names=["cuda:0", "cuda:1"])
    assert result.done.all()
    np.testing.assert_allclose(result.probs, expected(views))
    seen = sorted(tuple(seq) for device in devices for call in device.calls for seq in call)
    assert seen == sorted(tuple(seq) for view in views for seq in view)  # no row twice, none missing
    shares = [device.tokens / sum(d.tokens for d in devices) for device in devices]
    assert min(shares) > 0.3, shares  # a shared queue keeps both busy; a dead split would give ~0
    assert [w.name for w in report.workers] == ["cuda:0", "cuda:1"]


def test_view_per_device_layout_starts_each_device_on_its_own_view():
    views = make_views(n=100)
    devices = [FakeDevice(sleep_per_token=1e-6), FakeDevice(sleep_per_token=1e-6)]
    result, _ = run_schedule(views, devices, engine_cfg(layout="view_per_device"))
    assert result.done.all()
    np.testing.assert_allclose(result.probs, expected(views))
    assert all(seq[0] != SWAP_MARKER for seq in devices[0].calls[0])  # GPU0: original order
    assert all(seq[0] == SWAP_MARKER for seq in devices[1].calls[0])  # GPU1: swapped order


def test_out_of_memory_halves_the_batch_and_retries_the_same_rows():
    views = make_views(n=150, tta=False)
    device = FakeDevice(oom_above=200)
    result, report = run_schedule(views, [device], engine_cfg(token_budget=1024, max_rows_per_batch=64))
    served = result.done[0]
    lengths = np.array([len(seq) for seq in views[0]])
    assert served[lengths <= 200].all()  # everything that fits in memory alone was served, exactly
    np.testing.assert_allclose(result.probs[0, served], expected(views)[0, served])
    assert report.oom_events and report.workers[0].oom_retries == len(report.oom_events)
    assert report.workers[0].token_cap is not None and report.workers[0].token_cap <= 200
    # The smaller size is remembered: far fewer OOMs than batches.
    assert len(report.oom_events) < report.batches_done / 2


def test_a_row_too_big_even_alone_is_a_logged_failure_not_a_crash():
    views = [[[5] * 300, [6] * 10, [7] * 12]]
    result, report = run_schedule(views, [FakeDevice(oom_above=200)], engine_cfg(token_budget=4096))
    assert result.done[0].tolist() == [False, True, True]  # the others in its batch are still served
    assert report.rows_out_of_memory == 1 and report.batches_failed == 0 and report.nonfinite_rows == 0
    assert report.errors[0]["where"] == "row" and report.errors[0]["type"] == "OutOfMemoryError"


def test_time_guard_drops_tta_when_the_projection_overruns():
    views = make_views(n=150)
    clock = FakeClock()
    cost = 1e-3
    lengths = [len(seq) for seq in views[0]]
    original_tokens = sum(len(b) * max(lengths[r] for r in b) for b in token_budget_batches(lengths, 512, 16))
    deadline = clock() + original_tokens * cost * 1.3  # room for the original view, not for both
    device = FakeDevice(clock=clock, seconds_per_token=cost)
    result, report = run_schedule(views, [device], engine_cfg(), deadline=deadline, clock=clock)
    assert report.tta_dropped and report.tta_rows_dropped > 0
    assert result.done[0].all()  # the original view still covers every row
    assert result.done[1].sum() + report.tta_rows_dropped == len(lengths)
    assert not report.stopped and clock() <= deadline
    # Swapped passes are dropped longest first, so the time left keeps TTA for as many rows as possible.
    kept, dropped = np.array(lengths)[result.done[1]], np.array(lengths)[~result.done[1]]
    assert len(kept) > 0 and kept.max() <= dropped.min()


def test_time_guard_stops_before_the_deadline_and_leaves_the_rest_to_the_fallback():
    views = make_views(n=150)
    clock = FakeClock()
    cost = 1e-3
    lengths = [len(seq) for seq in views[0]]
    original_tokens = sum(len(b) * max(lengths[r] for r in b) for b in token_budget_batches(lengths, 512, 16))
    deadline = clock() + original_tokens * cost * 0.5
    device = FakeDevice(clock=clock, seconds_per_token=cost)
    result, report = run_schedule(views, [device], engine_cfg(), deadline=deadline, clock=clock)
    assert report.tta_dropped and report.stopped == "deadline"
    assert clock() <= deadline  # no batch was started that could not end in time (the fake rate is exact)
    served = int(result.done.any(axis=0).sum())
    assert 0 < served < len(lengths)
    assert report.rows_not_reached == len(lengths) - served
    final, paths = combine_views(result, np.full((len(lengths), 3), 1 / 3))
    assert (paths == PATH_FALLBACK).sum() == len(lengths) - served
    np.testing.assert_allclose(final.sum(axis=1), 1.0)


def test_deadline_already_passed_runs_nothing():
    clock = FakeClock()
    device = FakeDevice()
    result, report = run_schedule(make_views(20), [device], engine_cfg(), deadline=clock() - 1, clock=clock)
    assert not device.calls and not result.done.any() and report.stopped == "deadline"


def test_an_exception_in_a_batch_is_logged_and_the_rest_still_served():
    views = make_views(n=100)
    device = FakeDevice(fail_calls={2})
    result, report = run_schedule(views, [device], engine_cfg())
    failed_rows = len(device.calls[1])
    assert report.batches_failed == 1 and report.errors[0]["type"] == "ValueError"
    assert report.errors[0]["view"] == "original" and "fake failure" in report.errors[0]["message"]
    assert result.done[0].sum() == 100 - failed_rows and result.done[1].all()
    final, paths = combine_views(result, np.full((100, 3), 1 / 3))
    assert (paths == PATH_SWAPPED).sum() == failed_rows  # the other view covers them


def test_a_failing_device_is_retired_and_the_other_finishes_the_work():
    views = make_views(n=100)
    devices = [FakeDevice(always_fail=True), FakeDevice(sleep_per_token=1e-6)]
    result, report = run_schedule(views, devices, engine_cfg(max_consecutive_failures=2))
    assert report.workers[0].retired and not report.workers[1].retired
    assert report.batches_failed == 2
    failed = {tuple(seq) for call in devices[0].calls for seq in call}
    served = {
        tuple(seq)
        for view, done in zip(views, result.done, strict=True)
        for seq, ok in zip(view, done, strict=True)
        if ok
    }
    assert len(served) == 200 - len(failed)


class LosingDevice(FakeDevice):
    """A device whose worker process dies during call `lost_on` (after `delay` s): raises WorkerLost there."""

    def __init__(self, lost_on=1, delay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.lost_on, self.delay = lost_on, delay

    def __call__(self, seqs):
        if len(self.calls) + 1 >= self.lost_on:
            self.calls.append([list(seq) for seq in seqs])
            time.sleep(self.delay)
            raise WorkerLost("worker process cpu#0 (pid 1) exited with code -9 (fake)")
        return super().__call__(seqs)


def test_a_lost_worker_s_batch_is_redone_by_the_other_device_even_after_its_queue_ran_dry():
    """The lost batch comes back after the healthy device emptied the queue: it must wait, not leave."""
    views = make_views(60)
    devices = [LosingDevice(lost_on=1, delay=0.5), FakeDevice()]
    result, report = run_schedule(views, devices, engine_cfg(), names=["cpu#0", "cpu#1"])
    assert result.done.all()
    np.testing.assert_allclose(result.probs, expected(views), atol=1e-12)
    lost = len(devices[0].calls[0])
    assert report.workers_lost == 1 and report.rows_requeued == lost and report.batches_failed == 0
    assert report.workers[0].retired.startswith("worker lost") and report.workers[0].batches == 0
    assert report.workers[1].rows == 2 * 60 and not report.stopped
    assert [error["where"] for error in report.errors] == ["worker lost"]


def test_a_device_waiting_for_the_others_in_flight_batches_reports_when_its_own_work_ended():
    """finished_at feeds the benchmarks' tail-idle share: the wait for others' batches is idle time."""
    views = make_views(40)
    devices = [FakeDevice(sleep_per_token=4e-4), FakeDevice()]  # device0's first batch alone takes ~0.4 s
    _, report = run_schedule(views, devices, engine_cfg(token_budget=1024))
    slow, fast = report.workers
    assert slow.batches >= 1 and fast.batches > slow.batches
    assert slow.finished_at - fast.finished_at > 0.2


def test_every_worker_lost_stops_and_leaves_the_rows_to_the_fallback():
    views = make_views(40)
    devices = [LosingDevice(lost_on=2), LosingDevice(lost_on=3)]
    result, report = run_schedule(views, devices, engine_cfg())
    assert report.workers_lost == 2 and report.stopped == "all devices retired"
    assert report.rows_not_reached == 2 * 40 - int(result.done.sum()) and not result.done.all()


def test_all_devices_failing_stops_and_leaves_everything_to_the_fallback():
    result, report = run_schedule(make_views(50), [FakeDevice(always_fail=True)], engine_cfg())
    assert not result.done.any() and report.stopped == "all devices retired" and report.rows_not_reached > 0


texts = st.text(alphabet=st.sampled_from(list("abcdefghij klmnop.,?!\n")), min_size=0, max_size=80)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 2), texts, texts, texts), min_size=1, max_size=6))
def test_property_tta_prediction_of_a_swapped_row_is_the_swapped_prediction(demo_tokenizer, rows):
    """Through the real formatting and the engine, with an asymmetric fake model: f(swap(x)) = swap(f(x))."""
    frame = pl.DataFrame(
        {
            "id": list(range(len(rows))),
            "prompt": [[p] * turns for turns, p, _, _ in rows],
            "response_a": [[a] * turns for turns, _, a, _ in rows],
            "response_b": [[b] * turns for turns, _, _, b in rows],
        },
        schema={
            "id": pl.Int64,
            "prompt": pl.List(pl.String),
            "response_a": pl.List(pl.String),
            "response_b": pl.List(pl.String),
        },
    )
    fmt = FormatConfig(max_length=160)

    def tta_predict(f: pl.DataFrame) -> np.ndarray:
        original, swapped = encode_both_orders(f, demo_tokenizer, fmt, progress=False)
        views, _ = run_schedule([original.input_ids, swapped.input_ids], [FakeDevice()], engine_cfg())
        final, paths = combine_views(views, np.full((f.height, 3), 1 / 3))
        assert (paths == PATH_TTA).all()
        return final

    np.testing.assert_allclose(tta_predict(swap_frame(frame)), swap_probs(tta_predict(frame)), atol=1e-12)
