"""Health export: ``stats()`` of a live run logged into the run as ``mlflow_er.*`` metrics."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from mlflow_er import ExperimentTracker
from mlflow_er.health import FIELDS, interval

KEYS = [f"mlflow_er.{name}" for name in FIELDS]


def health_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mlflow-er-health")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["threaded", "sync"])
def test_health_metrics_every_interval_and_stop_at_run_end(backend: str, tracking_uri: str) -> None:
    tracker = ExperimentTracker("health", tracking_uri=tracking_uri, backend=backend, health_interval=0.2)
    with tracker.run(run_name="r") as run:
        rid = run.run_id
        t_end = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < t_end:
            run.log_metric("loss", 1.0 / (i + 1), step=i)
            i += 1
            time.sleep(0.01)
        assert len(health_threads()) == 1
    ended = MlflowClient(tracking_uri).get_run(rid)
    assert not health_threads(), "the health thread outlived its run"

    client = MlflowClient(tracking_uri)
    counts = {k: len(client.get_metric_history(rid, k)) for k in KEYS}
    assert all(n >= 3 for n in counts.values()), counts
    assert len(set(counts.values())) == 1, counts  # every sample logs every field
    history = client.get_metric_history(rid, "mlflow_er.delivered")
    assert [m.step for m in history] == list(range(len(history)))
    assert history[-1].timestamp <= ended.info.end_time  # the last sample was taken before the run ended
    # The last sample shows the block's end, before the final flush: each of the loop's
    # metrics is either delivered or still queued there.
    queued = client.get_metric_history(rid, "mlflow_er.queue_depth")[-1].value
    assert history[-1].value + queued >= i
    assert len(client.get_metric_history(rid, "loss")) == i

    time.sleep(0.6)  # three more intervals: nothing may arrive after the run ended
    assert {k: len(client.get_metric_history(rid, k)) for k in KEYS} == counts


@pytest.mark.timeout(30)
def test_health_off_by_default_and_env_turns_it_on(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = ExperimentTracker("health-off", tracking_uri=tracking_uri)
    with tracker.run(run_name="off") as run:
        run.log_metric("loss", 1.0)
    assert set(MlflowClient(tracking_uri).get_run(run.run_id).data.metrics) == {"loss"}

    monkeypatch.setenv("MLFLOW_ER_HEALTH_INTERVAL", "30")
    tracker = ExperimentTracker("health-off", tracking_uri=tracking_uri)
    assert tracker.health_interval == 30.0
    with tracker.run(run_name="env") as run:
        pass
    # far shorter than the interval: only the final sample, at step 0
    history = MlflowClient(tracking_uri).get_metric_history(run.run_id, "mlflow_er.queue_depth")
    assert [m.step for m in history] == [0]


def test_interval_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert interval(None) is None
    assert interval(2) == 2.0
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="positive"):
            interval(bad)
    monkeypatch.setenv("MLFLOW_ER_HEALTH_INTERVAL", "soon")
    with pytest.raises(ValueError, match="MLFLOW_ER_HEALTH_INTERVAL"):
        interval(None)
