"""The backend contract, run over every registered backend and the complete one in docs/plugins.md.

A backend only moves records; the pipeline delivers them. Whatever the backend, a record
logged is delivered once and in order, a permanent failure is named at flush with the rest
delivered, transient failures are retried, the run's start and end reach a sink that wants
them around its records, and stats() has the counters users read.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mlflow_er import Backend, DeliveryError, ExperimentTracker, Sink
from mlflow_er.plugins import available_names, make_backend, reset_plugin_manager
from mlflow_er.testing import MemorySink, write_fake_distribution

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


# A sink selected by name, so a backend that delivers from another process (``process``) builds it
# there too. It appends what it gets to a JSON-lines file the test reads; options script failures.
RECORDING = '''
import json, os, shutil
from mlflow_er import Sink, SinkError, hookimpl

class Recording(Sink):
    name = "recording"

    def __init__(self, path, fail_key=None, transient=0):
        self.path, self.fail_key, self.transient = path, fail_key, int(transient)

    def _write(self, obj):
        with open(self.path, "a") as f:
            f.write(json.dumps(obj) + "\\n")

    def write_batch(self, batch):
        if self.transient > 0:
            self.transient -= 1
            raise SinkError("scripted", transient=True)
        if self.fail_key and any(getattr(r, "key", "") == self.fail_key for r in batch.records()):
            raise SinkError("scripted permanent failure")
        for r in batch.records():
            self._write({"kind": type(r).__name__, **r._asdict()})

    def write_artifact(self, a):
        name = (a.artifact_path + "/" if a.artifact_path else "") + os.path.basename(a.local_path)
        with open(a.local_path, "rb") as f:
            self._write({"kind": "Artifact", "name": name, "content": f.read().decode()})

    def start_run(self, run_id, **_):
        self._write({"kind": "start", "run_id": run_id})

    def end_run(self, run_id, status="FINISHED"):
        self._write({"kind": "end:" + status, "run_id": run_id})

@hookimpl
def mlflow_er_sink_names():
    return ["recording"]

@hookimpl
def mlflow_er_make_sink(name, context):
    return Recording(**context.options) if name == "recording" else None
'''


class Recorded:
    """What the recording sink wrote."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def metrics(self, key: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r["kind"] == "Metric" and (key is None or r["key"] == key)]


@pytest.fixture
def recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    write_fake_distribution(site, "mlflow-er-recording", "1.0", {"mlflow_er.sinks": {"recording": "recording_sink"}},
                            {"recording_sink": RECORDING})
    monkeypatch.syspath_prepend(str(site))
    reset_plugin_manager()
    yield tmp_path / "recorded.jsonl"
    reset_plugin_manager()
    sys.modules.pop("recording_sink", None)


def _tracker(backend: Backend, out: Path, **options: Any) -> ExperimentTracker:
    return ExperimentTracker("contract", backend=backend, sinks=["recording"], close_timeout=60,
                             sink_options={"recording": {"path": str(out), **options}})


def test_everything_logged_arrives_once_in_order_with_start_and_end_around_it(
        backend: Backend, recording: Path, tracking_uri: str, tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_text("weights")
    tracker = _tracker(backend, recording)
    with tracker.run(run_name="r") as run:
        for i in range(250):
            run.log_metric("m", float(i), step=i)
        run.log_params({"lr": 0.1, "bs": 32})
        for i in range(5):
            run.set_tag("phase", f"p{i}")
        run.log_artifact(tmp_path / "w.bin", artifact_path="ckpt")
        run.log_dict({"a": 1}, "cfg/config.json")
    got = Recorded(recording)
    assert [m["step"] for m in got.metrics("m")] == list(range(250))
    rows = got.rows()
    assert {r["key"]: r["value"] for r in rows if r["kind"] == "Param"} == {"lr": "0.1", "bs": "32"}
    assert [r["value"] for r in rows if r["kind"] == "Tag"][-1] == "p4"
    files = {r["name"]: r["content"] for r in rows if r["kind"] == "Artifact"}
    assert files == {"ckpt/w.bin": "weights", "cfg/config.json": json.dumps({"a": 1}, indent=2)}
    assert rows[0] == {"kind": "start", "run_id": run.run_id}
    assert rows[-1] == {"kind": "end:FINISHED", "run_id": run.run_id}


def test_a_permanent_failure_is_named_at_flush_and_the_rest_delivered(
        backend: Backend, recording: Path, tracking_uri: str) -> None:
    tracker = _tracker(backend, recording, fail_key="poison")
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
        call(run.flush, timeout=60)
    assert [f.key for e in errors for f in e.failed] == ["poison"]
    assert sorted(m["step"] for m in Recorded(recording).metrics("m")) == list(range(80))


def test_transient_failures_are_retried_and_delivered_once(backend: Backend, recording: Path,
                                                           tracking_uri: str) -> None:
    tracker = _tracker(backend, recording, transient=3)
    with tracker.run(run_name="r") as run:
        for i in range(30):
            run.log_metric("m", float(i), step=i)
        run.flush(timeout=60)
        stats = run.stats()
    assert [m["step"] for m in Recorded(recording).metrics("m")] == list(range(30))
    assert stats["retries"] >= 3 and stats["failed"] == 0
    for key in ("queued", "delivered", "failed", "retries", "dropped"):
        assert key in stats, f"stats() lacks {key!r}"


def test_many_threads_exact_counts_in_order_per_thread(backend: Backend, recording: Path, tracking_uri: str) -> None:
    tracker = _tracker(backend, recording)
    with tracker.run(run_name="r") as run:
        def work(t: int) -> None:
            for i in range(200):
                run.log_metric(f"t{t}", float(i), step=i)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    got = Recorded(recording)
    for t in range(16):
        assert [m["step"] for m in got.metrics(f"t{t}")] == list(range(200))


# Sink *instances* live in this process: a backend that delivers from another one takes names only
# (its metrics-only case, by name, is in test_pipeline.py).
IN_PROCESS = sorted(n for n in FACTORIES if n != "process")


@pytest.mark.parametrize("name", IN_PROCESS)
def test_a_metrics_only_sink_is_not_charged_for_artifacts(name: str, tracking_uri: str, tmp_path: Path) -> None:
    backend = FACTORIES[name]()

    class MetricsOnly(Sink):
        name = "metrics-only"

        def __init__(self) -> None:
            self.keys: list[str] = []

        def write_batch(self, batch: Any) -> None:
            self.keys += [m.key for m in batch.metrics]

    mem, only = MemorySink(), MetricsOnly()
    (tmp_path / "a.txt").write_text("x")
    tracker = ExperimentTracker("contract", backend=backend, sinks=[only, mem], close_timeout=30)
    with tracker.run(run_name="r") as run:
        run.log_metric("loss", 1.0)
        run.log_artifact(tmp_path / "a.txt")
        run.log_text("hello", "notes/t.txt")
        run.flush(timeout=30)
        stats = run.stats()
    assert only.keys == ["loss"]
    assert sorted(mem.files()) == ["a.txt", "notes/t.txt"]
    assert stats["failed"] == 0
