"""The Pipeline from outside: no sink waits for another, exits never forget in-flight records.

- outage: the server answers 503 for the whole test while 5 000 metrics are logged with
  ``sinks=["mlflow", "spool"]`` (and through ``spool+http://``), then the training process
  is SIGKILLed a second after its last call: the spool has every record, and after
  ``mlflow-er sync`` MLflow has each once;
- 8 threads, each with its own run on one shared threaded backend: no run waits its close
  timeout, no DeliveryError, exact counts;
- SIGTERM at 20 random points of a final flush against a slow server: every record is either
  in MLflow or kept on disk (and replayed by sync), and the run ends KILLED;
- third-party sinks through the real entry-point door: a metrics-only sink beside ``mlflow``
  is never charged for artifacts, and an offline-only sink works with the spool plugin
  unregistered.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import FaultServer, MlflowServer, Reply

from mlflow_er import ExperimentTracker
from mlflow_er.plugins import get_plugin_manager, reset_plugin_manager
from mlflow_er.spool.cli import sync_main
from mlflow_er.testing import prefill_sqlite_store, write_fake_distribution

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ER_HANDLE_SIGTERM": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full)


def _read_until(proc: subprocess.Popen[str], word: str, timeout: float) -> list[str]:
    """Lines of the child's stdout up to the one starting with ``word`` (bounded)."""
    lines: list[str] = []
    done = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(word):
                done.set()
                return

    threading.Thread(target=pump, daemon=True).start()
    if not done.wait(timeout):
        proc.kill()
        raise AssertionError(f"child never printed {word!r}; stdout {lines}, stderr {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    return lines


@pytest.fixture
def outage(mlflow_server: MlflowServer) -> Iterator[FaultServer]:
    """A proxy in front of the real server whose log-batch answers 503 for the whole test."""
    proxy = FaultServer(upstream=mlflow_server.uri, script_paths=("/runs/log-batch",))
    proxy.start()
    proxy.fail_for(600, status=503)
    try:
        yield proxy
    finally:
        proxy.stop()


def _history(uri: str, run_id: str, key: str = "m") -> list[int]:
    return sorted(int(m.step) for m in MlflowClient(uri).get_metric_history(run_id, key))


#: How the outage child logs: through a tracker with both sinks, or MLflow's fluent API on ``spool+http://``.
OUTAGE_CHILDREN = {
    "sinks": """
        import time
        from mlflow_er import ExperimentTracker
        t = ExperimentTracker("outage-{tag}", tracking_uri={uri!r}, backend="threaded",
                              sinks=["mlflow", "spool"], sink_options={{"spool": {{"path": {spool!r}}}}})
        with t.run(run_name="r") as run:
            print("RUN", run.run_id, flush=True)
            for i in range(5000):
                run.log_metric("m", float(i), step=i)
                if i % 500 == 499:
                    time.sleep(0.05)
            print("LOGGED", flush=True)
            time.sleep(600)
    """,
    "scheme": """
        import time
        import mlflow
        mlflow.set_tracking_uri("spool+" + {uri!r})
        mlflow.set_experiment("outage-scheme-{tag}")
        with mlflow.start_run() as r:
            print("RUN", r.info.run_id, flush=True)
            for i in range(5000):
                mlflow.log_metric("m", float(i), step=i)
            print("LOGGED", flush=True)
            time.sleep(600)
    """,
}


@pytest.mark.server
@pytest.mark.timeout(120)
@pytest.mark.parametrize("via", sorted(OUTAGE_CHILDREN))
def test_outage_then_sigkill_the_spool_holds_every_record(via: str, outage: FaultServer,
                                                          mlflow_server: MlflowServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    code = OUTAGE_CHILDREN[via].format(tag=uuid.uuid4().hex[:8], uri=outage.uri, spool=str(spool))
    proc = _child(code, env={"MLFLOW_ER_SPOOL_DIR": str(spool)} if via == "scheme" else None)
    lines = _read_until(proc, "LOGGED", 90)
    run_id = lines[0].split()[1]
    time.sleep(1.0)  # each record must be on disk within a second of its call
    proc.kill()
    proc.wait(10)
    assert len(outage.requests_to("/runs/log-batch")) >= 1, "the mlflow lane kept trying meanwhile"
    assert _history(mlflow_server.uri, run_id) == [], "the outage let nothing through"
    assert sync_main([str(spool), "--tracking-uri", mlflow_server.uri]) == 0
    assert _history(mlflow_server.uri, run_id) == list(range(5000)), "every record, each once"


def test_the_flush_before_a_close_hands_back_its_error_and_keeps_on_an_interrupt() -> None:
    from mlflow_er.errors import DeliveryError
    from mlflow_er.unsent import flush_for_close

    def short(timeout: float | None) -> None:
        raise DeliveryError(unsent=3, message="flush timed out; 3 record(s) unsent")

    deadline, problem = flush_for_close(short, 5.0)
    assert problem is not None and problem.unsent == 3, "the close goes on and reports it"
    assert deadline is not None and deadline > time.monotonic()
    assert flush_for_close(lambda timeout: None, None) == (None, None)

    kept: list[str] = []

    def interrupted(timeout: float | None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flush_for_close(interrupted, 5.0, lambda: kept.append("kept"))
    assert kept == ["kept"], "an interrupt keeps what is unsent before it unwinds"


@pytest.mark.timeout(120)
def test_threads_with_their_own_runs_on_one_backend(tracking_uri: str) -> None:
    tracker = ExperimentTracker("threads", tracking_uri=tracking_uri, backend="threaded", close_timeout=60)
    took: dict[int, float] = {}
    errors: list[BaseException] = []
    ids: dict[int, str] = {}

    def work(k: int) -> None:
        try:
            with tracker.run(run_name=f"t{k}") as run:
                ids[k] = run.run_id
                for i in range(300):
                    run.log_metric("m", float(i), step=i)
                for i in range(3):
                    run.set_tag("phase", f"p{i}")
                run.log_param("k", k)
                t0 = time.monotonic()
            took[k] = time.monotonic() - t0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors
    client = MlflowClient(tracking_uri)
    for k, rid in ids.items():
        run = client.get_run(rid)
        assert run.info.status == "FINISHED"
        assert run.data.tags["phase"] == "p2" and run.data.params["k"] == str(k)
        assert _history(tracking_uri, rid) == list(range(300))
    # The bug: a run's end waited its whole close_timeout (60 s) for a flush marker of another thread.
    assert max(took.values()) < 30, took


SLOW_CHILD = """
    import sys
    from mlflow_er import ExperimentTracker
    t = ExperimentTracker("sigterm", tracking_uri={uri!r}, backend="threaded", close_timeout=60)
    with t.run(run_name={name!r}) as run:
        print("RUN", run.run_id, flush=True)
        for i in range(3000):
            run.log_metric("m", float(i), step=i)
        print("LEAVING", flush=True)
"""


@pytest.mark.server
@pytest.mark.timeout(240)
def test_sigterm_at_random_points_of_the_final_flush(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    slow = FaultServer(upstream=mlflow_server.uri, script_paths=("/runs/log-batch",))
    slow.start()
    slow.script(*[Reply(delay=0.4, forward=True) for _ in range(400)])
    rng = random.Random(9)
    try:
        for round_ in range(2):
            children = []
            for k in range(10):
                staging = tmp_path / f"staging-{round_}-{k}"
                staging.mkdir(mode=0o700)  # a staging folder must be private
                proc = _child(SLOW_CHILD.format(uri=slow.uri, name=f"r{round_}-{k}"),
                              env={"MLFLOW_ER_STAGING_DIR": str(staging)})
                children.append((proc, staging))
            for proc, _ in children:
                lines = _read_until(proc, "LEAVING", 60)
                time.sleep(rng.uniform(0.0, 1.6))  # somewhere in the final flush (3 slow requests)
                proc.sent_ms = time.time() * 1000  # type: ignore[attr-defined]
                proc.send_signal(signal.SIGTERM)
                proc.run_id = lines[0].split()[1]  # type: ignore[attr-defined]
            for proc, staging in children:
                # 143: interrupted and unwound; 0 / -15: it had finished (-15 when the signal met the
                # interpreter's own teardown, which restores the default handler).
                assert proc.wait(60) in (0, 143, -15), proc.stderr.read()[-3000:]  # type: ignore[union-attr]
                kept = [p for p in staging.iterdir() if p.name.startswith("unsent-")]
                for folder in kept:
                    assert sync_main([str(folder), "--tracking-uri", mlflow_server.uri]) == 0
                rid = proc.run_id  # type: ignore[attr-defined]
                assert _history(mlflow_server.uri, rid) == list(range(3000)), f"records lost ({kept})"
                info = MlflowClient(mlflow_server.uri).get_run(rid).info
                if proc.returncode == 143 and info.status == "FINISHED":
                    # The signal came after FINISHED was sent (during the recap or the teardown after
                    # the block): the run had finished, and its end time says so (one clock, this box).
                    assert info.end_time <= proc.sent_ms + 5, "FINISHED stored after the SIGTERM"  # type: ignore[attr-defined]
                else:
                    assert info.status == ("KILLED" if proc.returncode == 143 else "FINISHED")
    finally:
        slow.stop()


# -- third-party sinks through the entry-point door -------------------------------------------------
METRICS_ONLY = '''
from mlflow_er import Sink, hookimpl

NAME = "metrics-only"
SEEN = []


class MetricsOnly(Sink):
    name = NAME

    def write_batch(self, batch):
        SEEN.extend((m.key, m.value) for m in batch.metrics)


@hookimpl
def mlflow_er_sink_names():
    return [NAME]


@hookimpl
def mlflow_er_make_sink(name, context):
    return MetricsOnly() if name == NAME else None


@hookimpl
def mlflow_er_sink_needs_server(name):
    return MetricsOnly.needs_server if name == NAME else None
'''


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    offline = METRICS_ONLY.replace('"metrics-only"', '"notes"').replace("class MetricsOnly(Sink):\n    name = NAME",
                                                                          "class MetricsOnly(Sink):\n    name = NAME\n"
                                                                          "    needs_server = False")
    site = tmp_path / "site"
    write_fake_distribution(site, "mlflow-er-metrics-only", "1.0", {"mlflow_er.sinks": {"metrics-only": "mo_sink"}},
                            {"mo_sink": METRICS_ONLY})
    write_fake_distribution(site, "mlflow-er-notes", "1.0", {"mlflow_er.sinks": {"notes": "notes_sink"}},
                            {"notes_sink": offline})
    monkeypatch.syspath_prepend(str(site))
    reset_plugin_manager()
    yield
    reset_plugin_manager()
    for mod in ("mo_sink", "notes_sink"):
        sys.modules.pop(mod, None)


def test_metrics_only_sink_beside_mlflow(third_party: None, tracking_uri: str, tmp_path: Path) -> None:
    assert len([line for line in METRICS_ONLY.splitlines() if line.strip()]) < 30
    prefill_sqlite_store(tracking_uri)
    (tmp_path / "model.bin").write_bytes(b"w")
    tracker = ExperimentTracker("mo", tracking_uri=tracking_uri, backend="threaded", sinks=["mlflow", "metrics-only"])
    with tracker.run(run_name="r") as run:
        run.log_metric("loss", 0.5)
        run.log_artifact(tmp_path / "model.bin")
        run.log_dict({"a": 1}, "cfg.json")
        run.flush(timeout=30)
        stats = run.stats()
    assert sys.modules["mo_sink"].SEEN == [("loss", 0.5)]
    assert stats["failed"] == 0 and stats["lanes"]["metrics-only"]["failed"] == 0
    names = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.run_id)}
    assert names == {"model.bin", "cfg.json"}


def test_offline_only_third_party_sink_without_the_spool_plugin(third_party: None) -> None:
    pm = get_plugin_manager()
    pm.unregister(name="mlflow_er.sinks:spool")
    assert pm.get_plugin("mlflow_er.sinks:spool") is None
    # Nothing listens there: an offline tracker must not even try.
    tracker = ExperimentTracker("offline-notes", tracking_uri="http://127.0.0.1:9", sinks=["notes"])
    assert tracker.offline
    with tracker.run(run_name="r") as run:
        run.log_metric("loss", 0.25, step=1)
    assert sys.modules["notes_sink"].SEEN == [("loss", 0.25)]


def test_register_memory_sink_in_a_fresh_process() -> None:
    out = subprocess.run([sys.executable, "-c", "from mlflow_er.testing import register_memory_sink as r; "
                          "p = r(); print('ok', p.last)"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok None"
