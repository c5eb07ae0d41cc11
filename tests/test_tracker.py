"""``ExperimentTracker`` and ``Run``: the seed's behaviours on the embedded SQLite store, plus the HTTP path."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from mlflow_er import (
    DeliveryError,
    ExperimentNotFound,
    ExperimentTracker,
    InvalidRecord,
    MlflowErError,
    TrackingUnavailable,
)
from mlflow_er.backends.sync import SyncBackend
from mlflow_er.records import MAX_METRICS_PER_BATCH, Record
from mlflow_er.testing import MemorySink, prefill_sqlite_store
from mlflow_er.tracker import git_commit

pytestmark = pytest.mark.timeout(60)


class DeferredBackend(SyncBackend):
    """Holds records until flush/close, so artifact snapshots are uploaded *after* the call returned."""

    name = "deferred"
    snapshots = True  # it uploads after the call returns, so files must be snapshotted

    def __init__(self) -> None:
        super().__init__(retry_deadline=1.0)
        self.pending: list[Record] = []

    def submit(self, record: Record) -> None:
        self.pending.append(record)

    def submit_many(self, records: Sequence[Record]) -> None:
        self.pending.extend(records)

    def flush(self, timeout: float | None = None) -> None:
        records, self.pending = self.pending, []
        if records:
            SyncBackend.submit_many(self, records)

    def close(self, timeout: float | None = None) -> None:
        self.flush(timeout)


@pytest.fixture
def tracking_uri(tracking_uri: str) -> str:
    """The shared fixture's fresh store, created from a migrated template (saves ~1 s per test)."""
    return prefill_sqlite_store(tracking_uri)


@pytest.fixture
def tracker(tracking_uri: str) -> ExperimentTracker:
    return ExperimentTracker("exp", tracking_uri=tracking_uri)


def client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


# -- experiments -----------------------------------------------------------------------------
def test_find_or_create_by_name(tracking_uri: str) -> None:
    first = ExperimentTracker("shared", tracking_uri=tracking_uri)
    second = ExperimentTracker("shared", tracking_uri=tracking_uri)
    assert first.id == second.id
    names = [e.name for e in client(tracking_uri).search_experiments()]
    assert names.count("shared") == 1


def test_find_by_id_when_name_does_not_match(tracking_uri: str) -> None:
    original = ExperimentTracker("by-id", tracking_uri=tracking_uri)
    by_id = ExperimentTracker(experiment_id=original.id, tracking_uri=tracking_uri)
    assert by_id.id == original.id and by_id.name == "by-id"
    other_name = ExperimentTracker("no-such-name", experiment_id=original.id, tracking_uri=tracking_uri)
    assert other_name.id == original.id
    assert client(tracking_uri).get_experiment_by_name("no-such-name") is None  # nothing created


def test_create_new_false_without_match_is_a_clear_error(tracking_uri: str) -> None:
    with pytest.raises(ExperimentNotFound, match=r"no experiment named 'ghost'.*create_new=False"):
        ExperimentTracker("ghost", tracking_uri=tracking_uri, create_new=False)
    assert client(tracking_uri).get_experiment_by_name("ghost") is None


def test_unknown_experiment_id_is_an_error(tracking_uri: str) -> None:
    with pytest.raises(ExperimentNotFound, match="'987654'"):
        ExperimentTracker(experiment_id="987654", tracking_uri=tracking_uri)
    with pytest.raises(ExperimentNotFound, match="'987654'"):
        ExperimentTracker("fresh-name", experiment_id="987654", tracking_uri=tracking_uri)


def test_deleted_experiment_is_a_clear_error(tracking_uri: str) -> None:
    tracker = ExperimentTracker("doomed", tracking_uri=tracking_uri)
    assert tracker.lifecycle_stage == "active"
    client(tracking_uri).delete_experiment(tracker.id)
    assert tracker.lifecycle_stage == "deleted"
    with pytest.raises(ExperimentNotFound, match="deleted"):
        ExperimentTracker("doomed", tracking_uri=tracking_uri)


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args], cwd=cwd,
                         check=True, capture_output=True, timeout=20)
    return out.stdout.decode().strip()


def test_new_experiment_gets_git_commit_tag_in_a_repo(tracking_uri: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("print('hi')\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    sha = _git(repo, "rev-parse", "HEAD")
    assert len(sha) == 40
    monkeypatch.chdir(repo)
    tracker = ExperimentTracker("in-repo", tracking_uri=tracking_uri)
    assert tracker.git_commit == sha
    assert tracker.tags["git_commit"] == sha


def test_git_commit_is_empty_outside_a_repo_or_without_git(tracking_uri: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(outside)
    tracker = ExperimentTracker("no-repo", tracking_uri=tracking_uri)
    assert tracker.git_commit == ""
    assert tracker.tags["git_commit"] == ""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no git executable at all
    assert git_commit() == ""


def test_experiment_tags_and_properties(tracking_uri: str, tmp_path: Path) -> None:
    before = int(time.time() * 1000) - 1000
    arts = tmp_path / "arts"
    tracker = ExperimentTracker("props", tracking_uri=tracking_uri, artifact_location=str(arts),
                                team="vision", version=2)
    assert tracker.id.isdigit()
    assert tracker.name == "props"
    assert tracker.uri == tracking_uri
    assert str(arts) in tracker.artifact_location
    assert tracker.lifecycle_stage == "active"
    assert isinstance(tracker.creation_time, int) and tracker.creation_time >= before
    assert isinstance(tracker.last_update_time, int) and tracker.last_update_time >= before
    assert tracker.tags["team"] == "vision" and tracker.tags["version"] == "2"
    assert isinstance(tracker.git_commit, str)
    client(tracking_uri).rename_experiment(tracker.id, "props-renamed")
    assert tracker.name == "props-renamed"  # read from the store, not cached


def test_repr_is_readable(tracker: ExperimentTracker) -> None:
    text = repr(tracker)
    assert text.startswith("ExperimentTracker(")
    assert "name='exp'" in text and f"id='{tracker.id}'" in text and "backend='sync'" in text


@pytest.mark.parametrize("kind", ["path", "file-uri", "sqlite"])
def test_missing_local_tracking_path_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    uri = {"path": str(missing), "file-uri": missing.as_uri(), "sqlite": f"sqlite:///{missing}/mlflow.db"}[kind]
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        ExperimentTracker("x", tracking_uri=uri)
    assert not missing.exists()


@pytest.mark.timeout(20)
def test_silent_http_server_fails_fast(tracking_uri: str) -> None:
    from servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="connection refused.*mlflow server") as info:
        ExperimentTracker("x", tracking_uri=uri)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, ConnectionError)


# -- finding runs ----------------------------------------------------------------------------
def test_find_run_and_get_all_runs(tracker: ExperimentTracker) -> None:
    import pandas as pd

    assert tracker.find_run(run_name="nope") == (None, None)
    assert tracker.find_run(run_id="0" * 32) == (None, None)
    assert tracker.find_run() == (None, None)
    with tracker.run(run_name="alpha") as a:
        pass
    with tracker.run(run_name="beta") as b:
        pass
    assert tracker.find_run(run_name="alpha") == ("alpha", a.run_id)
    assert tracker.find_run(run_id=b.run_id) == ("beta", b.run_id)
    assert tracker.find_run(run_name="alpha", run_id=b.run_id) == ("alpha", a.run_id)  # name first
    assert tracker.find_run(run_name="nope", run_id=b.run_id) == ("beta", b.run_id)
    df = tracker.get_all_runs()
    assert isinstance(df, pd.DataFrame)
    assert set(df["run_id"]) == {a.run_id, b.run_id}


def test_run_resumes_by_name_and_by_id(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="resumable") as first:
        first.log_metric("loss", 1.0, step=0)
    with tracker.run(run_name="resumable") as again:
        again.log_metric("loss", 0.5, step=1)
    with tracker.run(run_id=first.run_id) as by_id:
        by_id.log_metric("loss", 0.25, step=2)
    assert first.run_id == again.run_id == by_id.run_id
    history = tracker.client.get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert len(tracker.client.search_runs([tracker.id])) == 1


def test_run_with_unknown_id_is_an_error(tracker: ExperimentTracker) -> None:
    with pytest.raises(MlflowErError, match="no active run"):
        with tracker.run(run_id="f" * 32):
            pass
    assert tracker.client.search_runs([tracker.id]) == []


def test_new_run_has_description_and_tags(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="described", description="a careful run", owner="ana", seed=7) as run:
        assert mlflow.active_run().info.run_id == run.run_id
        assert run.info.run_name == "described"
    tags = tracker.client.get_run(run.run_id).data.tags
    assert tags["mlflow.note.content"] == "a careful run"
    assert tags["owner"] == "ana" and tags["seed"] == "7"


def test_fluent_calls_inside_the_block_land_in_the_run(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="fluent") as run:
        mlflow.log_metric("fluent_metric", 3.5)
        mlflow.log_param("fluent_param", "x")
        mlflow.set_tag("fluent_tag", "y")
        run.log_metric("handle_metric", 1.0)
    assert mlflow.active_run() is None
    data = tracker.client.get_run(run.run_id).data
    assert data.metrics == {"fluent_metric": 3.5, "handle_metric": 1.0}
    assert data.params["fluent_param"] == "x" and data.tags["fluent_tag"] == "y"


def test_status_finished_on_exit_failed_on_exception(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="ok") as ok:
        assert tracker.client.get_run(ok.run_id).info.status == "RUNNING"
    assert tracker.client.get_run(ok.run_id).info.status == "FINISHED"

    class Boom(RuntimeError):
        pass

    error = Boom("training diverged")
    with pytest.raises(Boom) as info:
        with tracker.run(run_name="bad") as bad:
            bad.log_metric("before", 1.0)
            raise error
    assert info.value is error  # unchanged, not wrapped
    run = tracker.client.get_run(bad.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"before": 1.0}
    assert mlflow.active_run() is None


def test_delivery_problem_does_not_mask_the_blocks_own_error(tracking_uri: str) -> None:
    sink = MemorySink().fail_when(lambda item: not hasattr(item, "metrics") or
                                  any(m.key == "poison" for m in item.metrics))
    tracker = ExperimentTracker("mask", tracking_uri=tracking_uri, backend=DeferredBackend(), sinks=[sink])
    with pytest.raises(KeyError) as info:
        with tracker.run(run_name="r") as run:
            run.log_metric("fine", 1.0)
            run.log_metric("poison", 2.0)
            raise KeyError("own error")
    notes = getattr(info.value, "__notes__", [])
    assert any("poison" in n for n in notes) or not hasattr(info.value, "add_note")
    assert [m.key for m in sink.metrics] == ["fine"]  # the rest was delivered, bad one isolated
    # Without an error of its own, the block raises the DeliveryError.
    with pytest.raises(DeliveryError, match="poison") as failed:
        with tracker.run(run_name="r2") as run:
            run.log_metric("poison", 3.0)
    assert [f.key for f in failed.value.failed] == ["poison"]
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"


def test_nested_runs(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="parent") as parent:
        with tracker.run(run_name="child", nested=True, level="inner") as child:
            child.log_metric("child_metric", 1.0)
            assert mlflow.active_run().info.run_id == child.run_id
        assert mlflow.active_run().info.run_id == parent.run_id
        parent.log_metric("parent_metric", 2.0)
    c = tracker.client.get_run(child.run_id)
    p = tracker.client.get_run(parent.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in p.data.tags
    assert c.info.status == p.info.status == "FINISHED"
    assert c.data.metrics == {"child_metric": 1.0} and p.data.metrics == {"parent_metric": 2.0}


# -- batching --------------------------------------------------------------------------------
class CountingLogBatch:
    """Counts the store writes of the mlflow sink: MLflow's ``log_batch`` and the SQL fast path's
    metrics-only batches (sinks/sql_metrics.py), as (metrics, params, tags) per write."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from mlflow_er.sinks.sql_metrics import SqlMetricWriter

        self.calls: list[tuple[int, int, int]] = []
        real = MlflowClient.log_batch
        real_sql = SqlMetricWriter.write

        def log_batch(client_self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
            self.calls.append((len(metrics), len(params), len(tags)))
            return real(client_self, run_id, metrics, params, tags, *args, **kwargs)

        def sql_write(writer_self, run_id, metrics):
            done = real_sql(writer_self, run_id, metrics)
            if done:  # handed back: MLflow's log_batch takes it and is counted there
                self.calls.append((len(metrics), 0, 0))
            return done

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
        monkeypatch.setattr(SqlMetricWriter, "write", sql_write)


def test_log_metrics_of_50_keys_is_one_log_batch(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = MemorySink()
    tracker = ExperimentTracker("batching", tracking_uri=tracking_uri, sinks=["mlflow", memory])
    values = {f"m{i:02d}": float(i) for i in range(50)}
    with tracker.run(run_name="r") as run:
        counter = CountingLogBatch(monkeypatch)
        run.log_metrics(values, step=4)
        assert counter.calls == [(50, 0, 0)]
        assert len(memory.batches) == 1
        monkeypatch.undo()
    assert tracker.client.get_run(run.run_id).data.metrics == values
    assert [m.key for m in memory.metrics] == list(values)  # call order kept
    assert all(m.step == 4 for m in memory.metrics)


def test_log_metrics_split_at_mlflow_limits(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's log_batch limits: the SQL fast path (which takes up to 10,000 metrics a write) is off here.
    monkeypatch.setenv("MLFLOW_ER_SQL_FAST_PATH", "0")
    memory = MemorySink()
    tracker = ExperimentTracker("split", tracking_uri=tracking_uri, sinks=["mlflow", memory])
    values = {f"k{i}": float(i) for i in range(2500)}
    with tracker.run(run_name="r") as run:
        counter = CountingLogBatch(monkeypatch)
        run.log_metrics(values)
        monkeypatch.undo()
    assert [len(b) for b in memory.batches] == [1000, 1000, 500]
    assert all(len(b.metrics) <= MAX_METRICS_PER_BATCH for b in memory.batches)
    assert counter.calls == [(1000, 0, 0), (1000, 0, 0), (500, 0, 0)]
    assert len(tracker.client.get_run(run.run_id).data.metrics) == 2500


def test_params_and_tags_split_at_100(tracking_uri: str) -> None:
    memory = MemorySink()
    tracker = ExperimentTracker("split-pt", tracking_uri=tracking_uri, sinks=["mlflow", memory])
    with tracker.run(run_name="r") as run:
        run.log_params({f"p{i}": i for i in range(250)})
        run.set_tags({f"t{i}": i for i in range(150)})
    assert [len(b.params) for b in memory.batches if b.params] == [100, 100, 50]
    assert [len(b.tags) for b in memory.batches if b.tags] == [100, 50]
    data = tracker.client.get_run(run.run_id).data
    assert len(data.params) == 250 and data.tags["t149"] == "149"


def test_flush_and_run_end_flush_the_sinks(tracking_uri: str) -> None:
    sink = MemorySink()
    tracker = ExperimentTracker("flushing", tracking_uri=tracking_uri, sinks=["mlflow", sink])
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 1.0)
        run.flush(5)
        assert sink.flushes == 1
    assert sink.flushes == 2

    class StuckSink(MemorySink):
        def flush(self) -> None:
            raise OSError("disk gone")

    stuck = ExperimentTracker("flushing", tracking_uri=tracking_uri, sinks=[StuckSink()])
    with pytest.raises(DeliveryError, match="memory.*disk gone"):
        with stuck.run(run_name="r2"):
            pass


# -- artifacts -------------------------------------------------------------------------------
def _download(tracker: ExperimentTracker, run_id: str, path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(tracker.client.download_artifacts(run_id, path, str(dst)))


def test_log_artifact_is_a_snapshot(tracking_uri: str, tmp_path: Path) -> None:
    memory = MemorySink()
    backend = DeferredBackend()
    tracker = ExperimentTracker("snap", tracking_uri=tracking_uri, backend=backend, sinks=["mlflow", memory])
    replaced = tmp_path / "model.bin"
    deleted = tmp_path / "notes.txt"
    with tracker.run(run_name="r") as run:
        replaced.write_bytes(b"original weights")
        deleted.write_text("original notes")
        run.log_artifact(replaced, artifact_path="ckpt")
        run.log_artifact(deleted)
        # overwrite the way np.save/torch.save do (write new, rename over), and delete
        (tmp_path / "model.tmp").write_bytes(b"NEWER weights!!")
        os.replace(tmp_path / "model.tmp", replaced)
        deleted.unlink()
        assert backend.pending  # nothing uploaded yet
    assert memory.files() == {"ckpt/model.bin": b"original weights", "notes.txt": b"original notes"}
    out = tmp_path / "dl"
    assert _download(tracker, run.run_id, "ckpt/model.bin", out).read_bytes() == b"original weights"
    assert _download(tracker, run.run_id, "notes.txt", out).read_text() == "original notes"


def test_log_artifact_missing_file_or_directory_rejected(tracker: ExperimentTracker, tmp_path: Path) -> None:
    with tracker.run(run_name="r") as run:
        with pytest.raises(InvalidRecord, match="does not exist"):
            run.log_artifact(tmp_path / "missing.bin")
        with pytest.raises(InvalidRecord, match="log_artifacts"):
            run.log_artifact(tmp_path)
        with pytest.raises(InvalidRecord, match="escapes"):
            run.log_text("x", "../outside.txt")
    assert tracker.client.list_artifacts(run.run_id) == []


def test_log_artifacts_image_dict_text(tracker: ExperimentTracker, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "bundle"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A")
    (folder / "sub" / "b.txt").write_text("B")
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    with tracker.run(run_name="r") as run:
        run.log_artifacts(folder, artifact_path="bundle")
        run.log_image(image, "images/cool_image.png")
        image[:] = 0  # the caller may reuse its buffer at once
        run.log_dict({"lr": 0.001, "layers": [1, 2]}, "config/params.json")
        run.log_dict({"name": "yaml"}, "config/params.yaml")
        run.log_text("hello world", "notes/readme.txt")
    out = tmp_path / "dl"
    root = _download(tracker, run.run_id, "", out)
    assert (root / "bundle" / "a.txt").read_text() == "A"
    assert (root / "bundle" / "sub" / "b.txt").read_text() == "B"
    with Image.open(root / "images" / "cool_image.png") as png:
        assert png.format == "PNG" and png.size == (640, 480)
        back = np.asarray(png)
    assert back.shape == (480, 640, 3)
    assert np.array_equal(back, np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8))
    assert json.loads((root / "config" / "params.json").read_text()) == {"lr": 0.001, "layers": [1, 2]}
    assert "name: yaml" in (root / "config" / "params.yaml").read_text()
    assert (root / "notes" / "readme.txt").read_text() == "hello world"


# -- background jobs -------------------------------------------------------------------------
def test_background_thread_jobs(tracker: ExperimentTracker) -> None:
    order: list[str] = []
    gate = threading.Event()
    seen: dict[str, bool] = {}

    def slow() -> None:
        time.sleep(0.3)
        order.append("first")

    def fast() -> None:
        order.append("second")

    def waiter() -> None:
        seen["gate"] = gate.wait(5)

    with tracker.run(run_name="bg") as run:
        tracker.background_worker("metric", mlflow.log_metric, False, "bg_metric", 1.5, step=3)
        tracker.background_worker("same", slow)
        tracker.background_worker("same", fast)  # waits for "same" before it
        tracker.background_worker("waiter", waiter)
        tracker.background_worker("opener", gate.set)  # another name: does not wait for "waiter"
    assert order == ["first", "second"]
    assert seen == {"gate": True}
    got = tracker.client.get_run(run.run_id)
    assert got.data.metrics == {"bg_metric": 1.5}
    assert got.info.status == "FINISHED"
    # the fluent call in the job thread did not open a stray run anywhere
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    assert [r.info.run_id for r in tracker.client.search_runs(experiments)] == [run.run_id]


def test_failing_background_job_raises_delivery_error_naming_it(tracker: ExperimentTracker) -> None:
    def broken() -> None:
        raise ValueError("disk on fire")

    with pytest.raises(DeliveryError, match=r"job 'exporter'.*disk on fire") as info:
        with tracker.run(run_name="bg-fail") as run:
            tracker.background_worker("exporter", broken)
            run.log_metric("still_logged", 1.0)
    assert [(f.kind, f.key) for f in info.value.failed] == [("job", "exporter")]
    got = tracker.client.get_run(run.run_id)
    assert got.data.metrics == {"still_logged": 1.0}
    assert got.info.status == "FINISHED"


@pytest.mark.timeout(90)
def test_background_process_jobs(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="bg-proc") as run:
        tracker.background_worker("text", mlflow.log_text, True, "from a child process", "bg/child.txt")
        tracker.background_worker("metric", mlflow.log_metric, True, "child_metric", 2.5)
        # Same names: these thread jobs wait for the child processes before them.
        tracker.background_worker("text", time.sleep, False, 0)
        tracker.background_worker("metric", time.sleep, False, 0)
        # Both children have exited and must not have ended the parent's run.
        assert tracker.client.get_run(run.run_id).info.status == "RUNNING"
        assert tracker.client.get_run(run.run_id).data.metrics == {"child_metric": 2.5}
        run.log_metric("parent_metric", 1.0)
    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics == {"child_metric": 2.5, "parent_metric": 1.0}
    assert [f.path for f in tracker.client.list_artifacts(run.run_id, "bg")] == ["bg/child.txt"]
    assert len(tracker.client.search_runs([tracker.id])) == 1


# -- health ----------------------------------------------------------------------------------
def test_stats_keys(tracker: ExperimentTracker) -> None:
    with tracker.run(run_name="stats") as run:
        for i in range(5):
            run.log_metric("x", float(i), step=i)
        stats = run.stats()
    for key in ("queued", "delivered", "failed", "retries", "dropped", "latency_us", "run_id"):
        assert key in stats, key
    assert stats["delivered"] == 5 and stats["failed"] == 0 and stats["queued"] == 0
    assert stats["latency_us"]["samples"] == 5 and stats["latency_us"]["p50"] > 0
    assert stats["run_id"] == run.run_id


# -- the real server over HTTP ---------------------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(90)
def test_http_server_round_trip_and_resume_by_name(tracking_uri: str, mlflow_server, tmp_path: Path) -> None:
    name = f"http-{uuid.uuid4().hex[:8]}"
    tracker = ExperimentTracker(name, tracking_uri=mlflow_server.uri, team="remote")
    assert tracker.uri == mlflow_server.uri
    assert [s.name for s in tracker.sinks] == ["mlflow"]
    artifact = tmp_path / "weights.bin"
    artifact.write_bytes(b"\x00\x01remote")
    with tracker.run(run_name="remote-run", description="over http", kind="smoke") as run:
        run.log_metrics({f"m{i}": float(i) for i in range(20)}, step=1)
        run.log_metric("loss", 0.5, step=2)
        run.log_param("lr", 0.01)
        run.set_tag("phase", "train")
        run.log_artifact(artifact, artifact_path="ckpt")
        run.log_text("hi", "notes.txt")
    with tracker.run(run_name="remote-run") as resumed:
        resumed.log_metric("loss", 0.25, step=3)
    assert resumed.run_id == run.run_id
    remote = MlflowClient(mlflow_server.uri)
    got = remote.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["m19"] == 19.0 and got.data.metrics["loss"] == 0.25
    assert got.data.params == {"lr": "0.01"}
    assert got.data.tags["phase"] == "train" and got.data.tags["kind"] == "smoke"
    assert got.data.tags["mlflow.note.content"] == "over http"
    assert sorted((m.step, m.value) for m in remote.get_metric_history(run.run_id, "loss")) == [(2, 0.5), (3, 0.25)]
    assert remote.get_experiment(tracker.id).tags["team"] == "remote"
    out = Path(remote.download_artifacts(run.run_id, "ckpt/weights.bin", str(tmp_path / "dl")))
    assert out.read_bytes() == b"\x00\x01remote"
    assert {f.path for f in remote.list_artifacts(run.run_id)} == {"ckpt", "notes.txt"}
