"""Issue 10 item 2: one ``mlflow-er sync`` at a time per spool and server — never twin runs or duplicate rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_er.records import Batch, Metric
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool.cli import EXIT_BUSY, EXIT_OK, sync_main
from mlflow_er.spool.lease import Lease, LeaseBusy
from mlflow_er.spool.replay import target_key

TS = 1_700_000_000_000
RUNS = [f"{k:032x}" for k in range(1, 13)]


def make_runs(path: Path, metrics: int = 150) -> None:
    """Twelve offline runs, as an offline tracker spools them: start, metrics, end."""
    sink = SpoolSink(path, experiment_name="twins", segment_bytes=20_000)
    for k, run in enumerate(RUNS):
        sink.start_run(run, run_name=f"r{k}")
        sink.write_batch(Batch.of(run, [Metric(run, "m", float(i), TS + i, i, i) for i in range(metrics)]))
        sink.end_run(run)
    sink.close()


def lease_path(spool: Path, uri: str) -> str:
    return str(spool / "sync" / target_key(uri) / "lease.json")


@pytest.mark.timeout(200)  # two MLflow-importing processes; slow on a loaded 2-core host
def test_two_real_syncs_at_once_make_one_run_per_spooled_run(tmp_path: Path, tracking_uri: str) -> None:
    spool = tmp_path / "spool"
    make_runs(spool, metrics=60)
    MlflowClient(tracking_uri).search_experiments()  # the store exists first (two processes creating one
    # SQLite database at once trip over MLflow's own schema migration)
    cmd = [sys.executable, "-m", "mlflow_er.cli", "sync", str(spool), "--tracking-uri", tracking_uri,
           "--chunk", "25", "--wait", "150", "--no-progress", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(2)]
    outs = [p.communicate(timeout=170) for p in procs]
    assert [p.returncode for p in procs] == [EXIT_OK, EXIT_OK], outs
    reports = [json.loads(o) for o, _ in outs]
    assert sorted(len(r["runs_created"]) for r in reports) == [0, 12]  # the second found everything done
    assert sum(r["records"] for r in reports) == 12 * 62
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("twins")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 12 and {r.info.run_name for r in runs} == {f"r{k}" for k in range(12)}
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "m"))
        assert steps == list(range(60)), r.info.run_name
    assert not os.path.exists(lease_path(spool, tracking_uri))  # released


def test_a_second_sync_refuses_naming_the_holder_and_the_fix(tmp_path: Path, tracking_uri: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    spool = tmp_path / "spool"
    make_runs(spool, metrics=5)
    from mlflow_er.spool.reader import open_fs

    fs, _ = open_fs(str(spool))
    with Lease(fs, lease_path(spool, tracking_uri), ttl=30):
        assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--no-progress"]) == EXIT_BUSY
    err = capsys.readouterr().err
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in err
    assert "--wait SECONDS" in err and "another mlflow-er sync" in err
    assert MlflowClient(tracking_uri).get_experiment_by_name("twins") is None  # nothing was sent
    assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--no-progress"]) == EXIT_OK  # released


def test_a_dead_holders_lease_expires(tmp_path: Path) -> None:
    from mlflow_er.spool.reader import open_fs

    fs, _ = open_fs(str(tmp_path))
    path = str(tmp_path / "sync" / "k" / "lease.json")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    os.makedirs(os.path.dirname(path), mode=0o700)
    Path(path).write_text(json.dumps({"holder": "old", "host": socket.gethostname(), "pid": dead.pid,
                                      "since": "then", "ttl": 600, "renewal": 3}))
    with Lease(fs, path, ttl=600):  # same host, pid gone: taken at once, whatever its ttl
        assert json.loads(Path(path).read_text())["pid"] == os.getpid()
    # Another host's holder that stopped renewing: broken after the contender saw no renewal for its ttl.
    Path(path).write_text(json.dumps({"holder": "far", "host": "elsewhere", "pid": 1, "since": "then", "ttl": 0.6,
                                      "renewal": 9}))
    with pytest.raises(LeaseBusy, match="host elsewhere, pid 1, since then"):
        Lease(fs, path, ttl=0.6, wait=0).acquire()
    with Lease(fs, path, ttl=0.6, wait=5):
        assert json.loads(Path(path).read_text())["holder"] != "far"
    assert not os.path.exists(path)


def test_a_live_holder_renews_and_keeps_its_lease(tmp_path: Path) -> None:
    from mlflow_er.spool.reader import open_fs

    fs, _ = open_fs(str(tmp_path))
    path = str(tmp_path / "lease.json")
    holder = Lease(fs, path, ttl=0.6)
    holder.acquire()
    try:
        first = json.loads(Path(path).read_text())["renewal"]
        with pytest.raises(LeaseBusy):
            Lease(fs, path, ttl=0.6, wait=1.5).acquire()  # longer than the ttl: renewals keep it alive
        assert json.loads(Path(path).read_text())["renewal"] > first
        holder.check()  # still ours
    finally:
        holder.release()


def test_lease_on_s3_is_create_only(s3_bucket) -> None:
    fs, url = s3_bucket
    path = f"{url[5:]}/spool/sync/k/lease.json"
    a = Lease(fs, path, ttl=30)
    a.acquire()
    try:
        results = []

        def contend() -> None:
            try:
                Lease(fs, path, ttl=30).acquire()
                results.append("acquired")
            except LeaseBusy as exc:
                results.append(str(exc))

        threads = [threading.Thread(target=contend) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all("another mlflow-er sync" in r for r in results)
    finally:
        a.release()
    assert not fs.exists(path)
    b = Lease(fs, path, ttl=30)
    b.acquire()
    assert json.loads(fs.cat_file(path))["holder"] == b.me["holder"]
    b.release()
    time.sleep(0)  # the renewal thread is joined by release()
