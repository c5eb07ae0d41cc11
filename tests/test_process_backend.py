"""The ``process`` backend from outside: kill either process and count what MLflow holds.

- SIGKILL of the training process at 20 random points: the delivery process delivers every record
  the queue holds (each acknowledged record exactly once), ends the run KILLED and exits — no
  ``mlflow-er sync`` needed;
- SIGKILL of the delivery process mid-run: the training process restarts it and the counts at the
  end are exact;
- a forked child that logs gets its own queue and delivery process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_er import ExperimentTracker

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
    import sys, time
    from mlflow_er import ExperimentTracker
    t = ExperimentTracker("proc-kill", tracking_uri={uri!r}, backend="process")
    with t.run(run_name={name!r}) as run:
        print("RUN", run.run_id, flush=True)
        i = 0
        while True:
            run.log_metric("m", float(i), step=i)
            i += 1
            if i % 200 == 0:
                time.sleep(0.01)
"""


def _wait_gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (a zombie no one reaps counts: an orphan's reaper may be lazy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def _queue_dirs(staging: Path) -> list[Path]:
    return [p for p in staging.iterdir() if p.name.startswith("process-")]


def _process_run(tracking_uri: str, experiment: str) -> Any:
    """A run block (``with``) of a tracker of ``experiment`` on the ``process`` backend."""
    return ExperimentTracker(experiment, tracking_uri=tracking_uri, backend="process").run(run_name="r")


def _log_steps(run: Any, key: str, steps: range) -> None:
    for i in steps:
        run.log_metric(key, float(i), step=i)


@pytest.mark.timeout(500)
def test_sigkill_of_the_training_process_at_random_points(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ExperimentTracker("proc-kill", tracking_uri=uri)  # the store and experiment exist before the race
    rng = random.Random(12)
    for round_ in range(4):
        kids = []
        for k in range(5):
            staging = tmp_path / f"staging-{round_}-{k}"
            staging.mkdir(mode=0o700)  # a staging folder must be private
            env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ER_STAGING_DIR": str(staging)}
            code = textwrap.dedent(CHILD.format(uri=uri, name=f"r{round_}{k}"))
            proc = subprocess.Popen([sys.executable, "-c", code],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            kids.append((proc, staging))
        for proc, _ in kids:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith("RUN"), proc.stderr.read()[-2000:]  # type: ignore[union-attr]
            proc.run_id = line.split()[1]  # type: ignore[attr-defined]
        for proc, _ in kids:
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        for proc, staging in kids:
            (queue,) = _queue_dirs(staging)
            deadline = time.monotonic() + 90  # the delivery process may still be starting (imports)
            while not (queue / "status.json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            pid = json.loads((queue / "status.json").read_text())["pid"]
            assert _wait_gone(pid, 60), "the delivery process delivers what is queued, then exits"
            from mlflow_er.spool import SpoolReader

            queued = sorted(r.step for r, _ in SpoolReader(queue, warn=False).records() if type(r).__name__ == "Metric")
            client = MlflowClient(uri)
            history = sorted(int(m.step) for m in client.get_metric_history(proc.run_id, "m"))  # type: ignore[attr-defined]
            assert history == queued == list(range(len(queued))), "every queued record once, none other"
            assert client.get_run(proc.run_id).info.status == "KILLED"  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_sigkill_of_the_delivery_process_mid_run(tracking_uri: str) -> None:
    with _process_run(tracking_uri, "proc-restart") as run:
        _log_steps(run, "m", range(3000))
        run.flush(timeout=60)
        first = run.stats()["delivery_pid"]
        os.kill(first, signal.SIGKILL)
        assert _wait_gone(first, 10)
        _log_steps(run, "m", range(3000, 6000))
        run.flush(timeout=90)
        stats = run.stats()
    assert stats["restarts"] == 1 and stats["delivery_pid"] != first
    history = sorted(int(m.step) for m in MlflowClient(tracking_uri).get_metric_history(run.run_id, "m"))
    assert history == list(range(6000))


@pytest.mark.timeout(180)
def test_a_forked_child_logs_through_its_own_delivery_process(tracking_uri: str) -> None:
    with _process_run(tracking_uri, "proc-fork") as run:
        _log_steps(run, "parent", range(500))
        pid = os.fork()
        if pid == 0:  # the child: log, flush, and leave without running the parent's exit hooks
            code = 1
            try:
                _log_steps(run, "child", range(300))
                run.flush(timeout=60)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        run.flush(timeout=60)
    client = MlflowClient(tracking_uri)
    assert len(client.get_metric_history(run.run_id, "parent")) == 500
    assert len(client.get_metric_history(run.run_id, "child")) == 300
