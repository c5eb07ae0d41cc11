"""A run's end from outside: bounded against a server that never answers, any order, nothing after.

- leaving a block never takes longer than ``close_timeout``, MLflow's own run-status update
  included, against a server that accepts connections and never answers (issue 10 item 11);
- nested runs ended in any order all get their status and MLflow's active-run stack is left
  clean (item 17);
- logging into a run whose block has ended raises at the call (item 18), for every backend.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import mlflow
import pytest
from mlflow import MlflowClient
from servers import FaultServer, MlflowServer, Reply

from mlflow_er import DeliveryError, ExperimentTracker, MlflowErError


@pytest.mark.server
@pytest.mark.timeout(90)
def test_leaving_a_block_is_bounded_by_close_timeout_against_a_silent_server(mlflow_server: MlflowServer) -> None:
    proxy = FaultServer(upstream=mlflow_server.uri,
                        script_paths=("/runs/log-batch", "/runs/update"), forward_timeout=120)
    proxy.start()
    try:
        tracker = ExperimentTracker("silent-end", tracking_uri=proxy.uri, backend="threaded", close_timeout=5)
        with pytest.raises(DeliveryError) as info:
            with tracker.run(run_name="r") as run:
                # From now on the server accepts and never answers writes: batches and the status update.
                proxy.script(*[Reply(delay=300, forward=False) for _ in range(50)])
                for i in range(100):
                    run.log_metric("m", float(i), step=i)
                t0 = time.monotonic()
        took = time.monotonic() - t0
    finally:
        proxy.stop()
    assert took < 5 + 10, f"leaving the block took {took:.0f}s with close_timeout=5"
    assert info.value.unsent == 100 and info.value.kept_in, "the unsent records are counted and kept"
    assert mlflow.active_run() is None


def test_nested_runs_ended_in_any_order_all_get_their_status(tracking_uri: str) -> None:
    tracker = ExperimentTracker("nested-order", tracking_uri=tracking_uri, backend="threaded")
    stacks = [ExitStack() for _ in range(6)]
    runs = []
    for i, stack in enumerate(stacks):
        runs.append(stack.enter_context(tracker.run(run_name=f"n{i}", nested=i > 0)))
        runs[-1].log_metric("depth", float(i))
    for i in (0, 3, 1, 5, 2, 4):  # not the order they were opened in
        stacks[i].close()
    client = MlflowClient(tracking_uri)
    for i, run in enumerate(runs):
        info = client.get_run(run.run_id)
        assert info.info.status == "FINISHED", (i, info.info.status)
        assert info.data.metrics["depth"] == float(i)
    assert mlflow.active_run() is None, "MLflow's active-run stack is clean"
    with tracker.run(run_name="next") as run:  # and the next run starts
        run.log_metric("ok", 1.0)
    assert client.get_run(run.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("backend", ["sync", "threaded", "process"])
def test_logging_after_the_block_ended_raises_at_the_call(tracking_uri: str, backend: str) -> None:
    tracker = ExperimentTracker("after-end", tracking_uri=tracking_uri, backend=backend)
    with tracker.run(run_name="r") as run:
        run.log_metric("m", 1.0)
    for call in (lambda: run.log_metric("m", 2.0), lambda: run.log_param("p", 1), lambda: run.set_tag("t", "x"),
                 lambda: run.log_metrics({"a": 1.0}), lambda: run.log_text("x", "x.txt")):
        with pytest.raises(MlflowErError, match="has ended"):
            call()
    stored = MlflowClient(tracking_uri).get_run(run.run_id)
    assert stored.data.metrics == {"m": 1.0} and stored.data.params == {}
