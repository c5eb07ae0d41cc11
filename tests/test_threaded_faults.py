"""Fault matrix of the threaded backend against real and scripted MLflow servers.

Each test is one row of issue 3: the server crashes and comes back, answers 503/429 for a
while, commits a batch but answers after the client gave up, rejects a record for good,
loses the run, or fails forever. Delivery is checked in the real store (metric history),
never only in the backend's own counters.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from mlflow import MlflowClient
from servers import FaultServer, MlflowServer, Reply

from mlflow_er import ExperimentTracker
from mlflow_er.backends.threaded import ThreadedBackend
from mlflow_er.errors import DeliveryError

LOG_BATCH = "runs/log-batch"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _delivered_metrics(proxy: FaultServer) -> list[tuple[str, int]]:
    """(key, step) of every metric in a log-batch request the upstream committed and answered 200 for."""
    out = []
    for r in proxy.requests_to(LOG_BATCH):
        if r.forwarded and r.status == 200:
            out.extend((m["key"], int(m.get("step", 0))) for m in r.body.get("metrics", []))
    return out


# -- server killed with SIGKILL and restarted ----------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(150)
def test_server_sigkill_and_restart_exactly_n_rows(restartable_mlflow_server: MlflowServer) -> None:
    server = restartable_mlflow_server
    tracker = ExperimentTracker(_name("kill9"), tracking_uri=server.uri, backend="threaded", close_timeout=60)
    kill_at = 300
    outage: dict[str, float] = {}

    def crash_and_restart() -> None:
        outage["down"] = time.monotonic()
        server.kill()
        time.sleep(1.0)  # stay down a while even if the restart is quick
        server.start()
        outage["up"] = time.monotonic()

    chaos = threading.Thread(target=crash_and_restart, daemon=True)
    worst = 0.0
    n = after_up = 0
    began = time.monotonic()
    with tracker.run(run_name="r") as run:
        # A training loop that keeps logging before, during and after the outage.
        while n < kill_at or chaos.is_alive() or after_up < 300:
            if n == kill_at:
                chaos.start()
            t0 = time.perf_counter()
            run.log_metric("loss", n * 0.5, step=n)
            worst = max(worst, time.perf_counter() - t0)
            n += 1
            after_up += "up" in outage
            time.sleep(0.003)
            assert time.monotonic() - began < 90, "server did not come back"
        assert "up" in outage, "server did not come back"
        stats_during = run.stats()
        t_flush = time.monotonic()
        run.flush(timeout=60)
        flush_took = time.monotonic() - t_flush
        stats = run.stats()
    print(f"n={n} outage={outage['up'] - outage['down']:.1f}s flush={flush_took:.1f}s worst={worst * 1000:.1f}ms")
    # The loop really ran while the server was down.
    assert outage["up"] - outage["down"] > 1.0
    assert worst < 0.5, f"a log call blocked for {worst:.3f}s while the server was down"
    hist = _history(MlflowClient(server.uri), run.run_id, "loss")
    assert len(hist) == n, f"{len(hist)} rows for {n} logged (duplicates or losses)"
    assert hist == [(i, i * 0.5) for i in range(n)]
    assert stats["retries"] > 0, (stats_during, stats)
    assert stats["failed"] == 0 and stats["dropped_total"] == 0


# -- 503 and 429 + Retry-After storms --------------------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("status", "headers"), [(503, None), (429, {"Retry-After": "1"})], ids=["503", "429"])
def test_transient_storm_delivers_all_once(mlflow_server: MlflowServer, status: int,
                                           headers: dict[str, str] | None) -> None:
    n = 600
    with FaultServer(upstream=mlflow_server.uri, script_paths=(LOG_BATCH,)) as proxy:
        tracker = ExperimentTracker(_name(f"storm{status}"), tracking_uri=proxy.uri, backend="threaded",
                                    close_timeout=60)
        with tracker.run(run_name="r") as run:
            proxy.fail_for(2.0, status=status, headers=headers)
            started = time.monotonic()
            for i in range(n):
                run.log_metric("m", float(i), step=i)
            run.flush(timeout=60)
            took = time.monotonic() - started
            stats = run.stats()
        batch_reqs = proxy.requests_to(LOG_BATCH)
        rejected = [r for r in batch_reqs if r.status == status]
    assert rejected, "the storm never hit a log-batch request"
    assert took >= 1.5, "flush returned while the server was still refusing"
    assert stats["retries"] >= len(rejected) > 0
    assert stats["failed"] == 0 and stats["delivered"] == n
    # Delivered once: each metric sits in exactly one committed request, and once in the store.
    committed = _delivered_metrics(proxy)
    assert sorted(committed) == [("m", i) for i in range(n)]
    assert _history(MlflowClient(mlflow_server.uri), run.run_id, "m") == [(i, float(i)) for i in range(n)]
    if headers:  # Retry-After honoured: no retry came sooner than the server asked
        times = [r.time for r in batch_reqs if r.status == status]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(times) >= 2 and all(g >= 0.9 for g in gaps), gaps


# -- committed, but answered after the client's timeout --------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(90)
def test_commit_then_late_reply_exactly_n_rows(mlflow_server: MlflowServer) -> None:
    n = 2500  # three batches
    with FaultServer(upstream=mlflow_server.uri, script_paths=(LOG_BATCH,)) as proxy:
        tracker = ExperimentTracker(_name("late"), tracking_uri=proxy.uri, backend="threaded",
                                    sink_options={"mlflow": {"request_timeout": 1}}, close_timeout=60)
        with tracker.run(run_name="r") as run:
            # The first two log-batch requests are committed upstream, then answered after 2.5 s.
            proxy.script(Reply(delay=2.5), Reply(delay=2.5))
            for i in range(n):
                run.log_metric("m", i / 10, step=i)
            run.flush(timeout=60)
            stats = run.stats()
        reqs = proxy.requests_to(LOG_BATCH)
    assert proxy.pending == 0
    assert all(r.forwarded for r in reqs)
    assert sum(len(r.body.get("metrics", [])) for r in reqs) > n, "nothing was re-sent after a timeout"
    assert stats["retries"] >= 2 and stats["failed"] == 0
    hist = _history(MlflowClient(mlflow_server.uri), run.run_id, "m")
    assert len(hist) == n, f"{len(hist)} rows for {n} logged"
    assert hist == [(i, i / 10) for i in range(n)]


# -- a permanent rejection inside a merged batch ---------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(60)
def test_changed_param_in_batch_names_key_and_metrics_land(mlflow_server: MlflowServer) -> None:
    tracker = ExperimentTracker(_name("param"), tracking_uri=mlflow_server.uri, backend="threaded",
                                close_timeout=30)
    client = MlflowClient(mlflow_server.uri)
    with pytest.raises(DeliveryError) as info, tracker.run(run_name="r") as run:
        client.log_param(run.run_id, "lr", "1")  # behind the handle's back
        run.log_param("lr", "2")
        run.log_metrics({f"m{i}": float(i) for i in range(50)}, step=7)
        run.flush(timeout=30)
    err = info.value
    assert [(f.kind, f.key) for f in err.failed] == [("param", "lr")]
    assert err.failed[0].permanent
    assert "lr" in str(err)
    data = client.get_run(run.run_id).data
    assert data.params["lr"] == "1"
    assert data.metrics == {f"m{i}": float(i) for i in range(50)}
    for i in (0, 25, 49):
        assert _history(client, run.run_id, f"m{i}") == [(7, float(i))]


# -- the run deleted on the server -----------------------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(60)
def test_run_deleted_on_server_raises_at_flush_without_endless_retry(mlflow_server: MlflowServer) -> None:
    with FaultServer(upstream=mlflow_server.uri) as proxy:
        tracker = ExperimentTracker(_name("deleted"), tracking_uri=proxy.uri, backend="threaded",
                                    close_timeout=30)
        client = MlflowClient(mlflow_server.uri)
        with tracker.run(run_name="r") as run:
            client.delete_run(run.run_id)
            for i in range(20):
                run.log_metric("m", float(i), step=i)
            t0 = time.monotonic()
            with pytest.raises(DeliveryError) as info:
                run.flush(timeout=30)
            took = time.monotonic() - t0
            sent = len(proxy.requests_to(LOG_BATCH))
            time.sleep(1.0)
            assert len(proxy.requests_to(LOG_BATCH)) == sent, "still sending after flush reported the failure"
            stats = run.stats()
            client.restore_run(run.run_id)  # let the block end the run normally
    err = info.value
    assert took < 10, f"flush took {took:.1f}s on a permanent error"
    assert len(err.failed) == 20 and {f.key for f in err.failed} == {"m"}
    assert all(f.permanent for f in err.failed)
    assert stats["retries"] == 0 and stats["failed"] == 20
    assert sent <= 2 * 20, f"{sent} requests for 20 records"


# -- 500 forever: the retry deadline --------------------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(60)
def test_500_forever_stops_at_retry_deadline(mlflow_server: MlflowServer) -> None:
    n, deadline = 40, 2.0
    with FaultServer(upstream=mlflow_server.uri, script_paths=(LOG_BATCH,)) as proxy:
        tracker = ExperimentTracker(_name("forever"), tracking_uri=proxy.uri,
                                    backend=ThreadedBackend(retry_deadline=deadline), close_timeout=30)
        with tracker.run(run_name="r") as run:
            proxy.fail_for(600, status=500, body={"error_code": "INTERNAL_ERROR", "message": "boom"})
            for i in range(n):
                run.log_metric("m", float(i), step=i)
            t0 = time.monotonic()
            with pytest.raises(DeliveryError) as info:
                run.flush(timeout=30)
            took = time.monotonic() - t0
            sent = len(proxy.requests_to(LOG_BATCH))
            time.sleep(1.0)
            after = len(proxy.requests_to(LOG_BATCH))
            stats = run.stats()
            proxy.fail_for(0)
    err = info.value
    assert deadline - 0.5 <= took < deadline + 3, f"flush took {took:.1f}s with retry_deadline={deadline}"
    assert after == sent, "retries went on after the deadline"
    assert sent >= 2 and stats["retries"] >= 1
    assert len(err.failed) == n and not any(f.permanent for f in err.failed)
    assert f"{n} record(s) failed" in str(err)
    assert stats["failed"] == n and stats["delivered"] == 0
    assert MlflowClient(mlflow_server.uri).get_metric_history(run.run_id, "m") == []
