"""A tracker whose sinks are all spools runs offline: no tracking server is contacted."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import CountingListener

from mlflow_er import ExperimentTracker, MlflowErError


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["sync", "threaded"])
def test_spool_only_tracker_never_contacts_the_server_and_sync_replays(backend: str, tmp_path: Path,
                                                                         tracking_uri: str) -> None:
    from mlflow_er.spool.cli import sync_main

    listener = CountingListener()
    spool = tmp_path / "spool"
    try:
        tracker = ExperimentTracker("offline-exp", tracking_uri=listener.uri, backend=backend, sinks=["spool"],
                                    sink_options={"spool": {"path": str(spool)}}, team="ml")
        assert tracker.offline
        with tracker.run(run_name="offline-run", description="no network", lr_tag="x") as run:
            for i in range(300):
                run.log_metric("loss", 1.0 / (i + 1), step=i)
            run.log_param("lr", 0.01)
            run.set_tag("phase", "a")
            run.set_tag("phase", "b")
            run.log_text("hello", "notes/hello.txt")
            with tracker.run(run_name="child", nested=True) as child:
                child.log_metric("acc", 0.5, step=0)
            with pytest.raises(MlflowErError, match="offline"):
                _ = run.info
        with pytest.raises(MlflowErError, match="offline"):
            tracker.find_run(run_name="offline-run")
        assert tracker.name == "offline-exp"
    finally:
        listener.close()
    assert listener.connections == 0, "an offline tracker must not contact the tracking server"

    # Later, from anywhere: replay into a real store.
    assert sync_main([str(spool), "--tracking-uri", tracking_uri]) == 0
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("offline-exp")
    assert exp is not None
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"offline-run", "child"}
    parent = runs["offline-run"]
    assert len(client.get_metric_history(parent.info.run_id, "loss")) == 300
    assert parent.data.params == {"lr": "0.01"}
    assert parent.data.tags["phase"] == "b"
    assert parent.data.tags.get("mlflow.note.content") == "no network"
    assert parent.info.status == "FINISHED"
    assert runs["child"].data.tags.get("mlflow.parentRunId") == parent.info.run_id
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "notes")] == ["notes/hello.txt"]


@pytest.mark.timeout(60)
def test_offline_tracker_on_a_sqlite_uri_creates_no_database(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    tracker = ExperimentTracker("offline-sqlite", tracking_uri=f"sqlite:///{db}", sinks=["spool"],
                                sink_options={"spool": {"path": str(tmp_path / "spool")}})
    with tracker.run(run_name="r") as run:
        run.log_metric("m", 1.0)
    assert not db.exists(), "an offline tracker must not touch the tracking store"
