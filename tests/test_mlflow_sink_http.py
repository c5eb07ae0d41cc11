"""The mlflow sink's hand-written log-batch JSON against a real server."""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from mlflow_er.records import Batch, Metric, Param, Tag
from mlflow_er.sinks.mlflow import MlflowSink


@pytest.mark.server
@pytest.mark.timeout(60)
def test_json_body_round_trips_through_a_real_server(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment("sink-json")
    run_id = client.create_run(exp).info.run_id
    values = [float("nan"), math.inf, -math.inf, 1e300, -0.0, 0.1, 123456789.125]
    metrics = [Metric(run_id, f"m{i}", v, 1_700_000_000_000 + i, 2**62 + i, i) for i, v in enumerate(values)]
    params = [Param(run_id, "quote", 'a "quoted" \\ value\n', 1, 100), Param(run_id, "unicode", "héllo ✓", 1, 101)]
    tags = [Tag(run_id, "path/like:key", "x" * 8000, 1, 102)]
    MlflowSink(mlflow_server.uri).write_batch(Batch.of(run_id, [*metrics, *params, *tags]))
    data = client.get_run(run_id).data
    for i, v in enumerate(values):
        (stored,) = client.get_metric_history(run_id, f"m{i}")
        assert stored.step == 2**62 + i and stored.timestamp == 1_700_000_000_000 + i
        if math.isnan(v):
            assert math.isnan(stored.value)
        elif math.isinf(v):
            assert stored.value == math.copysign(1.7976931348623157e308, v)  # the SQL store clamps inf
        else:
            assert stored.value == v
    assert data.params == {"quote": 'a "quoted" \\ value\n', "unicode": "héllo ✓"}
    assert data.tags["path/like:key"] == "x" * 8000


def test_a_server_out_of_database_connections_is_retried_not_bisected() -> None:
    """MLflow answers BAD_REQUEST when its SQLAlchemy pool runs dry (16 writers on PostgreSQL did it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    from mlflow_er.sinks.mlflow import classify_mlflow_exception

    pool = MlflowException("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00",
                           BAD_REQUEST)
    assert classify_mlflow_exception(pool).transient
    assert not classify_mlflow_exception(MlflowException("Invalid value for metric 'x'", BAD_REQUEST)).transient
