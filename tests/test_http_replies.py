"""Only MLflow's own reply is "delivered" (issue 10 items 1, 13 and 16).

A proxy (:class:`servers.FaultServer`) sits in front of a real ``mlflow server`` and answers
``log-batch`` the way a login proxy, a captive portal or a broken network would. Every such
reply must be a counted, retried failure that ``flush()``/``close()`` raise, never a delivered
batch, and ``mlflow-er sync`` must not advance its progress past it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from servers import PROXY_MODES, FaultServer, MlflowServer, Reply

from mlflow_er import ExperimentTracker
from mlflow_er.errors import DeliveryError, SinkError
from mlflow_er.records import Batch, Metric, Param
from mlflow_er.sinks.mlflow import MlflowSink, check_reply, classify_mlflow_exception, run_rejected
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool.cli import EXIT_OK, EXIT_STOPPED, sync_main
from mlflow_er.spool.replay import SOURCE_RUN_TAG, target_key

LOG_BATCH = "runs/log-batch"
RUN = "0123456789abcdef0123456789abcdef"
TS = 1_700_000_000_000


def _batch(run_id: str = RUN, n: int = 3) -> Batch:
    return Batch.of(run_id, [Metric(run_id, "m", float(i), TS + i, i, i) for i in range(n)])


def _response(status: int, body: bytes, content_type: str | None = "application/json",
              headers: dict[str, str] | None = None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body
    if content_type:
        resp.headers["Content-Type"] = content_type
    resp.headers.update(headers or {})
    return resp


# -- the sink alone, against the proxy without upstream (fast) ------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", PROXY_MODES)
def test_a_reply_that_is_not_mlflows_is_a_transient_failure(mode: str) -> None:
    with FaultServer(script_paths=(LOG_BATCH,)) as proxy:
        sink = MlflowSink(proxy.uri, request_timeout=1.0)
        sink.write_batch(_batch())  # the proxy's default answer is MLflow's: 200 application/json {}
        proxy.set_mode(mode)
        with pytest.raises(SinkError) as info:
            sink.write_batch(_batch())
        # Transient: the store never judged the records, so they are retried, never declared bad
        # (sync would skip a permanently failed record for good).
        assert info.value.transient is True and info.value.whole_run is False
        assert "log-batch" in str(info.value)
        # A redirect is never followed: nobody asked the proxy for its login page.
        assert proxy.requests_to("/login") == []


@pytest.mark.parametrize("body", [b'"maintenance"', b"[]", b"null", b"", b"<html>busy</html>"])
def test_503_with_a_body_that_is_not_a_json_object_is_transient(body: bytes) -> None:
    with pytest.raises(SinkError) as info:
        check_reply(_response(503, body, headers={"Retry-After": "2"}), "log-batch")
    assert info.value.transient is True and info.value.retry_after == 2.0
    assert "HTTP 503" in str(info.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", ['"maintenance"', [], b"null"])
def test_503_non_object_body_through_the_sink_is_transient(fault_server: FaultServer, body: Any) -> None:
    fault_server.script(Reply(status=503, body=body))
    with pytest.raises(SinkError) as info:
        MlflowSink(fault_server.uri, request_timeout=2.0).write_batch(_batch())
    assert info.value.transient is True


@pytest.mark.parametrize("resp, ok", [
    (_response(200, b"{}"), True),
    (_response(200, b"{}", "application/json; charset=utf-8"), True),
    (_response(200, b"{}", "text/plain"), False),
    (_response(200, b"{}", None), False),
    (_response(200, b""), False),
    (_response(200, b"[]"), False),
    (_response(200, b"{trunc"), False),
    (_response(200, b'{"error_code": "INTERNAL_ERROR"}'), False),
    (_response(204, b""), False),
    (_response(302, b"", "text/html", {"Location": "http://u:pw12@sso/login"}), False),
])
def test_log_batch_success_is_200_json_object_only(resp: requests.Response, ok: bool) -> None:
    if ok:
        check_reply(resp, "log-batch")
        return
    with pytest.raises(SinkError) as info:
        check_reply(resp, "log-batch")
    assert info.value.transient is True
    assert "pw12" not in str(info.value)


def test_artifact_put_accepts_mlflows_empty_reply_but_not_html() -> None:
    check_reply(_response(200, b"", None), "artifact upload", json_object=False)  # what `mlflow server` answers
    check_reply(_response(200, b"{}"), "artifact upload", json_object=False)
    with pytest.raises(SinkError):
        check_reply(_response(200, b"<html>sign in</html>", "text/html"), "artifact upload", json_object=False)
    with pytest.raises(SinkError):
        check_reply(_response(302, b"", "text/html", {"Location": "/login"}), "artifact upload", json_object=False)


def test_size_refusal_from_a_proxy_is_permanent_so_the_batch_is_bisected() -> None:
    with pytest.raises(SinkError) as info:
        check_reply(_response(413, b"<html>Request Entity Too Large</html>", "text/html"), "log-batch")
    assert info.value.transient is False


# -- a run the store no longer accepts (item 13, sink side) ---------------------------------------
@pytest.mark.parametrize("code, message, whole", [
    ("RESOURCE_DOES_NOT_EXIST", "Run with id=abc not found", True),
    ("RESOURCE_DOES_NOT_EXIST", "Run 'abc' not found", True),
    ("INVALID_STATE", "whatever", True),
    ("INVALID_PARAMETER_VALUE", "The run abc must be in the 'active' state. Current state is deleted.", True),
    ("INVALID_PARAMETER_VALUE", "Run abc is not active", True),
    ("INVALID_PARAMETER_VALUE", "Invalid value 'x' for parameter 'metrics[0].value'", False),
    ("INVALID_PARAMETER_VALUE", "Changing param values is not allowed. Param with key='lr' was already logged",
     False),
    ("RESOURCE_DOES_NOT_EXIST", "Experiment 12 does not exist", False),
    ("INTERNAL_ERROR", "database is locked", False),
])
def test_run_rejected_classification(code: str, message: str, whole: bool) -> None:
    assert run_rejected(code, message) is whole
    status = 404 if code == "RESOURCE_DOES_NOT_EXIST" else 400
    with pytest.raises(SinkError) as info:
        check_reply(_response(status, json.dumps({"error_code": code, "message": message}).encode()), "log-batch")
    assert info.value.whole_run is whole
    if whole:
        assert info.value.transient is False
    err = classify_mlflow_exception(MlflowException(message, error_code=ErrorCode.Value(code)))
    assert err.whole_run is whole


@pytest.mark.server
@pytest.mark.timeout(60)
def test_deleted_or_missing_run_is_marked_whole_run_by_a_real_server(mlflow_server: MlflowServer) -> None:
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"gone-{uuid.uuid4().hex[:8]}")).info.run_id
    sink = MlflowSink(mlflow_server.uri)
    sink.write_batch(_batch(run_id))
    client.delete_run(run_id)
    for rid in (run_id, uuid.uuid4().hex):
        with pytest.raises(SinkError) as info:
            sink.write_batch(_batch(rid))
        assert info.value.whole_run is True and info.value.transient is False, str(info.value)
    # A bad record in a live run is not a whole-run failure.
    live = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    sink.write_batch(Batch.of(live, [Param(live, "lr", "1", TS, 0)]))
    with pytest.raises(SinkError) as info:
        sink.write_batch(Batch.of(live, [Param(live, "lr", "2", TS, 1)]))
    assert info.value.whole_run is False and info.value.transient is False


# -- through the threaded backend and a proxy in front of a real server ----------------------------
@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Any:
    with FaultServer(upstream=mlflow_server.uri, script_paths=(LOG_BATCH,)) as server:
        yield server


@pytest.mark.server
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", PROXY_MODES)
def test_threaded_tracker_behind_a_non_mlflow_proxy_raises_and_delivers_nothing(
        mlflow_server: MlflowServer, proxy: FaultServer, mode: str) -> None:
    n = 400
    tracker = ExperimentTracker(f"proxy-{mode}-{uuid.uuid4().hex[:6]}", tracking_uri=proxy.uri, backend="threaded",
                                backend_options={"retry_deadline": 1.5},
                                sink_options={"mlflow": {"request_timeout": 1.0}}, close_timeout=30)
    proxy.set_mode(mode)  # the start-up probe and run creation went through; log-batch does not
    with pytest.raises(DeliveryError) as info:
        with tracker.run(run_name="r") as run:
            run_id = run.run_id
            for i in range(n):
                run.log_metric("loss", i * 0.5, step=i)
            run.flush(timeout=30)
    stats = run.stats()
    assert stats["delivered"] == 0 and stats["failed"] == n, stats
    assert "not MLflow's reply" in str(info.value) or "no reply" in str(info.value), str(info.value)
    assert proxy.requests_to("/login") == []
    proxy.set_mode(None)
    if mode != "truncated":  # a truncated reply was committed upstream first, then cut off
        assert MlflowClient(mlflow_server.uri).get_metric_history(run_id, "loss") == []


def _spool(path: Path, run_id: str, n: int) -> None:
    sink = SpoolSink(path, experiment_name=f"sync-proxy-{uuid.uuid4().hex[:6]}", segment_bytes=8_000)
    sink.write_batch(Batch.of(run_id, [Metric(run_id, "k", float(i), TS + i, i, i) for i in range(n)]))
    sink.close()


@pytest.mark.server
@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["login-redirect", "html", "not-shape"])
def test_sync_through_a_login_proxy_marks_no_progress_and_a_good_rerun_delivers_once(
        tmp_path: Path, mlflow_server: MlflowServer, proxy: FaultServer, mode: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    n, run_id = 300, uuid.uuid4().hex
    spool = tmp_path / "spool"
    _spool(spool, run_id, n)
    proxy.set_mode(mode)
    code = sync_main([str(spool), "--tracking-uri", proxy.uri, "--retry-deadline", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_STOPPED, err
    assert "not MLflow's reply" in err
    progress = list((spool / "sync" / target_key(proxy.uri) / "progress").glob("*.json"))
    assert not any(json.loads(p.read_text()).get("done") for p in progress), [p.read_text() for p in progress]
    # A re-run against the server directly delivers everything, exactly once, into the run the
    # first attempt created (no twin).
    assert sync_main([str(spool), "--tracking-uri", mlflow_server.uri, "--no-progress"]) == EXIT_OK
    client = MlflowClient(mlflow_server.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (target,) = client.search_runs(experiments, filter_string=f"tags.`{SOURCE_RUN_TAG}` = '{run_id}'")
    history = client.get_metric_history(target.info.run_id, "k")
    assert sorted(m.step for m in history) == list(range(n)), f"{len(history)} rows for {n} records"
    assert sync_main([str(spool), "--tracking-uri", mlflow_server.uri, "--no-progress"]) == EXIT_OK
    assert len(client.get_metric_history(target.info.run_id, "k")) == n


@pytest.mark.server
@pytest.mark.timeout(60)
def test_artifacts_are_uploaded_with_checked_puts_and_fail_behind_a_login_proxy(
        mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(tmp_path / "staging"))
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A")
    (folder / "sub" / "b.txt").write_text("B")
    single = tmp_path / "model.bin"
    single.write_bytes(b"weights")
    with FaultServer(upstream=mlflow_server.uri, script_paths=("model.bin",)) as proxy:
        tracker = ExperimentTracker(f"art-{uuid.uuid4().hex[:6]}", tracking_uri=proxy.uri, backend="threaded",
                                    backend_options={"retry_deadline": 1.0}, close_timeout=30)
        with tracker.run(run_name="ok") as run:
            run.log_artifacts(folder, "ckpt")
            run.log_artifact(single, "models")
            run.flush(timeout=30)
        client = MlflowClient(mlflow_server.uri)
        local = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "down")))
        assert (local / "ckpt" / "a.txt").read_text() == "A" and (local / "ckpt" / "sub" / "b.txt").read_text() == "B"
        assert (local / "models" / "model.bin").read_bytes() == b"weights"
        puts = [r for r in proxy.requests if r.method == "PUT"]
        assert len(puts) == 3 and all(r.status == 200 for r in puts)
        proxy.set_mode("login-redirect")  # only the model.bin upload meets the login proxy
        with pytest.raises(DeliveryError, match="model.bin"):
            with tracker.run(run_name="behind-login") as run2:
                run2.log_artifact(single, "models")
                run2.flush(timeout=30)
        assert proxy.requests_to("/login") == []
    assert [f.path for f in client.list_artifacts(run2.run_id)] == []
