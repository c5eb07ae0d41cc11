"""Backpressure and bounded waits of the threaded backend, with a writer that is stuck.

A stalled sink (its ``write_batch`` blocks on an event) models a destination that stopped
answering: the buffer fills, ``on_full`` decides, and ``flush``/``close`` must still return
within their timeout and say how much is unsent.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator

import psutil
import pytest

from mlflow_er import ExperimentTracker
from mlflow_er.backends.threaded import ThreadedBackend
from mlflow_er.errors import DeliveryError, QueueFull, SinkError
from mlflow_er.records import Artifact, Batch, Metric
from mlflow_er.sinks.base import Sink


class StalledSink(Sink):
    """Blocks every write until :meth:`release`; counts what it was given afterwards."""

    name = "stalled"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.metrics = 0
        self.records = 0
        self._lock = threading.Lock()

    def write_batch(self, batch: Batch) -> None:
        self.entered.set()
        self.gate.wait(60)  # bounded: a forgotten release cannot hang the session
        with self._lock:
            self.metrics += len(batch.metrics)
            self.records += len(batch)

    def write_artifact(self, artifact: Artifact) -> None:
        self.gate.wait(60)

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def stalled() -> Iterator[StalledSink]:
    sink = StalledSink()
    try:
        yield sink
    finally:
        sink.release()  # let the writer thread finish whatever the test left


def _tracker(backend: ThreadedBackend, sink: Sink, close_timeout: float = 5) -> ExperimentTracker:
    return ExperimentTracker("bp", backend=backend, sinks=[sink], close_timeout=close_timeout)


def _wait(event: threading.Event, what: str) -> None:
    assert event.wait(10), what


@pytest.mark.timeout(60)
def test_block_raises_queue_full_at_block_timeout(tracking_uri: str, stalled: StalledSink) -> None:
    block_timeout = 0.5
    backend = ThreadedBackend(max_queue=1000, on_full="block", block_timeout=block_timeout)
    tracker = _tracker(backend, stalled)
    with tracker.run(run_name="r") as run:
        accepted = 0
        started = time.monotonic()
        with pytest.raises(QueueFull) as info:
            for i in range(100_000):
                t0 = time.monotonic()
                run.log_metric("m", float(i), step=i)
                accepted += 1
        raised_after = time.monotonic() - t0
        total = time.monotonic() - started
        assert stalled.entered.is_set(), "the writer never reached the sink"
        assert accepted < 100_000
        assert block_timeout - 0.05 <= raised_after < block_timeout + 0.5, raised_after
        assert total < block_timeout + 2.0
        assert "full" in str(info.value)
        # Blocking never drops: once the sink recovers, every accepted record arrives.
        stalled.release()
        run.flush(timeout=20)
        stats = run.stats()
    assert stalled.metrics == accepted
    assert stats["dropped_total"] == 0 and stats["delivered"] == accepted


@pytest.mark.timeout(60)
def test_drop_counts_exactly_and_warns_once(tracking_uri: str, stalled: StalledSink) -> None:
    n = 100_000
    backend = ThreadedBackend(max_queue=1000, on_full="drop")
    tracker = _tracker(backend, stalled)
    with tracker.run(run_name="r") as run:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            for i in range(n):
                run.log_metric("m", float(i), step=i)
            burst = time.monotonic() - t0
        stats_stalled = run.stats()
        stalled.release()
        run.flush(timeout=20)
        stats = run.stats()
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "mlflow-er" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "drop" in str(ours[0].message)
    assert burst < 10, f"a dropping burst of {n} calls took {burst:.1f}s"
    dropped = stats["dropped_total"]
    assert 0 < dropped < n
    assert stalled.metrics + dropped == n, (stalled.metrics, stats)
    assert stats["delivered"] == stalled.metrics
    assert stats_stalled["dropped_total"] == dropped  # counted at drop time, not at flush


class SlowSink(Sink):
    """A sink that keeps up, slowly: the writer drains while the caller overfills the buffer."""

    name = "slow"

    def __init__(self) -> None:
        self.metrics = 0

    def write_batch(self, batch: Batch) -> None:
        time.sleep(0.0005)
        self.metrics += len(batch.metrics)

    def write_artifact(self, artifact: Artifact) -> None:
        pass


@pytest.mark.timeout(60)
def test_drop_reason_is_queue_full_when_only_the_record_bound_is_hit(tracking_uri: str) -> None:
    # Metrics carry no byte payload, so every drop here is because of max_queue. The
    # writer draining concurrently must not turn some of them into "bytes_full".
    sink = SlowSink()
    n = 100_000
    tracker = _tracker(ThreadedBackend(max_queue=1500, on_full="drop"), sink)
    with tracker.run(run_name="r") as run, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(n):
            run.log_metric("m", float(i), step=i)
        run.flush(timeout=20)
        stats = run.stats()
    assert sink.metrics + stats["dropped_total"] == n
    assert stats["queued_bytes"] == 0
    assert set(stats["dropped"]) == {"queue_full"}, stats["dropped"]


@pytest.mark.timeout(40)
def test_drop_memory_bounded_over_1m_calls(tracking_uri: str, stalled: StalledSink) -> None:
    backend = ThreadedBackend(on_full="drop")  # default bounds
    tracker = _tracker(backend, stalled)
    proc = psutil.Process()
    with tracker.run(run_name="r") as run:
        run.log_metric("warmup", 0.0)
        _wait(stalled.entered, "the writer never reached the sink")
        gc.collect()
        before = proc.memory_info().rss
        peak = before
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _chunk in range(10):
                for i in range(100_000):
                    run.log_metric("m", 0.5, step=i)
                peak = max(peak, proc.memory_info().rss)
        took = time.monotonic() - t0
        stats = run.stats()
        stalled.release()
        run.flush(timeout=20)
    growth = (peak - before) / 2**20
    assert growth < 64, f"RSS grew {growth:.1f} MB over 1M calls"
    assert took < 20, f"1M calls took {took:.1f}s"
    # max_queue (100 000) wait in the buffer, and as many plus one chunk (20 000) in the stalled sink's lane
    assert stats["dropped_total"] >= 1_000_000 - 2 * 100_000 - 20_000 - 2_000
    assert stats["queued"] <= 2 * backend.max_queue + 20_000 + 1  # the buffer, and the sink's lane


@pytest.mark.timeout(30)
def test_flush_timeout_is_bounded_and_reports_unsent(tracking_uri: str, stalled: StalledSink) -> None:
    tracker = _tracker(ThreadedBackend(), stalled)
    with tracker.run(run_name="r") as run:
        for i in range(500):
            run.log_metric("m", float(i), step=i)
        for timeout in (0.0, 0.3, 1.0):
            t0 = time.monotonic()
            with pytest.raises(DeliveryError) as info:
                run.flush(timeout=timeout)
            took = time.monotonic() - t0
            assert took < timeout + 0.5, f"flush({timeout}) took {took:.2f}s"
            assert info.value.unsent == 500, info.value
            assert "unsent" in str(info.value)
        stalled.release()
        run.flush(timeout=10)
    assert stalled.metrics == 500


@pytest.mark.timeout(30)
def test_close_timeout_is_bounded_and_reports_unsent(tracking_uri: str, stalled: StalledSink) -> None:
    close_timeout = 1.0
    tracker = _tracker(ThreadedBackend(), stalled, close_timeout=close_timeout)
    with pytest.raises(DeliveryError) as info:  # noqa: PT012 - the block's exit is what is measured
        with tracker.run(run_name="r") as run:
            for i in range(300):
                run.log_metric("m", float(i), step=i)
            run.set_tag("t", "v")
            t0 = time.monotonic()
    took = time.monotonic() - t0
    assert took < close_timeout + 0.5, f"closing took {took:.2f}s with close_timeout={close_timeout}"
    assert info.value.unsent > 0
    assert "unsent" in str(info.value)
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"

    # The backend itself, directly: close(timeout) is bounded as well.
    sink = StalledSink()
    backend = ThreadedBackend()
    try:
        tracker2 = _tracker(backend, sink, close_timeout=30)
        with tracker2.run(run_name="r2") as run2:
            run2.log_metric("m", 1.0)
            _wait_for(lambda: sink.entered.is_set() or backend.stats()["queued"] == 1)
            t0 = time.monotonic()
            with pytest.raises(DeliveryError) as info2:
                backend.close(timeout=0.5)
            took2 = time.monotonic() - t0
            assert took2 < 1.0, took2
            assert info2.value.unsent == 1
            sink.release()
    finally:
        sink.release()


def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class DownSink(Sink):
    """A destination that is down: every write fails transiently."""

    name = "down"

    def __init__(self) -> None:
        self.attempts = 0

    def write_batch(self, batch: Batch) -> None:
        self.attempts += 1
        raise SinkError("connection refused", transient=True)

    def write_artifact(self, artifact: Artifact) -> None:
        raise SinkError("connection refused", transient=True)


@pytest.mark.timeout(30)
def test_records_reported_unsent_at_close_are_not_reported_again(tracking_uri: str) -> None:
    # close(timeout) gives up on records the writer is still retrying and reports them as
    # unsent. The writer then stops and records the same in-flight batch as failed; the
    # next flush/close (e.g. the atexit drain) must not report those records a second time.
    n = 50
    sink = DownSink()
    backend = ThreadedBackend(retry_deadline=300)
    tracker = _tracker(backend, sink, close_timeout=0.5)
    reported: list[DeliveryError] = []
    try:
        with tracker.run(run_name="r") as run:
            for i in range(n):
                run.log_metric("m", float(i), step=i)
            _wait_for(lambda: sink.attempts > 0)  # the batch is in flight, being retried
    except DeliveryError as exc:
        reported.append(exc)
    assert reported and reported[0].unsent == n, reported
    time.sleep(0.5)  # the writer notices the stop and gives up on its batch
    for _ in range(2):  # what the atexit drain (or a later run's close) would do
        try:
            backend.close(timeout=1)
        except DeliveryError as exc:
            reported.append(exc)
    total = sum(e.unsent + len(e.failed) for e in reported)
    assert total == n, f"{n} records reported {total} times: {[str(e)[:120] for e in reported]}"


class _WriterPopsBeforeReasonIsRead(deque):
    """A buffer where "the writer" takes one record just before the drop reason is decided.

    The real writer pops without the backend's lock, so a GIL switch can land exactly
    there; this makes that interleaving deterministic instead of timing-dependent.
    """

    def __len__(self) -> int:
        if sys._getframe(1).f_code.co_name == "_make_room" and super().__len__():
            self.popleft()
        return super().__len__()


@pytest.mark.timeout(30)
def test_drop_reason_when_writer_drains_concurrently_deterministic() -> None:
    backend = ThreadedBackend(max_queue=10, on_full="drop")
    backend._buf = _WriterPopsBeforeReasonIsRead()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(20):
            backend.submit(Metric("run", "m", float(i), 0, i, i))
    stats = backend.stats()
    assert stats["dropped_total"] > 0
    assert stats["queued_bytes"] == 0
    assert set(stats["dropped"]) == {"queue_full"}, stats["dropped"]


class FastSink(Sink):
    """A healthy destination: stores instantly."""

    name = "fast"

    def __init__(self) -> None:
        self.metrics = 0

    def write_batch(self, batch: Batch) -> None:
        self.metrics += len(batch.metrics)

    def write_artifact(self, artifact: Artifact) -> None:
        pass


@pytest.mark.timeout(30)
def test_drop_full_buffer_wakes_the_writer(tracking_uri: str) -> None:
    # With max_queue below a batch (1000 metrics) the buffer is full long before a batch
    # is: in "block" mode the caller wakes the writer then, and "drop" mode must too,
    # rather than dropping while the writer naps until flush_interval with a healthy sink.
    sink = FastSink()
    backend = ThreadedBackend(max_queue=100, on_full="drop", flush_interval=3.0)
    tracker = _tracker(backend, sink)
    with tracker.run(run_name="r") as run, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(101):  # the 101st finds the buffer full
            run.log_metric("m", float(i), step=i)
        deadline = time.monotonic() + 1.5
        while backend.stats()["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(101, 150):
            run.log_metric("m", float(i), step=i)
        run.flush(timeout=10)
        stats = run.stats()
    assert sink.metrics + stats["dropped_total"] == 150
    assert stats["dropped_total"] <= 1, f"{stats['dropped_total']} records dropped while the sink sat idle"
