"""The test helpers in ``servers.py`` work as promised."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from servers import FaultServer, MlflowServer, MotoS3, Reply, free_port, port_is_free


def _post(uri: str, path: str, body: Any, timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
    """POST JSON with plain urllib: no client-side retries hiding what the server did."""
    req = urllib.request.Request(
        uri + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    assert port_is_free(port)


@pytest.mark.server
@pytest.mark.timeout(120)
def test_mlflow_server_health_and_client(mlflow_server: MlflowServer) -> None:
    with urllib.request.urlopen(f"{mlflow_server.uri}/health", timeout=5) as resp:
        assert resp.status == 200
    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment(f"health-{time.time_ns()}")
    run = client.create_run(exp_id)
    client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.5, 0, 3)])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.value, m.step) for m in history] == [(0.5, 3)]
    assert mlflow_server.uri.startswith("http://127.0.0.1:")


@pytest.mark.server
@pytest.mark.timeout(180)
def test_kill_and_restart_keeps_data(restartable_mlflow_server: MlflowServer) -> None:
    server = restartable_mlflow_server
    port, name = server.port, f"survivor-{time.time_ns()}"
    exp_id = MlflowClient(server.uri).create_experiment(name)

    server.kill()
    assert not server.is_running()
    assert port_is_free(port)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.uri}/health", timeout=2)

    server.restart()
    assert server.port == port
    exp = MlflowClient(server.uri).get_experiment_by_name(name)
    assert exp is not None and exp.experiment_id == exp_id


class _DoomedServer(MlflowServer):
    def command(self) -> list[str]:
        return [sys.executable, "-c", "import sys; print('kaboom', file=sys.stderr); sys.exit(3)"]


@pytest.mark.timeout(30)
def test_start_failure_reports_log(tmp_path: Path) -> None:
    server = _DoomedServer(tmp_path)
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*kaboom"):
        server.start(timeout=20)
    assert not server.is_running()


@pytest.mark.timeout(30)
def test_fault_server_script_in_order(fault_server: FaultServer) -> None:
    fault_server.script(
        Reply(status=503),
        Reply(status=429, headers={"Retry-After": "1"}),
        Reply(status=500, body={"error_code": "INTERNAL_ERROR", "message": "boom"}),
        Reply(status=400, body={"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}),
    )
    results = [_post(fault_server.uri, LOG_BATCH, {"run_id": "r", "metrics": [i]}) for i in range(5)]

    assert [status for status, _, _ in results] == [503, 429, 500, 400, 200]
    assert results[1][1].get("Retry-After") == "1"
    assert results[2][2] == {"error_code": "INTERNAL_ERROR", "message": "boom"}
    assert results[3][2]["error_code"] == "INVALID_PARAMETER_VALUE"
    assert results[4][2] == {}
    assert fault_server.pending == 0

    recorded = fault_server.requests
    assert [r.path for r in recorded] == [LOG_BATCH] * 5
    assert [r.body["metrics"] for r in recorded] == [[i] for i in range(5)]
    assert [r.status for r in recorded] == [503, 429, 500, 400, 200]
    assert recorded == sorted(recorded, key=lambda r: r.time)


@pytest.mark.timeout(30)
def test_fault_server_fake_run_and_delay(fault_server: FaultServer) -> None:
    with urllib.request.urlopen(f"{fault_server.uri}/api/2.0/mlflow/runs/get?run_id=abc", timeout=5) as r:
        assert json.loads(r.read())["run"]["info"]["run_id"] == "abc"
    # The client's MLflow REST layer can parse the fake run.
    assert MlflowClient(fault_server.uri).get_run("abc").info.run_id == "abc"

    fault_server.script(Reply(delay=2.0, status=200))
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _post(fault_server.uri, LOG_BATCH, {"run_id": "abc"}, timeout=0.5)
    assert time.monotonic() - t0 < 1.5

    fault_server.script(Reply(disconnect=True))
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        _post(fault_server.uri, LOG_BATCH, {"run_id": "abc"})


@pytest.mark.timeout(30)
def test_fault_server_fail_for(fault_server: FaultServer) -> None:
    fault_server.script(Reply(status=418))
    fault_server.fail_for(1.0, status=503, headers={"Retry-After": "0"})
    status, headers, _ = _post(fault_server.uri, LOG_BATCH, {})
    assert (status, headers.get("Retry-After")) == (503, "0")
    assert _post(fault_server.uri, LOG_BATCH, {})[0] == 503
    # The failure window takes precedence and does not consume the script.
    assert fault_server.pending == 1

    time.sleep(1.1)
    assert _post(fault_server.uri, LOG_BATCH, {})[0] == 418
    assert _post(fault_server.uri, LOG_BATCH, {})[0] == 200


@pytest.mark.timeout(30)
def test_fault_server_script_paths() -> None:
    with FaultServer(script=[Reply(status=503)], script_paths=("runs/log-batch",)) as fs:
        assert _post(fs.uri, "/api/2.0/mlflow/runs/update", {})[0] == 200
        assert _post(fs.uri, LOG_BATCH, {})[0] == 503
        assert [r.path for r in fs.requests_to("log-batch")] == [LOG_BATCH]


@pytest.mark.server
@pytest.mark.timeout(120)
def test_fault_server_proxies_to_real_server(mlflow_server: MlflowServer) -> None:
    real = MlflowClient(mlflow_server.uri)
    run_id = real.create_run(real.create_experiment(f"proxy-{time.time_ns()}")).info.run_id

    script = [
        Reply(status=503),  # rejected before commit: must not reach upstream
        Reply(delay=1.5),  # committed upstream, answered after the client gave up
        Reply(status=500, forward=True),  # committed upstream, client sees an error
    ]
    with FaultServer(script=script, upstream=mlflow_server.uri) as proxy:
        batch = {"run_id": run_id, "params": [{"key": "p0", "value": "x"}]}
        assert _post(proxy.uri, LOG_BATCH, batch)[0] == 503
        assert real.get_run(run_id).data.params == {}

        batch = {"run_id": run_id, "metrics": [{"key": "m", "value": 1.0, "timestamp": 1, "step": 1}]}
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            _post(proxy.uri, LOG_BATCH, batch, timeout=0.5)
        deadline = time.monotonic() + 10
        while not real.get_metric_history(run_id, "m") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [m.step for m in real.get_metric_history(run_id, "m")] == [1]

        batch = {"run_id": run_id, "params": [{"key": "p2", "value": "y"}]}
        assert _post(proxy.uri, LOG_BATCH, batch)[0] == 500
        assert real.get_run(run_id).data.params == {"p2": "y"}

        # Script empty: plain forwarding, through MLflow's own client.
        MlflowClient(proxy.uri).log_batch(run_id, params=[Param("p3", "z")])
        assert real.get_run(run_id).data.params == {"p2": "y", "p3": "z"}
        assert [r.forwarded for r in proxy.requests_to("log-batch")] == [False, True, True, True]


@pytest.mark.timeout(60)
def test_moto_s3_roundtrip(s3_bucket: tuple[Any, str], moto_s3: MotoS3) -> None:
    fs, url = s3_bucket
    assert moto_s3.endpoint_url.startswith("http://127.0.0.1:")
    fs.pipe(f"{url}/dir/a.txt", b"hello")
    assert fs.cat(f"{url}/dir/a.txt") == b"hello"
    # A second, independent filesystem sees the same object: it really went through S3.
    assert moto_s3.fs().ls(f"{url}/dir") == [f"{url.removeprefix('s3://')}/dir/a.txt"]
    assert os.environ["AWS_ENDPOINT_URL"] == moto_s3.endpoint_url


def test_memfs_starts_empty(memfs: Any) -> None:
    assert memfs.ls("/") == []
    memfs.pipe("memory://x/y.bin", b"1")
    assert memfs.cat("memory://x/y.bin") == b"1"


def test_tracking_uri_fixture(tracking_uri: str, tmp_path: Path) -> None:
    assert tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == tracking_uri
    assert Path.cwd() == tmp_path
    with mlflow.start_run():
        mlflow.log_metric("a", 1.0)
    assert (tmp_path / "mlflow.db").exists()
