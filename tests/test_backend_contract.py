"""The backend contract, run over every registered backend and the complete one in docs/plugins.md.

A backend only moves records; the pipeline delivers them. Whatever the backend, a record
logged is delivered once and in order, a permanent failure is named at flush with the rest
delivered, transient failures are retried, the run's start and end reach a sink that wants
them around its records, and stats() has the counters users read.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlflow_er import Backend, DeliveryError, ExperimentTracker, Sink
from mlflow_er.plugins import available_names, make_backend
from mlflow_er.testing import MemorySink

pytestmark = pytest.mark.timeout(90)

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _docs_backend() -> Backend:
    text = DOC.read_text(encoding="utf-8")
    found = re.search(r"<!-- example: backend -->\s*```python\n(.*?)\n```", text, re.S)
    assert found, "docs/plugins.md has no complete backend example"
    source = found.group(1)
    code = [line for line in source.splitlines() if line.strip()]
    assert len(code) < 60, f"the documented backend should stay under 60 lines of code, has {len(code)}"
    namespace: dict[str, Any] = {"__name__": "mlflow_er_buffered"}
    exec(compile(source, "mlflow_er_buffered.py", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["BufferedBackend"](every=7)


FACTORIES: dict[str, Callable[[], Backend]] = {name: (lambda n=name: make_backend(n))
                                               for name in available_names("backend")}
FACTORIES["docs-buffered"] = _docs_backend


@pytest.fixture(params=sorted(FACTORIES))
def backend(request: pytest.FixtureRequest) -> Backend:
    return FACTORIES[request.param]()


class LifecycleSink(MemorySink):
    """A memory sink that also records run starts and ends, in stream order with the batches."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def start_run(self, run_id: str, **_: Any) -> None:
        self.events.append(("start", run_id))

    def write_batch(self, batch: Any) -> None:
        super().write_batch(batch)
        self.events.append(("batch", batch.run_id))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.events.append((f"end:{status}", run_id))


def _tracker(backend: Backend, *sinks: Sink, **kw: Any) -> ExperimentTracker:
    return ExperimentTracker("contract", backend=backend, sinks=list(sinks), close_timeout=30, **kw)


def test_everything_logged_arrives_once_in_order_with_start_and_end_around_it(
        backend: Backend, tracking_uri: str, tmp_path: Path) -> None:
    sink = LifecycleSink()
    (tmp_path / "w.bin").write_bytes(b"weights")
    tracker = _tracker(backend, sink)
    with tracker.run(run_name="r") as run:
        for i in range(250):
            run.log_metric("m", float(i), step=i)
        run.log_params({"lr": 0.1, "bs": 32})
        for i in range(5):
            run.set_tag("phase", f"p{i}")
        run.log_artifact(tmp_path / "w.bin", artifact_path="ckpt")
        run.log_dict({"a": 1}, "cfg/config.json")
    assert [m.step for m in sink.metrics] == list(range(250))
    assert sink.param_dict() == {"lr": "0.1", "bs": "32"}
    assert sink.tag_dict()["phase"] == "p4"
    assert sorted(sink.files()) == ["cfg/config.json", "ckpt/w.bin"]
    assert sink.files()["ckpt/w.bin"] == b"weights"
    assert sink.events[0] == ("start", run.run_id) and sink.events[-1] == ("end:FINISHED", run.run_id)
    assert all(kind == "batch" for kind, _ in sink.events[1:-1])


def test_a_permanent_failure_is_named_at_flush_and_the_rest_delivered(backend: Backend, tracking_uri: str) -> None:
    sink = MemorySink().fail_when(lambda b: any(getattr(r, "key", "") == "poison" for r in b.records()),
                                  transient=False)
    tracker = _tracker(backend, sink)
    errors: list[DeliveryError] = []

    def call(fn: Callable[..., None], *args: Any, **kw: Any) -> None:
        try:  # a backend that delivers inline (sync) raises at the call, the others at flush
            fn(*args, **kw)
        except DeliveryError as exc:
            errors.append(exc)

    with tracker.run(run_name="r") as run:
        for i in range(40):
            call(run.log_metric, "m", float(i), step=i)
        call(run.log_metric, "poison", 1.0)
        for i in range(40, 80):
            call(run.log_metric, "m", float(i), step=i)
        call(run.flush, timeout=30)
    assert [f.key for e in errors for f in e.failed] == ["poison"]
    assert sorted(m.step for m in sink.metrics if m.key == "m") == list(range(80))


def test_transient_failures_are_retried_and_delivered_once(backend: Backend, tracking_uri: str) -> None:
    sink = MemorySink().fail_next(3, transient=True)
    tracker = _tracker(backend, sink)
    with tracker.run(run_name="r") as run:
        for i in range(30):
            run.log_metric("m", float(i), step=i)
        run.flush(timeout=60)
        stats = run.stats()
    assert [m.step for m in sink.metrics] == list(range(30))
    assert stats["retries"] >= 3 and stats["failed"] == 0
    for key in ("queued", "delivered", "failed", "retries", "dropped"):
        assert key in stats, f"stats() lacks {key!r}"


def test_many_threads_exact_counts_in_order_per_thread(backend: Backend, tracking_uri: str) -> None:
    sink = MemorySink()
    tracker = _tracker(backend, sink)
    with tracker.run(run_name="r") as run:
        def work(t: int) -> None:
            for i in range(200):
                run.log_metric(f"t{t}", float(i), step=i)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    for t in range(16):
        assert [s for s, _ in sink.metric_history(f"t{t}")] == list(range(200))


def test_a_metrics_only_sink_is_not_charged_for_artifacts(backend: Backend, tracking_uri: str,
                                                          tmp_path: Path) -> None:
    class MetricsOnly(Sink):
        name = "metrics-only"

        def __init__(self) -> None:
            self.keys: list[str] = []

        def write_batch(self, batch: Any) -> None:
            self.keys += [m.key for m in batch.metrics]

    mem, only = MemorySink(), MetricsOnly()
    (tmp_path / "a.txt").write_text("x")
    tracker = _tracker(backend, only, mem)
    with tracker.run(run_name="r") as run:
        run.log_metric("loss", 1.0)
        run.log_artifact(tmp_path / "a.txt")
        run.log_text("hello", "notes/t.txt")
        run.flush(timeout=30)
        stats = run.stats()
    assert only.keys == ["loss"]
    assert sorted(mem.files()) == ["a.txt", "notes/t.txt"]
    assert stats["failed"] == 0
