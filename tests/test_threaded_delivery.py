"""What the threaded backend delivers, and how: input rules, order, concurrency, artifacts.

Bad input is refused in the caller (``InvalidRecord``) before anything is queued, and
what is accepted reaches the store unchanged — never silently truncated. Many threads
logging at once keep exact counts and per-key order; the last ``set_tag`` wins.
Artifacts are snapshotted at call time and uploaded off the metrics path.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from servers import MlflowServer

from mlflow_er import ExperimentTracker
from mlflow_er.backends.threaded import ThreadedBackend
from mlflow_er.errors import InvalidRecord
from mlflow_er.records import Artifact, Batch
from mlflow_er.sinks.base import Sink
from mlflow_er.sinks.mlflow import MlflowSink


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- input rules, through the threaded backend --------------------------------------------------
BAD_VALUES = ["1.0", None, True, False, "nan", [1.0], {"v": 1}, 1j, object()]
BAD_KEYS = ["", ".", "a//b", "../up", "up/..", "/abs", "a/./b", "bad!key", "tab\tkey", "é€", "x" * 251, 5, None]


@pytest.mark.server
@pytest.mark.timeout(60)
def test_bad_inputs_rejected_in_caller_good_ones_stored_whole(mlflow_server: MlflowServer) -> None:
    tracker = ExperimentTracker(_name("inputs"), tracking_uri=mlflow_server.uri, backend="threaded",
                                close_timeout=30)
    with tracker.run(run_name="r") as run:
        for value in BAD_VALUES:
            with pytest.raises(InvalidRecord):
                run.log_metric("bad_value", value)  # type: ignore[arg-type]
        for key in BAD_KEYS:
            with pytest.raises(InvalidRecord):
                run.log_metric(key, 1.0)  # type: ignore[arg-type]
            with pytest.raises(InvalidRecord):
                run.log_param(key, "x")  # type: ignore[arg-type]
            with pytest.raises(InvalidRecord):
                run.set_tag(key, "x")  # type: ignore[arg-type]
        for length in (6001, 1024 * 1024):
            with pytest.raises(InvalidRecord, match="6000"):
                run.log_param(f"p{length}", "y" * length)
            with pytest.raises(InvalidRecord):
                run.log_params({"fine": "1", f"q{length}": "y" * length})
        with pytest.raises(InvalidRecord, match="8000"):
            run.set_tag("long_tag", "t" * 8001)
        with pytest.raises(InvalidRecord):
            run.log_metrics({"ok_in_bad_call": 1.0, "bad": "x"})  # type: ignore[dict-item]
        with pytest.raises(InvalidRecord):
            run.log_metric("m", 1.0, step=2**63)
        with pytest.raises(InvalidRecord):
            run.log_metric("m", 1.0, timestamp=-1)
        run.flush(timeout=30)  # the run's start travels in the stream too: let it pass first
        assert run.stats()["queued"] == 0 and run.stats()["delivered"] == 0, "a rejected record was queued"

        # Accepted, and encoded as documented: NaN kept, ±inf stored at MLflow's ±max float.
        specials = {"nan": float("nan"), "pinf": math.inf, "ninf": -math.inf, "np32": np.float32(0.25),
                    "int": 3, "np_int": np.int64(7), "big": 1e308, "zero": -0.0}
        for key, value in specials.items():
            run.log_metric(key, value, step=1)
        run.log_param("p6000", "z" * 6000)
        run.log_param("p_obj", {"a": [1, 2]})
        run.set_tag("t8000", "t" * 8000)
        run.flush(timeout=30)
        stats = run.stats()
    assert stats["failed"] == 0 and stats["delivered"] == len(specials) + 3
    data = MlflowClient(mlflow_server.uri).get_run(run.run_id).data
    m = data.metrics
    assert set(m) == set(specials), "a rejected metric reached the store"
    assert math.isnan(m["nan"])
    assert m["pinf"] > 0 and (math.isinf(m["pinf"]) or m["pinf"] == sys.float_info.max)
    assert m["ninf"] < 0 and (math.isinf(m["ninf"]) or m["ninf"] == -sys.float_info.max)
    assert (m["np32"], m["int"], m["np_int"], m["big"], m["zero"]) == (0.25, 3.0, 7.0, 1e308, 0.0)
    assert data.params["p6000"] == "z" * 6000, "a 6000-char param was truncated"
    assert data.params["p_obj"] == str({"a": [1, 2]})
    assert "fine" not in data.params, "log_params queued part of a rejected call"
    assert data.tags["t8000"] == "t" * 8000
    assert not any(k.startswith(("p6001", "p1048576", "q")) for k in data.params)


# -- many threads -----------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.timeout(90)
def test_32_threads_by_1000_metrics_exact_and_ordered(mlflow_server: MlflowServer) -> None:
    threads_n, per_thread = 32, 1000
    tracker = ExperimentTracker(_name("threads"), tracking_uri=mlflow_server.uri, backend="threaded",
                                close_timeout=60)
    errors: list[BaseException] = []
    with tracker.run(run_name="r") as run:
        barrier = threading.Barrier(threads_n)

        def work(k: int) -> None:
            try:
                barrier.wait(10)
                for step in range(per_thread):
                    run.log_metric(f"t{k}", k * 10_000 + step, step=step)
            except BaseException as exc:  # reported below
                errors.append(exc)

        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in pool), errors
        run.flush(timeout=60)
        stats = run.stats()
    assert stats["delivered"] == threads_n * per_thread and stats["failed"] == 0
    client = MlflowClient(mlflow_server.uri)
    for k in range(threads_n):
        hist = client.get_metric_history(run.run_id, f"t{k}")
        assert len(hist) == per_thread, f"key t{k}: {len(hist)} rows"
        by_step = sorted(hist, key=lambda m: m.step)
        assert [m.step for m in by_step] == list(range(per_thread))
        assert [m.value for m in by_step] == [float(k * 10_000 + s) for s in range(per_thread)]
        stamps = [m.timestamp for m in by_step]
        assert stamps == sorted(stamps), f"key t{k}: timestamps go backwards as steps increase"


@pytest.mark.server
@pytest.mark.timeout(60)
def test_30_set_tag_in_a_row_last_wins(mlflow_server: MlflowServer) -> None:
    tracker = ExperimentTracker(_name("tags"), tracking_uri=mlflow_server.uri, backend="threaded",
                                close_timeout=30)
    with tracker.run(run_name="r") as run:
        for i in range(30):
            run.set_tag("phase", f"v{i}")
            run.set_tags({"other": f"o{i}", "phase_copy": f"v{i}"})
            run.log_metric("m", float(i), step=i)
        run.flush(timeout=30)
        tags = MlflowClient(mlflow_server.uri).get_run(run.run_id).data.tags
    assert tags["phase"] == "v29"
    assert tags["other"] == "o29" and tags["phase_copy"] == "v29"


# -- artifacts --------------------------------------------------------------------------------------
class GatedMlflowSink(MlflowSink):
    """The real MLflow sink, with artifact uploads held until the test opens the gate."""

    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri)
        self.gate = threading.Event()

    def write_artifact(self, artifact: Artifact) -> None:
        self.gate.wait(30)
        super().write_artifact(artifact)


def _staged(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.timeout(60)
def test_artifact_snapshot_survives_remove_and_replace(tracking_uri: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(staging))
    sink = GatedMlflowSink(tracking_uri)
    tracker = ExperimentTracker(_name("art"), backend="threaded", sinks=[sink], close_timeout=30)
    src = tmp_path / "src"
    (src / "folder").mkdir(parents=True)
    a, b = src / "a.txt", src / "b.bin"
    a.write_text("original a")
    b.write_bytes(b"original b")
    (src / "folder" / "x.txt").write_text("original x")
    (src / "folder" / "y.txt").write_text("original y")
    payload = {"lr": 0.1}
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    try:
        with tracker.run(run_name="r") as run:
            run.log_artifact(a)
            run.log_artifact(b, "sub")
            run.log_artifacts(src / "folder", "folder")
            run.log_dict(payload, "cfg/params.json")
            run.log_text("hello", "notes.txt")
            run.log_image(image, "img.png")
            # The caller changes everything at once, as a training loop rewriting checkpoints would.
            a.unlink()
            fresh = src / "b.new"
            fresh.write_bytes(b"CHANGED")
            os.replace(fresh, b)
            (src / "folder" / "x.txt").unlink()
            fresh_y = src / "y.new"
            fresh_y.write_text("CHANGED")
            os.replace(fresh_y, src / "folder" / "y.txt")
            payload["lr"] = 99.0
            image[:] = 255
            time.sleep(0.3)
            held = _staged(staging)
            assert len(held) >= 4, f"snapshots not in the staging dir: {held}"
            sink.gate.set()
            run.flush(timeout=30)
            stats = run.stats()
            assert _staged(staging) == [], "snapshots left behind after upload"
    finally:
        sink.gate.set()
    assert stats["artifacts"] == 6 and stats["failed"] == 0
    out = Path(MlflowClient(tracking_uri).download_artifacts(run.run_id, "", str(tmp_path / "dl")))
    assert (out / "a.txt").read_text() == "original a"
    assert (out / "sub" / "b.bin").read_bytes() == b"original b"
    assert (out / "folder" / "x.txt").read_text() == "original x"
    assert (out / "folder" / "y.txt").read_text() == "original y"
    assert json.loads((out / "cfg" / "params.json").read_text()) == {"lr": 0.1}
    assert (out / "notes.txt").read_text() == "hello"
    from PIL import Image

    with Image.open(out / "img.png") as img:
        assert np.asarray(img).max() == 0, "the image was read after the caller changed it"
    assert not any(staging.iterdir()), list(staging.iterdir())


class TimedSink(Sink):
    """Records when each metric arrived and when the (slow) artifact upload finished."""

    name = "timed"

    def __init__(self, artifact_seconds: float) -> None:
        self.artifact_seconds = artifact_seconds
        self.metric_times: dict[str, float] = {}
        self.artifact_started: float | None = None
        self.artifact_done: float | None = None

    def write_batch(self, batch: Batch) -> None:
        now = time.monotonic()
        for m in batch.metrics:
            self.metric_times[m.key] = now

    def write_artifact(self, artifact: Artifact) -> None:
        self.artifact_started = time.monotonic()
        time.sleep(self.artifact_seconds)
        self.artifact_done = time.monotonic()


@pytest.mark.timeout(60)
def test_slow_artifact_upload_does_not_hold_metrics_back(tracking_uri: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(tmp_path / "staging"))
    sink = TimedSink(artifact_seconds=2.0)
    tracker = ExperimentTracker(_name("slowart"), backend=ThreadedBackend(flush_interval=0.05), sinks=[sink],
                                close_timeout=30)
    big = tmp_path / "model.bin"
    big.write_bytes(b"\0" * 1024)
    with tracker.run(run_name="r") as run:
        run.log_metric("before", 1.0)
        run.log_artifact(big)
        t0 = time.monotonic()
        for i in range(5):
            run.log_metric(f"after{i}", float(i))
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while len(sink.metric_times) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        arrived = time.monotonic() - t0
        assert sink.artifact_done is None, "metrics waited for the artifact upload"
        run.flush(timeout=30)
    assert set(sink.metric_times) == {"before", *(f"after{i}" for i in range(5))}
    assert arrived < 1.5
    assert sink.artifact_started is not None and sink.artifact_done is not None
    assert max(sink.metric_times.values()) < sink.artifact_done


@pytest.mark.timeout(60)
def test_artifact_snapshot_survives_in_place_overwrite(tracking_uri: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # np.save / torch.save / open(path, "wb") rewrite the same inode: a checkpoint saved
    # to the same path every epoch. A hard-link "snapshot" shares that inode, so the
    # upload would carry the new (or half-written) content instead of the logged one.
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(tmp_path / "staging"))
    sink = GatedMlflowSink(tracking_uri)
    tracker = ExperimentTracker(_name("inplace"), backend="threaded", sinks=[sink], close_timeout=30)
    ckpt = tmp_path / "ckpt.npy"
    np.save(ckpt, np.arange(10))
    try:
        with tracker.run(run_name="r") as run:
            run.log_artifact(ckpt)
            np.save(ckpt, np.full(10, -1))  # the next epoch's checkpoint, same path
            sink.gate.set()
            run.flush(timeout=30)
    finally:
        sink.gate.set()
    out = Path(MlflowClient(tracking_uri).download_artifacts(run.run_id, "ckpt.npy", str(tmp_path / "dl")))
    assert np.load(out).tolist() == list(range(10)), "the uploaded checkpoint is not the one logged"
