"""The threaded backend and the process around it: fork, interpreter exit, SIGTERM, jobs.

Child processes are bounded in time by the test (a polling ``waitpid``/``Popen.wait``
with a deadline), so a deadlock fails the test instead of hanging the session.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import FaultServer, MlflowServer

from mlflow_er import ExperimentTracker

SCRIPTS = Path(__file__).resolve().parent / "scripts"
LOG_BATCH = "runs/log-batch"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _wait_child(pid: int, timeout: float) -> int | None:
    """Exit status of ``pid`` (as ``os.waitstatus_to_exitcode``) or None if it is still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


# -- fork with a busy writer ---------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(120)
def test_fork_with_busy_writer(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    n_parent, n_child = 20_000, 200
    report = tmp_path / "child-report.txt"
    tracker = ExperimentTracker(_name("fork"), tracking_uri=mlflow_server.uri, backend="threaded",
                                close_timeout=60)
    with tracker.run(run_name="r") as run:
        for i in range(n_parent):
            run.log_metric("parent", float(i), step=i)
        # Fork while the writer is in the middle of delivering.
        deadline = time.monotonic() + 20
        while run.stats()["delivered"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        busy = run.stats()
        assert 0 < busy["delivered"] < n_parent, busy
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 3
            try:
                for i in range(n_child):
                    run.log_metric("child", float(i), step=i)
                run.flush(timeout=30)
                st = run.stats()
                report.write_text(f"delivered={st['delivered']} queued={st['queued']}")
                code = 0
            except BaseException:
                report.write_text(traceback.format_exc())
            finally:
                os._exit(code)
        status = _wait_child(pid, 45)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child deadlocked (killed after 45 s)")
        child_report = report.read_text() if report.exists() else "<no report>"
        assert status == 0, child_report
        # The child started empty: it delivered its own records only, none of the parent's.
        assert child_report == f"delivered={n_child} queued=0"
        run.flush(timeout=60)
        stats = run.stats()
    assert stats["delivered"] == n_parent and stats["failed"] == 0
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_metric_history(run.run_id, "parent")
    child = client.get_metric_history(run.run_id, "child")
    assert len(parent) == n_parent, f"{len(parent)} parent rows (delivered twice or lost?)"
    assert sorted(m.step for m in parent) == list(range(n_parent))
    assert sorted((m.step, m.value) for m in child) == [(i, float(i)) for i in range(n_child)]


# -- interpreter exit and SIGTERM with the server down ------------------------------------------------
def _spawn_child(uri: str, mode: str, close_timeout: float, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "threaded_exit_child.py"), uri, mode, str(close_timeout), _name(mode)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> float:
    """Block until the child prints ``ready``; return time.monotonic() at that moment."""
    box: dict[str, str] = {}
    reader = threading.Thread(target=lambda: box.setdefault("line", proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if box.get("line", "").strip() != "ready":
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"child not ready within {timeout}s (rc={proc.returncode}):\n{err[-3000:]}")
    return time.monotonic()


@pytest.mark.server
@pytest.mark.timeout(120)
def test_exit_and_sigterm_with_server_down_are_bounded(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    close_timeout = 3.0
    bound = close_timeout + 10
    with FaultServer(upstream=mlflow_server.uri, script_paths=(LOG_BATCH,)) as proxy:
        proxy.fail_for(600, status=503)  # the server is "down" for log-batch, the whole test long
        modes = ("atexit", "block", "sigterm")
        procs = {m: _spawn_child(proxy.uri, m, close_timeout, tmp_path) for m in modes}  # in parallel
        try:
            ready = {m: _wait_ready(p, 60) for m, p in procs.items()}
            procs["sigterm"].send_signal(signal.SIGTERM)
            term_sent = time.monotonic()
            results = {}
            for m, p in procs.items():
                try:
                    out, err = p.communicate(timeout=bound + 5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate(timeout=10)
                    pytest.fail(f"{m}: child still running {bound + 5}s after ready:\n{err[-3000:]}")
                ended = time.monotonic()
                results[m] = (p.returncode, ended, err)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        assert proxy.requests_to(LOG_BATCH), "the children never tried to deliver"

    # Interpreter exit with an unclosed run: the atexit drain gives up in time and says so.
    rc, ended, err = results["atexit"]
    assert ended - ready["atexit"] < bound, f"atexit: exit took {ended - ready['atexit']:.1f}s\n{err[-2000:]}"
    assert rc == 0, err[-3000:]
    assert "unsent" in err and "at exit" in err, err[-3000:]

    # The run block ends normally: close gives up in time, raises, the script fails visibly.
    rc, ended, err = results["block"]
    assert ended - ready["block"] < bound, f"block: exit took {ended - ready['block']:.1f}s\n{err[-2000:]}"
    assert rc == 1, err[-3000:]
    assert "DeliveryError" in err and "unsent" in err, err[-3000:]

    # SIGTERM is not swallowed: the block unwinds, closes within close_timeout, exits 143.
    rc, ended, err = results["sigterm"]
    assert ended - term_sent < bound, f"sigterm: exit took {ended - term_sent:.1f}s\n{err[-2000:]}"
    assert rc == 128 + signal.SIGTERM, f"rc={rc}\n{err[-3000:]}"
    assert "unsent" in err, err[-3000:]


# -- background_worker (seed compatibility) -----------------------------------------------------------
@pytest.mark.timeout(90)
def test_background_worker_with_threaded_backend(tracking_uri: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")])))
    bg_jobs = importlib.import_module("bg_jobs")
    tracker = ExperimentTracker(_name("jobs"), backend="threaded", close_timeout=60)
    events: list[tuple[str, float]] = []
    lock = threading.Lock()

    def job(tag: str, delay: float) -> None:
        with lock:
            events.append((f"{tag}-start", time.monotonic()))
        time.sleep(delay)
        with lock:
            events.append((f"{tag}-end", time.monotonic()))

    proc_out = tmp_path / "proc.pid"
    with tracker.run(run_name="r") as run:
        run.log_metric("main", 1.0)
        tracker.background_worker("same", job, False, "a", 0.6)
        t0 = time.monotonic()
        tracker.background_worker("same", job, False, "b", 0.0)  # waits for "a" first
        waited = time.monotonic() - t0
        tracker.background_worker("proc", bg_jobs.record_process, True, str(proc_out), 1.0)
        tracker.background_worker("slow-thread", job, False, "c", 1.0)
        assert not proc_out.exists()
    # Leaving the block joined every job, threads and processes alike.
    names = [e for e, _ in events]
    assert names.index("a-end") < names.index("b-start"), names
    assert waited >= 0.4, f"same-name job did not wait for its predecessor ({waited:.2f}s)"
    assert "c-end" in names, "a thread job was not joined when the run ended"
    assert proc_out.exists(), "a process job was not joined when the run ended"
    assert int(proc_out.read_text()) != os.getpid(), "use_process=True ran in this process"
    data = MlflowClient(tracking_uri).get_run(run.run_id)
    assert data.data.metrics.get("from_process") == 1.0
    assert data.data.metrics.get("main") == 1.0
    assert data.info.status == "FINISHED"
