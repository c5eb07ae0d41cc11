"""The ``spool`` sink: plugin door, stats, uploads to memory://, file:// and s3:// (moto), failed uploads."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_er import plugins
from mlflow_er.hookspecs import SinkContext
from mlflow_er.records import Artifact, Batch, Metric, Param, Tag
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool import SpoolUploadError
from mlflow_er.spool.cli import EXIT_OK, status_main
from mlflow_er.spool.replay import sync
from mlflow_er.spool.upload import put_verified

RUN = "abcdefabcdefabcdefabcdefabcdef00"
TS = 1_700_000_000_000

pytestmark = pytest.mark.timeout(60)


def fill(sink: SpoolSink, n: int = 600, start: int = 0) -> None:
    for i in range(start, start + n, 100):
        sink.write_batch(Batch.of(RUN, [Metric(RUN, "loss", i + j / 10, TS + i + j, i + j, i + j) for j in range(100)]))
    sink.write_batch(Batch.of(RUN, [Param(RUN, "lr", "0.1", TS, 10**6), Tag(RUN, "done", "yes", TS, 10**6 + 1)]))


def remote_objects(fs: Any, base: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    out = {}
    for path in fs.find(base):
        out[path[len(base.rstrip("/")) + 1:] if path.startswith(base.rstrip("/")) else path] = fs.cat_file(path)
    return out


def assert_mirrors_local(local: Path, objects: dict[str, bytes], complete: bool = True) -> None:
    """Every remote object is byte-identical to its local file (no partial object); all there if ``complete``."""
    assert not [k for k in objects if ".tmp-" in k], objects.keys()
    objects = {k: v for k, v in objects.items() if k.startswith(("segments/", "artifacts/"))}
    for key, data in objects.items():
        assert (local / key).read_bytes() == data, key
    if complete:
        sealed = {f"segments/{p.name}" for p in (local / "segments").glob("*.seg")}
        assert sealed and sealed <= set(objects)


def check_synced(tracking_uri: str, n: int = 600) -> None:
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("up").experiment_id])
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(n))
    assert runs[0].data.params == {"lr": "0.1"} and runs[0].data.tags["done"] == "yes"


def test_plugin_door_options_and_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ER_SPOOL_DIR", str(tmp_path / "from-env"))
    assert "spool" in plugins.available_names("sink")
    sink = plugins.make_sink("spool", SinkContext("sqlite:///x.db", "3", "up", {"fsync_interval": None,
                                                                               "segment_bytes": 4000}))
    assert isinstance(sink, SpoolSink) and sink.path == (tmp_path / "from-env").resolve()
    fill(sink, 300)
    s = sink.stats()
    assert s["appended"] == 302 and s["acknowledged"] < 302 and s["segments_sealed"] >= 1
    sink.flush()
    assert sink.stats()["acknowledged"] == 302
    sink.close()
    assert sink.stats()["segments_sealed"] >= 2 and not list(sink.path.glob("segments/*.open"))


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_upload_and_sync_from_the_destination(scheme: str, tmp_path: Path, memfs: Any, tracking_uri: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    url = "memory://bucket/run1" if scheme == "memory" else (tmp_path / "remote").as_uri()
    sink = SpoolSink(tmp_path / "local", upload_url=url, experiment_name="up", segment_bytes=8000)
    fill(sink)
    (tmp_path / "model.txt").write_text("weights")
    sink.write_artifact(Artifact(RUN, str(tmp_path / "model.txt"), "model", TS, 5))
    sink.close()
    stats = sink.stats()
    assert stats["pending_uploads"] == 0 and stats["uploaded_artifacts"] == 1 and stats["uploaded_segments"] >= 3
    fs, base = sink.uploader.fs, sink.uploader.base
    assert_mirrors_local(sink.path, remote_objects(fs, base))
    assert status_main([url, "--json"]) == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["totals"]["uploaded"] == status["totals"]["records"] == 603
    report = sync(url, tracking_uri)
    assert report.records == 603 and report.artifacts == 1
    check_synced(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id = client.search_runs([client.get_experiment_by_name("up").experiment_id])[0].info.run_id
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/model.txt"]
    assert sync(url, tracking_uri).records == 0


def test_failed_upload_leaves_no_partial_object_and_resumes(tmp_path: Path, memfs: Any, tracking_uri: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url = "memory://bucket/resume"
    sink = SpoolSink(tmp_path / "local", upload_url=url, experiment_name="up", segment_bytes=8000,
                     upload_timeout=5)
    fs = sink.uploader.fs
    real_put, real_mv = fs.put_file, fs.mv
    calls = {"n": 0}

    def half_put(lpath: str, rpath: str, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:  # the connection drops half-way through the second upload
            fs.pipe_file(rpath, Path(lpath).read_bytes()[:100])
            raise ConnectionResetError("connection reset mid-upload")
        real_put(lpath, rpath, **kw)

    monkeypatch.setattr(fs, "put_file", half_put)
    fill(sink)
    sink.close()
    assert sink.stats()["pending_uploads"] > 0
    objects = remote_objects(fs, "/bucket/resume")
    assert len([k for k in objects if k.startswith("segments/")]) == 1  # the first, whole; not the half one
    assert_mirrors_local(sink.path, objects, complete=False)

    monkeypatch.setattr(fs, "put_file", real_put)
    monkeypatch.setattr(fs, "mv", lambda *a, **k: (_ for _ in ()).throw(OSError("rename failed")))
    again = SpoolSink(tmp_path / "local", upload_url=url, experiment_name="up", upload_timeout=5)
    again.close()
    assert_mirrors_local(sink.path, remote_objects(fs, "/bucket/resume"), complete=False)

    monkeypatch.setattr(fs, "mv", real_mv)
    final = SpoolSink(tmp_path / "local", upload_url=url, experiment_name="up")
    final.close()
    assert final.stats()["pending_uploads"] == 0
    assert_mirrors_local(sink.path, remote_objects(fs, "/bucket/resume"))
    assert sync(url, tracking_uri).records == 602
    check_synced(tracking_uri)


def test_existing_object_is_never_overwritten(tmp_path: Path, memfs: Any) -> None:
    local = tmp_path / "seg"
    local.write_bytes(b"abc" * 100)
    assert put_verified(memfs, local, "/d/seg") is True
    assert put_verified(memfs, local, "/d/seg") is False  # already there, identical: done
    memfs.pipe_file("/d/other", b"different")
    with pytest.raises(SpoolUploadError, match="not overwriting"):
        put_verified(memfs, local, "/d/other")
    assert memfs.cat_file("/d/other") == b"different"


def test_s3_upload_and_sync(tmp_path: Path, s3_bucket: tuple[Any, str], moto_s3: Any, tracking_uri: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    s3, bucket = s3_bucket
    url = f"{bucket}/spools/run1"
    opts = {"endpoint_url": moto_s3.endpoint_url, "skip_instance_cache": True}
    sink = SpoolSink(tmp_path / "local", upload_url=url, upload_options=opts, experiment_name="up",
                     segment_bytes=8000)
    fill(sink)
    sink.close()
    assert sink.stats()["pending_uploads"] == 0
    assert_mirrors_local(sink.path, remote_objects(s3, url[5:]))
    assert status_main([url, "-o", f"endpoint_url={moto_s3.endpoint_url}"]) == EXIT_OK
    assert "uploaded: 602" in capsys.readouterr().out
    assert sync(url, tracking_uri, storage_options=opts).records == 602
    check_synced(tracking_uri)


@pytest.mark.timeout(90)
def test_moto_stopped_mid_upload_then_restarted(tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from moto.server import ThreadedMotoServer
    from servers import MotoS3

    moto = MotoS3().start()
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    port = int(moto.endpoint_url.rsplit(":", 1)[1])
    url = moto.make_bucket("midupload") + "/spool"
    opts = {"endpoint_url": moto.endpoint_url, "skip_instance_cache": True,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
    restarted = None
    try:
        sink = SpoolSink(tmp_path / "local", upload_url=url, upload_options=opts, experiment_name="up",
                         segment_bytes=8000, upload_timeout=20)
        sink.uploader.fs.retries = 1
        real_put = sink.uploader.fs.put_file
        calls = {"n": 0}

        def stop_then_put(lpath: str, rpath: str, **kw: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                moto.stop()  # the server goes away while the uploader is in the middle of its work
            real_put(lpath, rpath, **kw)

        monkeypatch.setattr(sink.uploader.fs, "put_file", stop_then_put)
        with caplog.at_level(logging.WARNING):
            fill(sink)
            t0 = time.monotonic()
            sink.close()
        assert time.monotonic() - t0 < 25  # bounded by upload_timeout
        pending = sink.stats()["pending_uploads"]
        assert pending >= 1 and "not uploaded" in caplog.text

        restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        restarted.start()  # moto keeps its state in-process: the bucket and what was uploaded are still there
        moto._endpoint = f"http://127.0.0.1:{port}"
        check = moto.fs()  # same port as before the stop
        before = remote_objects(check, url[5:])
        assert len([k for k in before if k.startswith("segments/")]) == 1  # only the first segment, whole
        assert_mirrors_local(sink.path, before, complete=False)

        resumed = SpoolSink(tmp_path / "local", upload_url=url, upload_options=opts, experiment_name="up")
        resumed.close()
        assert resumed.stats()["pending_uploads"] == 0
        assert_mirrors_local(sink.path, remote_objects(check, url[5:]))
        assert sync(url, tracking_uri, storage_options=opts).records == 602
        check_synced(tracking_uri)
        assert sync(url, tracking_uri, storage_options=opts).records == 0
    finally:
        if restarted is not None:
            restarted.stop()
        moto.stop()


def test_offline_resolvers_answer_only_without_a_client(tracking_uri: str) -> None:
    hook = plugins.get_plugin_manager().hook
    exp = hook.mlflow_er_resolve_experiment(client=None, experiment_name="offline", experiment_id=None,
                                            artifact_location=None, create_new=True, tags={"git_commit": "abc"})
    assert exp.name == "offline" and exp.tags == {"git_commit": "abc"}
    rid = hook.mlflow_er_resolve_run(client=None, experiment_id="", run_name="r", run_id=None, description=None,
                                     parent_run_id=None, tags={})
    assert len(rid) == 32 and int(rid, 16) >= 0
    client = MlflowClient(tracking_uri)
    online = hook.mlflow_er_resolve_experiment(client=client, experiment_name="online", experiment_id=None,
                                               artifact_location=None, create_new=True, tags={})
    assert online.experiment_id == client.get_experiment_by_name("online").experiment_id  # the built-in did it


def test_artifact_in_the_spool_is_a_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"v1" * 1000)
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    sink = SpoolSink(tmp_path / "spool", fsync_interval=None)
    sink.write_artifact(Artifact(RUN, str(src), None, TS, 0))  # the user's own file (sync backend: no snapshot)
    sink.write_artifact(Artifact(RUN, str(folder), "d", TS, 1, is_dir=True))
    with open(src, "r+b") as f:  # rewritten in place after the log call
        f.write(b"XX")
    (folder / "a.txt").write_text("second")
    sink.close()
    copies = sorted((tmp_path / "spool" / "artifacts").rglob("*"))
    files = {p.name: p.read_bytes() for p in copies if p.is_file()}
    assert files == {"ckpt.bin": b"v1" * 1000, "a.txt": b"first"}
    assert all(not p.name.startswith(".") for p in (tmp_path / "spool" / "artifacts").iterdir())
