"""``on_full="spill"``: overflow goes to disk, comes back in order, nothing is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_er import DeliveryError, ExperimentTracker
from mlflow_er.backends.threaded import ThreadedBackend
from mlflow_er.records import Batch
from mlflow_er.testing import MemorySink


class GatedSink(MemorySink):
    """A sink whose writes wait until ``gate`` is set: a stalled server."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write_batch(self, batch: Batch) -> None:
        self.gate.wait()
        super().write_batch(batch)


@pytest.mark.timeout(90)
def test_spill_under_stalled_writer_delivers_100k_once_in_order(tracking_uri: str, tmp_path: Path) -> None:
    sink = GatedSink()
    spill_dir = tmp_path / "spill"
    backend = ThreadedBackend(max_queue=2000, on_full="spill", spill_path=str(spill_dir))
    tracker = ExperimentTracker("spill", backend=backend, sinks=[sink])
    n = 100_000
    with tracker.run(run_name="r") as run:
        for i in range(n):
            run.log_metric("m", float(i), step=i)
            if i % 10_000 == 0:
                run.set_tag("phase", str(i))
        mid = run.stats()
        assert mid["spilled"] > n - 3 * 2000  # the memory buffer held at most max_queue (+ one batch taken)
        assert len(backend._buf) <= 2000
        assert any(spill_dir.rglob("*.open")) or any(spill_dir.rglob("*.seg"))
        sink.gate.set()
        run.flush(timeout=60)
        stats = run.stats()
    assert stats["dropped_total"] == 0 and stats["spill_pending"] == 0
    steps = [m.step for m in sink.metrics]
    assert steps == list(range(n)), "every record exactly once, in call order"
    assert sink.tags[-1].value == str(90_000)
    assert not spill_dir.exists(), "a drained spill folder is removed at close"


@pytest.mark.timeout(60)
def test_flush_waits_for_spilled_records(tracking_uri: str, tmp_path: Path) -> None:
    sink = GatedSink()
    backend = ThreadedBackend(max_queue=100, on_full="spill", spill_path=str(tmp_path / "spill"))
    tracker = ExperimentTracker("spill-flush", backend=backend, sinks=[sink])
    with tracker.run(run_name="r") as run:
        for i in range(1000):
            run.log_metric("m", float(i), step=i)
        threading.Timer(0.5, sink.gate.set).start()
        t0 = time.monotonic()
        run.flush(timeout=30)
        assert time.monotonic() - t0 >= 0.4
        assert len(sink.metrics) == 1000  # flush returned only after the spilled ones landed


@pytest.mark.timeout(120)
def test_spill_left_at_close_is_kept_and_replayable_with_sync(tracking_uri: str, tmp_path: Path) -> None:
    from mlflow_er.spool.cli import sync_main

    sink = GatedSink()
    spill_dir = tmp_path / "spill"
    backend = ThreadedBackend(max_queue=100, on_full="spill", spill_path=str(spill_dir), retry_deadline=1)
    tracker = ExperimentTracker("spill-kept", backend=backend, sinks=[sink], close_timeout=1)
    with pytest.raises(DeliveryError) as info:
        with tracker.run(run_name="r") as run:
            for i in range(5000):
                run.log_metric("m", float(i), step=i)
    assert info.value.unsent > 0
    kept = info.value.kept_in
    assert kept and Path(kept).exists() and kept in str(info.value), "the error says where unsent records are"
    sink.gate.set()  # the stalled call returns; the writer then stops and leaves any spill on disk
    deadline = time.monotonic() + 10
    while backend.stats()["writer_alive"] and time.monotonic() < deadline:
        time.sleep(0.05)
    # Both folders are spools: replaying them stores what the process could not send.
    for folder in (Path(kept), spill_dir):
        if folder.exists():
            assert sync_main([str(folder), "--tracking-uri", tracking_uri]) == 0
    history = MlflowClient(tracking_uri).get_metric_history(run.run_id, "m")
    stored = {int(m.step) for m in history}
    got = {m.step for m in sink.metrics}
    assert stored | got == set(range(5000)), "every record reached the sink or is replayed from disk"
