"""The core fault rows against a production-shaped server: ``mlflow server`` on PostgreSQL with S3 artifacts.

Counts are read straight from PostgreSQL (``prod.metric_rows``), not through the server:
a row that is there once per step is a record stored exactly once.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from servers import FaultServer

from mlflow_er import DeliveryError, ExperimentTracker

pytestmark = pytest.mark.server


def tracker_for(uri: str, name: str, **kwargs: Any) -> ExperimentTracker:
    return ExperimentTracker(name, tracking_uri=uri, backend="threaded", **kwargs)


@pytest.mark.timeout(240)  # + the session server's start, charged to the first user
def test_server_sigkill_and_restart_while_logging_loses_nothing(prod: Any) -> None:
    tracker = tracker_for(prod.uri, "prod-kill")
    with tracker.run(run_name="through-a-crash") as run:
        for i in range(300):
            run.log_metric("loss", 1.0 / (i + 1), step=i)
        assert prod.server is not None
        prod.server.kill()  # SIGKILL the whole server while the writer is delivering
        for i in range(300, 600):
            run.log_metric("loss", 1.0 / (i + 1), step=i)
        run.log_param("lr", 0.01)
        prod.server.start(timeout=120)
        for i in range(600, 900):
            run.log_metric("loss", 1.0 / (i + 1), step=i)
        run.flush(timeout=90)
        stats = run.stats()
    assert prod.metric_rows(run.run_id) == {"loss": (900, 900)}  # every step once, none twice
    assert stats["retries"] >= 1 and stats["failed"] == 0 and stats["dropped_total"] == 0
    assert prod.sql("SELECT status FROM runs WHERE run_uuid = %s", run.run_id) == [("FINISHED",)]
    assert prod.sql("SELECT value FROM params WHERE run_uuid = %s AND key = 'lr'", run.run_id) == [("0.01",)]


@pytest.mark.timeout(210)  # + the session server's start, charged to the first user
@pytest.mark.parametrize("status", [503, 429])
def test_storm_of_busy_replies_is_ridden_out(prod: Any, status: int) -> None:
    with FaultServer(upstream=prod.uri, script_paths=("runs/log-batch",)) as proxy:
        tracker = tracker_for(proxy.uri, f"prod-storm-{status}")
        with tracker.run(run_name="storm") as run:
            proxy.fail_for(2.0, status, headers={"Retry-After": "1"},
                           body={"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"})
            for i in range(400):
                run.log_metrics({"loss": float(i), "acc": i / 400}, step=i)
            run.flush(timeout=60)
            stats = run.stats()
        refused = [r for r in proxy.requests_to("runs/log-batch") if r.status == status]
    assert refused, "the storm never hit a log-batch request"
    assert prod.metric_rows(run.run_id) == {"loss": (400, 400), "acc": (400, 400)}
    assert stats["retries"] >= len(refused) and stats["failed"] == 0


@pytest.mark.timeout(180)  # + the session server's start, charged to the first user
def test_permanent_error_is_named_at_flush_and_the_rest_is_stored(prod: Any) -> None:
    tracker = tracker_for(prod.uri, "prod-permanent")
    with tracker.run(run_name="conflict") as run:
        # Another client set lr first: the server (PostgreSQL's unique key) refuses a different value.
        MlflowClient(prod.uri).log_param(run.run_id, "lr", "0.1")
        run.log_param("lr", 0.5)
        for i in range(250):
            run.log_metric("loss", float(i), step=i)
        with pytest.raises(DeliveryError, match="lr") as caught:
            run.flush(timeout=60)
        assert "INVALID_PARAMETER_VALUE" in str(caught.value)
        stats = run.stats()
    assert stats["failed"] == 1
    assert prod.metric_rows(run.run_id) == {"loss": (250, 250)}
    assert prod.sql("SELECT value FROM params WHERE run_uuid = %s", run.run_id) == [("0.1",)]


@pytest.mark.timeout(180)  # + the session server's start, charged to the first user
@pytest.mark.parametrize("door", ["http", "postgresql"])
def test_threaded_scheme_with_plain_fluent_calls(prod: Any, monkeypatch: pytest.MonkeyPatch, door: str) -> None:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)
    # threaded+http://: a training node talking to the server. threaded+postgresql://: the same
    # database the server uses, written directly (a job on the database's network).
    uri = "threaded+" + (prod.uri if door == "http" else prod.db_uri("postgresql"))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        exp_id = mlflow.set_experiment(f"prod-fluent-{door}").experiment_id
        with mlflow.start_run(run_name="fluent") as active:
            for i in range(500):
                mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
            mlflow.log_metrics({"acc": 0.9, "f1": 0.8}, step=500)
            mlflow.log_param("lr", 0.01)
            mlflow.set_tag("phase", "train")
            if door == "http":  # proxied artifacts: through the server into S3
                mlflow.log_text("from a node", "notes/node.txt")
        rid = active.info.run_id
    finally:
        import mlflow.tracking.fluent as fluent

        while mlflow.active_run():
            mlflow.end_run()
        fluent._active_experiment_id = None  # set_experiment's choice must not follow the next test
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]
    assert prod.metric_rows(rid) == {"loss": (500, 500), "acc": (1, 1), "f1": (1, 1)}
    # The server reads the same rows back: one database, two doors.
    via_server = MlflowClient(prod.uri).get_run(rid)
    assert via_server.info.experiment_id == exp_id and via_server.info.status == "FINISHED"
    assert via_server.data.params == {"lr": "0.01"} and via_server.data.tags["phase"] == "train"
    if door == "http":
        key = f"{prod.bucket}/mlflow/{exp_id}/{rid}/artifacts/notes/node.txt"
        assert prod.s3.fs().cat_file(key) == b"from a node"


@pytest.mark.timeout(180)  # + the session server's start, charged to the first user
def test_artifacts_land_in_s3_through_the_server(prod: Any, tmp_path: Any) -> None:
    weights = tmp_path / "weights.bin"
    payload = bytes(range(256)) * 4096  # 1 MiB
    weights.write_bytes(payload)
    tracker = tracker_for(prod.uri, "prod-artifacts")
    with tracker.run(run_name="art") as run:
        run.log_artifact(str(weights), "model")
        run.log_dict({"layers": 3}, "config/model.json")
        run.log_text("hello s3", "notes/readme.txt")
    base = f"{prod.bucket}/mlflow/{tracker.id}/{run.run_id}/artifacts"
    fs = prod.s3.fs()
    assert sorted(p.removeprefix(base + "/") for p in fs.find(base)) == [
        "config/model.json", "model/weights.bin", "notes/readme.txt"]
    assert fs.cat_file(f"{base}/model/weights.bin") == payload
    assert json.loads(fs.cat_file(f"{base}/config/model.json")) == {"layers": 3}
    assert fs.cat_file(f"{base}/notes/readme.txt") == b"hello s3"


def test_deployment_doc_names_only_tests_that_exist() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "deployment.md").read_text()
    sources = {p.name: p.read_text() for p in (root / "tests").glob("test_*.py")}
    files = set(re.findall(r"\b(test_\w+\.py)\b", doc))
    names = set(re.findall(r"::(test_\w+)", doc))
    assert files and names, "docs/deployment.md names no tests"
    assert files <= set(sources), f"docs/deployment.md names missing test files: {files - set(sources)}"
    defined = {n for text in sources.values() for n in re.findall(r"^def (test_\w+)\(", text, re.M)}
    assert names <= defined, f"docs/deployment.md names missing tests: {names - defined}"
