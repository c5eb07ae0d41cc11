"""Issue 10 item 3: exactly once without relying on the store to drop duplicate rows.

MLflow's ``file:`` store appends every metric row it is sent. A sync killed with SIGKILL
right after the store committed a batch, before the progress checkpoint, then run again,
must still leave every spooled metric stored once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mlflow_er.records import Batch, Metric, Param
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool.cli import EXIT_OK, sync_main

RUN = "abcdefabcdefabcdefabcdefabcdef01"
TS = 1_700_000_000_000

KILLER = r"""
import os, signal, sys
from mlflow_er.sinks.mlflow import MlflowSink
from mlflow_er.spool.cli import sync_main
spool, uri, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, calls = MlflowSink.write_batch, [0]
def write_then_die(self, batch):
    real(self, batch)              # the store has committed the batch...
    calls[0] += 1
    if calls[0] == after:          # ...and the process dies before anything else happens
        os.kill(os.getpid(), signal.SIGKILL)
MlflowSink.write_batch = write_then_die
sys.exit(sync_main([spool, "--tracking-uri", uri, "--chunk", "30", "--no-progress"]))
"""


@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    return (tmp_path / "mlruns").as_uri()


def _history(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = client.get_experiment_by_name("once")
        (run,) = client.search_runs([exp.experiment_id])
        return client.get_metric_history(run.info.run_id, "m"), run


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kill_after", [1, 3])
def test_sync_killed_after_a_commit_then_rerun_stores_100_metrics_as_100_rows(
        tmp_path: Path, file_store: str, kill_after: int) -> None:
    spool = tmp_path / "spool"
    sink = SpoolSink(spool, experiment_name="once")
    sink.start_run(RUN, run_name="once")
    sink.write_batch(Batch.of(RUN, [Metric(RUN, "m", float(i), TS + i, i, i) for i in range(100)] +
                              [Param(RUN, "lr", "0.1", TS, 100)]))
    sink.end_run(RUN)
    sink.close()
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, str(script), str(spool), file_store, str(kill_after)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert 0 < len(_history(file_store)[0]) < 100  # killed mid-way, with batches in the store
    assert sync_main([str(spool), "--tracking-uri", file_store, "--chunk", "30", "--no-progress"]) == EXIT_OK
    hist, run = _history(file_store)
    assert sorted(m.step for m in hist) == list(range(100)), f"{len(hist)} rows for 100 metrics"
    assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"
    assert sync_main([str(spool), "--tracking-uri", file_store, "--no-progress"]) == EXIT_OK
    assert len(_history(file_store)[0]) == 100


def test_a_retry_after_a_failure_that_reached_the_store_sends_only_what_is_missing(file_store: str) -> None:
    """A request that timed out after the store committed it: the retry must not store the rows again."""
    from mlflow import MlflowClient

    from mlflow_er.delivery import Deliverer, DeliveryStats, RetryPolicy
    from mlflow_er.errors import SinkError
    from mlflow_er.sinks.mlflow import MlflowSink
    from mlflow_er.spool.presence import CheckedSink

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = MlflowClient(file_store)
        run = client.create_run(client.create_experiment("retry")).info.run_id

    class CommitsThenTimesOut(MlflowSink):
        calls = 0

        def write_batch(self, batch: Batch) -> None:
            CommitsThenTimesOut.calls += 1
            super().write_batch(batch)
            if CommitsThenTimesOut.calls == 1:
                raise SinkError("ReadTimeout: the reply never came", transient=True)

    sink = CheckedSink(CommitsThenTimesOut(file_store), client)
    batch = Batch.of(run, [Metric(run, "m", float(i), TS + i, i, i) for i in range(50)] +
                     [Param(run, "p", "1", TS, 50)])
    stats = DeliveryStats()
    assert Deliverer(sink, RetryPolicy(deadline=10, base=0.01), stats).deliver(batch) == []
    assert CommitsThenTimesOut.calls == 1 and stats.retries == 1  # the retry found everything stored
    assert sorted(m.step for m in client.get_metric_history(run, "m")) == list(range(50))
