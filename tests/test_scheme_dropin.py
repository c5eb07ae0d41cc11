"""Acceptance (issue 11): ``threaded+``/``spool+`` behave as a drop-in for MLflow.

Each test reproduces one class of difference found by running MLflow's own tests against the
scheme: lost updates, reads that lag writes, other error messages, params not checked against
the store, writes after a run's end, and a spool that does not know what was delivered live.
Real stores only (SQLite in a tmp dir); where MLflow's own behaviour is the reference, the
same calls run on the plain URI first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mlflow_er import DeliveryError, mlflow_store


@pytest.fixture(scope="module")
def _template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated MLflow database per module: creating one costs seconds, copying it nothing."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts")).engine.dispose()
    return path


@pytest.fixture
def tracking_uri(_template_db: Path, tmp_path: Path, tracking_uri: str) -> str:
    """The conftest's ``tracking_uri`` (a fresh SQLite store in ``tmp_path``), its database copied from the template."""
    import shutil

    shutil.copyfile(_template_db, tmp_path / "mlflow.db")  # before anything opens it
    return tracking_uri


@pytest.fixture(params=["threaded+", "process+"])
def prefix(request: pytest.FixtureRequest, use_uri: Callable[[str], str], tracking_uri: str) -> Iterator[str]:
    """Each way the schemes deliver: a writer thread (``threaded+``), a spawned delivery process (``process+``).

    The route is closed at the end of the test, so its delivery process does not outlive it.
    """
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry

    from mlflow_er.scheme_route import _routes

    # An editable install made before process+ existed has no entry point for it: the same builder.
    registry._registry.setdefault(request.param + "sqlite", mlflow_store.build_store)
    yield request.param
    while mlflow.active_run():  # ended here, before the route closes (use_uri's teardown comes later)
        try:
            mlflow.end_run()
        except DeliveryError:
            pass
    route = _routes.pop((request.param[:-1], tracking_uri), None)
    if route is not None:
        try:
            route.backend.close(30)
        except DeliveryError:
            pass  # what failed was the test's to check


@pytest.fixture
def slow_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch the scheme delivers takes 0.2 s more: a read that does not wait for it sees stale data."""
    import time

    from mlflow_er.sinks.mlflow import MlflowSink

    original = MlflowSink.write_batch

    def slow(self: MlflowSink, batch: Any) -> None:
        time.sleep(0.2)
        original(self, batch)

    monkeypatch.setattr(MlflowSink, "write_batch", slow)




# -- lost updates: MLflow reads a tag, then writes it back -------------------------------------
@pytest.mark.timeout(60)
def test_two_log_table_calls_keep_both_tables(use_uri, tracking_uri: str, slow_store: None) -> None:
    use_uri("threaded+" + tracking_uri)
    with mlflow.start_run() as active:
        mlflow.log_table({"a": [1, 2]}, "t1.json")
        mlflow.log_table({"a": [3, 4]}, "t2.json")
    tag = MlflowClient(tracking_uri).get_run(active.info.run_id).data.tags["mlflow.loggedArtifacts"]
    assert [t["path"] for t in json.loads(tag)] == ["t1.json", "t2.json"]
    assert list(mlflow.load_table("t2.json", run_ids=[active.info.run_id])["a"]) == [3, 4]


@pytest.mark.timeout(60)
def test_two_prompt_links_keep_both_prompts(use_uri, tracking_uri: str, slow_store: None) -> None:
    use_uri("threaded+" + tracking_uri)
    p1 = mlflow.genai.register_prompt("p1", "hello {{name}}")
    p2 = mlflow.genai.register_prompt("p2", "bye {{name}}")
    client = MlflowClient()
    with mlflow.start_run() as active:
        client.link_prompt_version_to_run(active.info.run_id, p1)
        client.link_prompt_version_to_run(active.info.run_id, p2)
    tag = MlflowClient(tracking_uri).get_run(active.info.run_id).data.tags["mlflow.linkedPrompts"]
    assert sorted(p["name"] for p in json.loads(tag)) == ["p1", "p2"]


# -- read your writes ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_reads_see_the_writes_before_them(use_uri, tracking_uri: str, prefix: str, slow_store: None) -> None:
    use_uri(prefix + tracking_uri)
    client = MlflowClient()
    with mlflow.start_run() as active:
        run_id = active.info.run_id
        mlflow.set_tag("phase", "warmup")
        mlflow.log_param("lr", 0.01)
        mlflow.log_metric("loss", 0.5, step=3)
        run = mlflow.get_run(run_id)
        assert run.data.tags["phase"] == "warmup" and run.data.params == {"lr": "0.01"}
        assert run.data.metrics == {"loss": 0.5}
        mlflow.log_metric("loss", 0.25, step=4)
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5), (4, 0.25)]
        mlflow.set_tag("phase", "train")
        found = mlflow.search_runs(filter_string="tags.phase = 'train'", output_format="list")
        assert [r.info.run_id for r in found] == [run_id]
        client.delete_tag(run_id, "phase")
        assert "phase" not in client.get_run(run_id).data.tags
    # MLflow itself writes the tags of a resumed run, then reads the run back.
    with mlflow.start_run(run_id=run_id, tags={"resumed": "yes"}, description="second go") as again:
        assert again.data.tags["resumed"] == "yes"
        assert again.data.tags["mlflow.note.content"] == "second go"


# -- MLflow's errors, MLflow's way ---------------------------------------------------------------
def _errors(uri: str, use: Callable[[str], str]) -> list[tuple[type, str, str]]:
    """(class, code, message) of each bad call, with the run id replaced so two stores compare."""
    use(uri)
    out: list[tuple[type, str, str]] = []
    with mlflow.start_run() as active:
        rid = active.info.run_id
        client = MlflowClient()
        mlflow.log_param("lr", 0.1)
        calls: list[Callable[[], Any]] = [
            lambda: mlflow.log_metric("bad//key", 1.0),
            lambda: mlflow.log_metric("loss", "high"),
            lambda: mlflow.log_param("bad\nkey", 1),
            lambda: mlflow.set_tag("x" * 300, "v"),
            lambda: mlflow.log_param("lr", 0.2),
            lambda: client.log_batch(rid, metrics=[Metric("ok", 1.0, 0, 0), Metric("nan-ish", "x", 0, 0)]),
            lambda: client.log_batch(rid, params=[Param("a", "1"), Param("a", "1")]),
            lambda: client.log_batch(rid, params=[Param("lr", "0.3")]),
            lambda: client.log_batch(rid, tags=[RunTag("ok", "1"), RunTag("../up", "1")]),
            # MLflow's async API raises at wait(), wrapped the way its async queue wraps it.
            lambda: mlflow.log_metric("bad//key", 1.0, synchronous=False).wait(),
            lambda: mlflow.log_param("lr", 0.5, synchronous=False).wait(),
        ]
        for call in calls:
            with pytest.raises(MlflowException) as caught:
                call()
            err = caught.value
            message = re.sub(r"timestamp=\d+", "timestamp=T", err.message.replace(rid, "RUN"))
            out.append((type(err), err.error_code, message))
        mlflow.log_metric("good", 1.0)
    run = MlflowClient().get_run(rid)
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"good": 1.0}  # nothing bad landed
    return out


@pytest.mark.timeout(60)
def test_bad_calls_raise_exactly_what_mlflow_raises(use_uri, tracking_uri: str) -> None:
    plain = _errors(tracking_uri, use_uri)  # the same database, without the scheme
    routed = _errors("threaded+" + tracking_uri, use_uri)
    assert len(plain) == 11
    for want, got in zip(plain, routed, strict=True):
        assert got == want


@pytest.mark.timeout(60)
def test_too_long_values_follow_mlflows_truncation_switch(use_uri, tracking_uri: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def run(uri: str) -> tuple[str, str]:
        use_uri(uri)
        with mlflow.start_run() as active:
            mlflow.log_param("long", "x" * 7000)  # truncated, with MLflow's warning
            monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
            try:
                with pytest.raises(MlflowException) as caught:
                    mlflow.log_param("longer", "y" * 7000)
            finally:
                monkeypatch.delenv("MLFLOW_TRUNCATE_LONG_VALUES")
        return MlflowClient().get_run(active.info.run_id).data.params["long"], caught.value.message

    plain = run(tracking_uri)
    assert plain[0] == "x" * 6000 and "6000" in plain[1]
    assert run("threaded+" + tracking_uri) == plain


@pytest.mark.timeout(60)
def test_delivery_error_at_end_run_is_an_mlflow_exception(use_uri, tracking_uri: str, prefix: str) -> None:
    use_uri(prefix + tracking_uri)
    active = mlflow.start_run()
    MlflowClient(tracking_uri).log_param(active.info.run_id, "lr", "0.1")  # behind this process's back
    mlflow.log_param("lr", 0.2)  # only the store can tell: refused at delivery
    with pytest.raises(MlflowException) as caught:
        mlflow.end_run()
    assert isinstance(caught.value, DeliveryError)
    assert [(f.kind, f.key) for f in caught.value.failed] == [("param", "lr")]
    assert "lr" in caught.value.message
    assert MlflowClient(tracking_uri).get_run(active.info.run_id).info.status == "FINISHED"


# -- params checked against what the store holds ------------------------------------------------
@pytest.mark.timeout(60)
def test_param_conflict_after_resume_raises_at_the_call(use_uri, tracking_uri: str) -> None:
    def resume(uri: str) -> tuple[str, str]:
        use_uri(uri)
        with mlflow.start_run() as active:
            mlflow.log_param("lr", 0.01)
        rid = active.info.run_id
        with mlflow.start_run(run_id=rid):
            mlflow.log_param("lr", 0.01)  # the same value again is fine
            with pytest.raises(MlflowException) as caught:
                mlflow.log_param("lr", 0.02)
        # The run still ends cleanly (no DeliveryError at end_run) and keeps the first value.
        run = MlflowClient().get_run(rid)
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01"}
        return caught.value.error_code, caught.value.message.replace(rid, "RUN")

    assert resume("threaded+" + tracking_uri) == resume(tracking_uri)


@pytest.mark.timeout(60)
def test_param_conflict_with_a_run_from_elsewhere_raises_at_the_call(use_uri, tracking_uri: str) -> None:
    plain = MlflowClient(tracking_uri)
    rid = plain.create_run("0").info.run_id  # another process made the run and its params
    plain.log_param(rid, "lr", "0.1")
    use_uri("threaded+" + tracking_uri)
    client = MlflowClient()
    client.log_param(rid, "lr", "0.1")
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        client.log_param(rid, "lr", "0.2")
    client.log_batch(rid, params=[Param("bs", "8")])
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        client.log_batch(rid, params=[Param("bs", "16")])
    mlflow_store.flush(timeout=30)
    assert plain.get_run(rid).data.params == {"lr": "0.1", "bs": "8"}


# -- writes after a run's end ---------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_writes_after_end_are_delivered_and_their_failures_surface(use_uri, tracking_uri: str, prefix: str,
                                                                   slow_store: None) -> None:
    use_uri(prefix + tracking_uri)
    client = MlflowClient()
    with mlflow.start_run() as first:
        mlflow.log_metric("m", 1.0)
    rid = first.info.run_id
    client.log_metric(rid, "late", 2.0)  # MLflow allows writes to a finished run
    assert client.get_run(rid).data.metrics == {"m": 1.0, "late": 2.0}
    # A late write the store refuses (the run was deleted meanwhile) is reported by the next
    # run end in this process, not kept for an end of its own run that never comes.
    MlflowClient(tracking_uri).delete_run(rid)
    client.log_metric(rid, "later", 3.0)
    mlflow.start_run()
    with pytest.raises(DeliveryError) as caught:
        mlflow.end_run()
    assert [(f.key, f.run_id) for f in caught.value.failed] == [("later", rid)]
    mlflow_store.flush(timeout=30)  # reported once: nothing left


# -- timestamps as MLflow takes them ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_timestamps_follow_a_mocked_time_time_as_mlflows_do(use_uri, tracking_uri: str) -> None:
    """Tests of training code mock ``time.time``; MLflow's timestamps follow it, so must ours."""
    from unittest import mock

    def history(uri: str) -> list[tuple[str, float, int, int]]:
        use_uri(uri)
        with mlflow.start_run() as active, mock.patch("time.time", return_value=123):
            mlflow.log_metric("a", 25)
            mlflow.log_metrics({"a": 30, "b": -3}, step=5)
            MlflowClient().log_metric(active.info.run_id, "c", 1.0)
        client = MlflowClient(tracking_uri)
        return sorted((m.key, m.value, m.timestamp, m.step) for key in "abc"
                      for m in client.get_metric_history(active.info.run_id, key))

    plain = history(tracking_uri)
    assert plain == [("a", 25.0, 123_000, 0), ("a", 30.0, 123_000, 5), ("b", -3.0, 123_000, 5),
                     ("c", 1.0, 123_000, 0)]
    assert history("threaded+" + tracking_uri) == plain


# -- a point logged again at once is a second point, as on plain MLflow -------------------------
@pytest.mark.timeout(60)
def test_identical_points_logged_back_to_back_are_all_stored(use_uri, tracking_uri: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Three identical points in one millisecond: three rows (plain MLflow's calls take ms each)."""
    from mlflow.tracking._tracking_service import client as service_client
    from mlflow.utils.time import get_current_time_millis

    use_uri("threaded+" + tracking_uri)
    client = MlflowClient()
    with mlflow.start_run() as active:
        rid = active.info.run_id
        for _ in range(3):
            mlflow.log_metric("epoch", 1.0, step=5)  # the fluent fast path stamps these itself
        mlflow.log_metric("epoch", 2.0, step=5)  # another value: not a repeat
        now = get_current_time_millis()
        monkeypatch.setattr(service_client, "get_current_time_millis", lambda: now)  # one MLflow millisecond
        for _ in range(3):
            client.log_metric(rid, "acc", 0.5, step=1)  # MLflow stamps these; the store path sees them
        monkeypatch.undo()
        # An explicit old timestamp logged again is the same point: MLflow stores it once, so do we.
        for _ in range(2):
            client.log_batch(rid, metrics=[Metric("old", 3.0, 1_700_000_000_000, 0)])
        history = {key: client.get_metric_history(rid, key) for key in ("epoch", "acc", "old")}
    assert sorted((m.value, m.step) for m in history["epoch"]) == [(1.0, 5)] * 3 + [(2.0, 5)]
    ts = sorted(m.timestamp for m in history["epoch"] if m.value == 1.0)
    assert ts == [ts[0], ts[0] + 1, ts[0] + 2]  # one ms apart
    assert [m.timestamp for m in history["epoch"] if m.value == 2.0] >= [ts[2]]  # logged after: not before them
    assert [m.timestamp for m in history["acc"]] == [now, now + 1, now + 2]
    assert [m.timestamp for m in history["old"]] == [1_700_000_000_000]


# -- spool+ knows what was delivered live ------------------------------------------------------
@pytest.mark.timeout(60)
def test_spool_counts_live_deliveries_as_synced(spooled_run, tracking_uri: str) -> None:
    from mlflow_er.spool.replay import sync
    from mlflow_er.spool.status import format_status, spool_status

    run_id, spool = spooled_run(40)
    status = spool_status(str(spool))
    total = status["totals"]["records"]
    assert total == 43  # start, 40 metrics, a param, end
    assert list(status["totals"]["synced"].values()) == [total]
    assert f"synced into {tracking_uri}: {total} of {total}" in format_status(status)
    report = sync(str(spool), tracking_uri)
    assert report.records == 0 and report.failed == []
    assert len(MlflowClient(tracking_uri).get_metric_history(run_id, "loss")) == 40


# -- exit: a run left open is ended and delivered, within a bound ----------------------------------
_LEFT_OPEN = """
import sys

import mlflow
from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry

from mlflow_er import mlflow_store

registry._registry.setdefault(sys.argv[1].partition(":")[0], mlflow_store.build_store)
mlflow.set_tracking_uri(sys.argv[1])
run = mlflow.start_run()
for i in range(200):
    mlflow.log_metric("loss", float(i), step=i)
mlflow.set_tag("phase", "done")
print(run.info.run_id, mlflow_store.stats()[sys.argv[1]].get("delivery_pid") or 0, flush=True)
"""  # no end_run: MLflow ends the run at exit, after mlflow-er's own exit hook


@pytest.mark.timeout(90)
def test_exit_with_a_run_left_open_delivers_it_and_ends_it(tracking_uri: str, prefix: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    staging = tmp_path / "staging"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ER_FLUSH_TIMEOUT": "30",
           "MLFLOW_ER_STAGING_DIR": str(staging), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", _LEFT_OPEN, prefix + tracking_uri], capture_output=True, text=True,
                         timeout=75, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "not delivered" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    run_id, delivery_pid = out.stdout.split()
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "done"
    assert len(client.get_metric_history(run_id, "loss")) == 200
    if prefix == "process+":  # the delivery process finished too, not left behind
        assert int(delivery_pid) > 0
        _wait_gone(int(delivery_pid), 30)
    # Nothing was kept for a later `mlflow-er sync`: no queue or unsent records left in staging.
    left = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
    assert left == []


def _wait_gone(pid: int, timeout: float) -> None:
    import os
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:  # a zombie nobody reaped has exited too
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.05)
    raise AssertionError(f"delivery process {pid} still running {timeout}s after the training process exited")
