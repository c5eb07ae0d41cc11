"""Tracking-URI schemes: ``threaded+<uri>`` / ``spool+<uri>`` route unchanged ``mlflow.log_*`` code through mlflow-er.

Real stores only: an embedded SQLite store and the session's real ``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mlflow_er import DeliveryError, mlflow_store

N = 300




def _fluent_workload() -> str:
    """Plain MLflow calls, as an unchanged training script makes them; returns the run id."""
    with mlflow.start_run(run_name="fluent") as active:
        run_id = active.info.run_id
        for i in range(N):
            mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
        mlflow.log_param("lr", 0.001)
        mlflow.log_params({"batch": 64, "opt": "adam"})
        mlflow.set_tag("phase", "warmup")
        mlflow.set_tags({"phase": "train", "owner": "me"})  # the last write wins
        mlflow.log_metrics({"acc": 0.5, "f1": 0.25}, step=7)
        MlflowClient().log_batch(run_id, metrics=[Metric("batched", float(i), 1_700_000_000_000 + i, i)
                                                  for i in range(1500)],
                                 params=[Param("from_batch", "yes")], tags=[RunTag("phase", "done")])
        mlflow.log_metric("async", 3.0, synchronous=False).wait()
    return run_id


def _check_fluent(run_id: str) -> None:
    client = MlflowClient()
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "batch": "64", "opt": "adam", "from_batch": "yes"}
    assert run.data.tags["phase"] == "done" and run.data.tags["owner"] == "me"
    assert run.data.metrics["acc"] == 0.5 and run.data.metrics["f1"] == 0.25 and run.data.metrics["async"] == 3.0
    loss = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in loss) == [(i, 1.0 / (i + 1)) for i in range(N)]
    batched = client.get_metric_history(run_id, "batched")
    assert sorted((m.step, m.value, m.timestamp) for m in batched) == [
        (i, float(i), 1_700_000_000_000 + i) for i in range(1500)]
    found = mlflow.search_runs(experiment_ids=[run.info.experiment_id], filter_string="params.lr = '0.001'")
    assert list(found["run_id"]) == [run_id]


@pytest.mark.timeout(90)
def test_threaded_sqlite_fluent_calls_all_arrive_and_end_run_flushes(use_uri, tracking_uri: str) -> None:
    uri = use_uri("threaded+" + tracking_uri)
    store = MlflowClient()._tracking_client.store
    assert type(store).__name__ == "MlflowErSqlAlchemyStore"
    run_id = _fluent_workload()
    # No flush and no sleep: end_run returned, so everything is in the database. Read it
    # through the plain URI as well, where nothing of mlflow-er is involved.
    _check_fluent(run_id)
    use_uri(tracking_uri)
    _check_fluent(run_id)
    # The sink behind the scheme writes to the real store, never back into the scheme.
    from mlflow_er.sinks.mlflow import MlflowSink

    assert type(MlflowSink(uri).client._tracking_client.store).__name__ == "SqlAlchemyStore"
    st = mlflow_store.stats()[uri]
    # loss, 4 params, 4 tag writes, acc/f1, the batch, async: each one delivered once.
    assert st["delivered"] == N + 4 + 4 + 2 + 1500 + 1 and st["failed"] == 0 and st["queued"] == 0


@pytest.mark.server
@pytest.mark.timeout(120)
def test_threaded_http_against_a_real_server(use_uri, mlflow_server, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    use_uri("threaded+" + mlflow_server.uri)
    mlflow.set_experiment(f"scheme-http-{time.time_ns()}")
    run_id = _fluent_workload()
    # The "View run" link is MLflow's own (the store is a RestStore) and names the real server.
    assert f"View run fluent at: {mlflow_server.uri}/#/experiments/" in capsys.readouterr().out
    _check_fluent(run_id)

    # Artifacts go straight to the server's artifact store (mlflow-artifacts: URIs).
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(src), artifact_path="docs")
        mlflow.log_dict({"a": 1}, "cfg.json")
    names = sorted(f.path for f in MlflowClient().list_artifacts(run_id)) + \
        [f.path for f in MlflowClient().list_artifacts(run_id, "docs")]
    assert names == ["cfg.json", "docs", "docs/notes.txt"]
    got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="docs/notes.txt",
                                              dst_path=str(tmp_path / "d"))
    assert Path(got).read_text() == "hello"
    # The run's artifact URI is the server's own, untouched.
    assert mlflow.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")


@pytest.mark.timeout(120)
def test_sklearn_autolog_through_the_scheme_matches_plain_mlflow(use_uri, tracking_uri: str, tmp_path: Path) -> None:
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(n_samples=20, n_features=4, random_state=0)

    def fit(uri: str) -> tuple[dict, dict, dict, list]:
        use_uri(uri)
        mlflow.set_experiment("autolog")
        mlflow.sklearn.autolog(log_input_examples=False, log_model_signatures=False, silent=True)
        try:
            with mlflow.start_run() as active:
                LogisticRegression(max_iter=50).fit(x, y)
        finally:
            mlflow.sklearn.autolog(disable=True)
        run = mlflow.get_run(active.info.run_id)
        models = MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id])
        # Training metrics carry the LoggedModel's id: the link must survive the scheme.
        return run.data.params, run.data.metrics, run.data.tags, [sorted(m.key for m in lm.metrics or [])
                                                                  for lm in models]

    plain = fit(f"sqlite:///{tmp_path / 'plain.db'}")
    routed = fit("threaded+" + tracking_uri)
    assert mlflow_store.stats()["threaded+" + tracking_uri]["delivered"] >= len(routed[0])  # params went our way
    assert plain[0] and plain[1]
    assert routed[0] == plain[0]  # the same params, values included
    assert set(routed[1]) == set(plain[1])  # the same metric keys
    assert {k for k in plain[2] if not k.startswith("mlflow.")} <= set(routed[2])
    assert routed[2]["estimator_class"] == plain[2]["estimator_class"]
    assert len(plain[3]) == 1 and plain[3][0]  # one LoggedModel, with metrics linked to it
    assert routed[3] == plain[3]


@pytest.mark.timeout(60)
def test_delivery_error_surfaces_at_end_run_and_the_run_still_ends(use_uri, tracking_uri: str) -> None:
    use_uri("threaded+" + tracking_uri)
    active = mlflow.start_run()
    run_id = active.info.run_id
    # Someone else (another process, the UI, ...) already set the param on the real store.
    MlflowClient(tracking_uri).log_param(run_id, "lr", "0.1")
    mlflow.log_param("lr", 0.2)  # unknown to this process: accepted now, rejected by the store later
    mlflow.log_metric("loss", 1.5)
    with pytest.raises(DeliveryError) as caught:
        mlflow.end_run()
    assert [(f.kind, f.key, f.run_id) for f in caught.value.failed] == [("param", "lr", run_id)]
    assert mlflow.active_run() is None
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"  # ended anyway: the error reports, it does not block
    assert run.data.params == {"lr": "0.1"} and run.data.metrics == {"loss": 1.5}


@pytest.mark.timeout(60)
def test_a_failed_block_keeps_its_own_exception(use_uri, tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    use_uri("threaded+" + tracking_uri)
    with pytest.raises(ZeroDivisionError):
        with mlflow.start_run() as active:
            MlflowClient(tracking_uri).log_param(active.info.run_id, "lr", "0.1")
            mlflow.log_param("lr", 0.2)
            1 / 0  # noqa: B018
    assert MlflowClient(tracking_uri).get_run(active.info.run_id).info.status == "FAILED"
    assert "ended FAILED" in caplog.text and "'lr'" in caplog.text


@pytest.mark.timeout(60)
def test_bad_input_raises_in_the_caller_as_mlflow_does(use_uri, tracking_uri: str) -> None:
    use_uri("threaded+" + tracking_uri)
    with mlflow.start_run() as active:
        mlflow.log_param("lr", 0.1)
        mlflow.log_param("lr", 0.1)  # the same value again is fine, as in MLflow
        # MLflow's own messages (tests/test_scheme_dropin.py compares them with a plain store's).
        with pytest.raises(MlflowException, match="Changing param values is not allowed"):
            mlflow.log_param("lr", 0.2)
        with pytest.raises(MlflowException, match="bad//key"):
            mlflow.log_metric("bad//key", 1.0)
        with pytest.raises(MlflowException, match="valid double"):
            MlflowClient().log_batch(active.info.run_id, metrics=[Metric("ok", 1.0, 0, 0),
                                                                  Metric("nan-ish", "x", 0, 0)])
        mlflow.log_param("long", "x" * 7000)  # MLflow truncates (MLFLOW_TRUNCATE_LONG_VALUES): so do we
    run = mlflow.get_run(active.info.run_id)
    assert run.data.params == {"lr": "0.1", "long": "x" * 6000}
    assert run.data.metrics == {}  # the rejected batch queued nothing, not even its good metric


@pytest.mark.timeout(60)
def test_order_kept_across_routed_and_direct_writes(use_uri, tracking_uri: str) -> None:
    use_uri("threaded+" + tracking_uri)
    with mlflow.start_run() as active:
        run_id = active.info.run_id
        mlflow.set_tag("gone", "soon")
        mlflow.delete_tag("gone")  # delete goes straight to the store, after the queued set_tag
        mlflow.set_tag("kept", "1")
        mlflow.log_input(mlflow.data.from_numpy(np.arange(4), name="ds"), context="train")
    run = mlflow.get_run(run_id)
    assert "gone" not in run.data.tags and run.data.tags["kept"] == "1"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["ds"]


@pytest.mark.timeout(60)
def test_flush_async_logging_and_flush_make_writes_visible_mid_run(use_uri, tracking_uri: str) -> None:
    use_uri("threaded+" + tracking_uri)
    with mlflow.start_run() as active:
        mlflow.log_metric("m", 1.0)
        mlflow.flush_async_logging()
        assert MlflowClient(tracking_uri).get_run(active.info.run_id).data.metrics == {"m": 1.0}
        mlflow.log_metric("n", 2.0)
        mlflow_store.flush(timeout=30)
        assert MlflowClient(tracking_uri).get_run(active.info.run_id).data.metrics == {"m": 1.0, "n": 2.0}


@pytest.mark.timeout(60)
def test_spool_scheme_writes_the_spool_and_the_store(spooled_run, tracking_uri: str) -> None:
    from mlflow_er.spool.reader import SpoolReader

    run_id, spool = spooled_run(50)
    assert len(MlflowClient(tracking_uri).get_metric_history(run_id, "loss")) == 50
    # The same records are on disk, fsynced, for `mlflow-er sync` (run start and end included).
    kinds: dict[str, int] = {}
    for seg in SpoolReader(str(spool)).segments():
        for rec, _ in SpoolReader(str(spool)).iter_segment(seg):
            if getattr(rec, "run_id", None) == run_id:
                kinds[type(rec).__name__] = kinds.get(type(rec).__name__, 0) + 1
    assert kinds == {"RunInfo": 2, "Metric": 50, "Param": 1}
    # Replaying that spool into the store that already has it changes nothing (same run, deduped).
    from mlflow_er.spool.replay import sync

    report = sync(str(spool), tracking_uri)
    assert report.failed == [] and report.runs_created == []
    assert len(MlflowClient(tracking_uri).get_metric_history(run_id, "loss")) == 50
    assert sync(str(spool), tracking_uri).records == 0


@pytest.mark.timeout(60)
def test_registry_and_reads_use_the_inner_store(use_uri, tracking_uri: str) -> None:
    use_uri("threaded+" + tracking_uri)
    client = MlflowClient()
    client.create_registered_model("scheme-model")
    assert [m.name for m in client.search_registered_models()] == ["scheme-model"]
    exp = mlflow.set_experiment("reads")
    assert mlflow.get_experiment_by_name("reads").experiment_id == exp.experiment_id


@pytest.mark.timeout(90)
def test_fluent_log_metric_is_cheaper_than_plain_sqlite(use_uri, tracking_uri: str, tmp_path: Path) -> None:
    """Sanity ratio only: plain SQLite commits a transaction per call, the scheme appends to a buffer."""

    def per_call(uri: str, n: int) -> float:
        use_uri(uri)
        with mlflow.start_run():
            mlflow.log_metric("warm", 0.0)
            t0 = time.perf_counter()
            for i in range(n):
                mlflow.log_metric("loss", float(i), step=i)
            return (time.perf_counter() - t0) / n

    plain = per_call(f"sqlite:///{tmp_path / 'plain.db'}", 200)
    routed = per_call("threaded+" + tracking_uri, 2000)
    assert routed < plain, f"threaded+sqlite {routed * 1e6:.0f} us/call vs sqlite {plain * 1e6:.0f} us/call"


def test_entry_points_load_while_mlflow_imports(tmp_path: Path) -> None:
    """MLflow loads tracking-store entry points during ``import mlflow``: ours must not need mlflow yet."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import mlflow\n"
            "from mlflow.tracking._tracking_service.utils import _tracking_store_registry as r\n"
            "print(sorted(k for k in r._registry if '+' in k))\n")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for mode in ("threaded", "spool"):
        for scheme in ("http", "https", "sqlite"):
            assert f"'{mode}+{scheme}'" in out.stdout


def test_uri_helpers() -> None:
    assert mlflow_store.split_uri("threaded+http://127.0.0.1:5000") == ("threaded", "http://127.0.0.1:5000")
    assert mlflow_store.split_uri("spool+sqlite:////tmp/a+b.db") == ("spool", "sqlite:////tmp/a+b.db")
    assert mlflow_store.split_uri("sqlite:////tmp/a+b.db") == (None, "sqlite:////tmp/a+b.db")
    assert mlflow_store.inner_uri("https://h") == "https://h" and mlflow_store.inner_uri(None) is None
    assert mlflow_store.split_uri("process+https://h") == ("process", "https://h")


def tracking_store_entry_points(pyproject: Path) -> dict[str, str]:
    """The ``mlflow.tracking_store`` entry points a pyproject declares (no tomllib on Python 3.10)."""
    text = pyproject.read_text()
    table = text.split('[project.entry-points."mlflow.tracking_store"]', 1)[1].split("\n[", 1)[0]
    pairs = (line.split("=", 1) for line in table.splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip().strip('"'): v.strip().strip('"') for k, v in pairs}


def test_every_prefix_has_an_entry_point_for_every_store_scheme() -> None:
    """pyproject declares each prefix for each of MLflow's store schemes (a new prefix cannot miss one)."""
    from mlflow_er.mlflow_uris import BACKENDS, MODES

    declared = tracking_store_entry_points(Path(__file__).parents[1] / "pyproject.toml")
    assert set(declared.values()) == {"mlflow_er.mlflow_store:build_store"}
    stores = ["http", "https", "sqlite", "postgresql", "mysql", "mssql", "postgresql+psycopg",
              "postgresql+psycopg2", "mysql+pymysql", "mysql+mysqldb", "mssql+pyodbc"]
    assert sorted(declared) == sorted(f"{mode}+{s}" for mode in MODES for s in stores)
    assert BACKENDS == {"threaded": "threaded", "spool": "threaded", "process": "process"}


@pytest.mark.timeout(60)
def test_fluent_fast_path_keeps_mlflows_semantics(use_uri, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from mlflow.tracking import fluent
    from mlflow.utils.async_logging.run_operations import RunOperations

    use_uri("threaded+" + tracking_uri)
    built = []
    original_init = MlflowClient.__init__

    def counting_init(self: MlflowClient, *args: object, **kwargs: object) -> None:
        built.append(1)
        original_init(self, *args, **kwargs)

    with mlflow.start_run() as active:
        assert mlflow.log_metric is fluent.log_metric and getattr(mlflow.log_metric, "_mlflow_er_fast", False)
        monkeypatch.setattr(MlflowClient, "__init__", counting_init)
        for i in range(10):
            mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
        assert mlflow.log_param("lr", 0.1) == 0.1  # MLflow's return values
        assert mlflow.set_tags({"a": 1}) is None
        assert isinstance(mlflow.log_metrics({"acc": 0.5}, synchronous=False), RunOperations)
        assert built == []  # no MlflowClient per call on the fast path
        monkeypatch.setattr(MlflowClient, "__init__", original_init)

        # A patched client method (a test's mock, another library) is honoured: MLflow's own path.
        seen: list[str] = []
        original_log_metric = MlflowClient.log_metric

        def spy(self: MlflowClient, run_id: str, key: str, *args: object, **kwargs: object) -> object:
            seen.append(key)
            return original_log_metric(self, run_id, key, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_metric", spy)
        mlflow.log_metric("spied", 1.0)
        assert seen == ["spied"]
        monkeypatch.setattr(MlflowClient, "log_metric", original_log_metric)

        # Runs are thread-local: a thread without an active run gets one of its own, as in MLflow.
        other: list[str] = []

        def in_thread() -> None:
            mlflow.log_metric("thread", 2.0)
            other.append(mlflow.active_run().info.run_id)
            mlflow.end_run()

        t = threading.Thread(target=in_thread)
        t.start()
        t.join(30)
        assert other and other[0] != active.info.run_id
    run = MlflowClient(tracking_uri).get_run(active.info.run_id)
    assert run.data.metrics == {"loss": 0.1, "acc": 0.5, "spied": 1.0}
    assert run.data.params == {"lr": "0.1"} and run.data.tags["a"] == "1"
    assert MlflowClient(tracking_uri).get_run(other[0]).data.metrics == {"thread": 2.0}
    # Off the scheme, the same functions are MLflow's own path to the plain store.
    delivered = mlflow_store.stats()["threaded+" + tracking_uri]["delivered"]
    use_uri(tracking_uri)
    with mlflow.start_run() as plain:
        mlflow.log_metric("plain", 3.0)
    assert mlflow_store.stats()["threaded+" + tracking_uri]["delivered"] == delivered
    assert MlflowClient(tracking_uri).get_run(plain.info.run_id).data.metrics == {"plain": 3.0}


def test_live_sync_marks_only_what_a_later_flush_covered(tmp_path: Path) -> None:
    """spool+ markers: nothing submitted during a flush -> marked; otherwise the next flush marks it;
    after a record that was not delivered live, never again (a later sync re-sends from there)."""
    import itertools
    import json
    from types import SimpleNamespace

    from mlflow_er.records import Metric as Rec
    from mlflow_er.scheme_sync import LiveSync
    from mlflow_er.spool.replay import target_key
    from mlflow_er.spool.writer import SpoolWriter

    writer = SpoolWriter(tmp_path / "spool", fsync_interval=0, segment_age=None)
    submits = itertools.count()
    live = LiveSync(SimpleNamespace(writer=writer, path=tmp_path / "spool"), "sqlite:///x.db", submits)
    progress = tmp_path / "spool" / "sync" / target_key("sqlite:///x.db") / "progress"

    def marked() -> list[tuple[int, bool]]:
        return [(p["count"], p["done"]) for p in (json.loads(f.read_text()) for f in sorted(progress.glob("*.json")))]

    def log(n: int) -> None:
        writer.append([Rec("r", "m", float(i), 1, i, i) for i in range(n)])
        next(submits)

    log(3)
    token = live.begin()
    log(2)  # submitted while the flush ran: it may not be delivered yet
    live.flushed(token, clean=True, final=True)
    assert marked() == []
    live.flushed(live.begin(), clean=True, final=True)  # began after those 5 were written: all delivered
    assert marked() == [(5, False)]
    writer.rotate()
    log(4)
    live.flushed(live.begin(), clean=True, final=True)
    assert marked() == [(5, True), (4, False)]
    log(1)
    live.freeze("a record was not delivered")
    live.flushed(live.begin(), clean=True, final=True)
    assert marked() == [(5, True), (4, False)]
    writer.close()
