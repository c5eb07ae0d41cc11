"""``mlflow-er sync``/``status``: exactly once, resumable, crash-safe (SIGKILL loop), server down and back."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

import mlflow_er
from mlflow_er.records import Artifact, Batch, Metric, Param, Tag
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool import SpoolReader, SpoolWarning, SpoolWriter
from mlflow_er.spool.cli import EXIT_OK, EXIT_STOPPED, status_main, sync_main
from mlflow_er.spool.format import decode_header, scan
from mlflow_er.spool.replay import SOURCE_RUN_TAG, sync

RUN = "feedfacefeedfacefeedfacefeedface"
TS = 1_700_000_000_000
PKG_DIR = str(Path(mlflow_er.__file__).parent)


class Crash(BaseException):
    """Stands for the sync process dying mid-way (not an Exception: nothing may swallow it)."""


def only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def make_spool(path: Path, *, n: int = 1200, tag_changes: int = 30, experiment: str = "spooled") -> dict:
    """A spool whose records interleave metrics, params and a tag overwritten many times."""
    sink = SpoolSink(path, experiment_name=experiment, segment_bytes=16_000)
    seq = 0
    for i in range(0, n, 100):
        recs: list = [Metric(RUN, f"k{j % 3}", float(j) / 7, TS + j, j, seq + j - i) for j in range(i, i + 100)]
        seq += 100
        recs.append(Param(RUN, f"p{i}", str(i), TS + i, seq))
        seq += 1
        sink.write_batch(Batch.of(RUN, recs))
    for t in range(tag_changes):
        sink.write_batch(Batch.of(RUN, [Tag(RUN, "phase", f"v{t}", TS + t, seq)]))
        seq += 1
    sink.close()
    return {"n": n, "params": n // 100, "last_tag": f"v{tag_changes - 1}",
            "records": n + n // 100 + tag_changes}


def check_exact(client: MlflowClient, run_id: str, spec: dict) -> None:
    n = spec["n"]
    for k in range(3):
        hist = client.get_metric_history(run_id, f"k{k}")
        steps = sorted(m.step for m in hist)
        assert steps == list(range(k, n, 3)), f"k{k}: {len(steps)} rows for {len(range(k, n, 3))} records"
        assert all(m.value == m.step / 7 and m.timestamp == TS + m.step for m in hist)
    data = client.get_run(run_id).data
    assert {k: v for k, v in data.params.items()} == {f"p{i}": str(i) for i in range(0, n, 100)}
    assert data.tags["phase"] == spec["last_tag"]


@pytest.mark.timeout(60)
def test_sync_twice_is_a_noop(tmp_path: Path, tracking_uri: str) -> None:
    spec = make_spool(tmp_path / "spool")
    first = sync(str(tmp_path / "spool"), tracking_uri, chunk_records=200)
    assert first.records == spec["records"] and first.failed == [] and len(first.runs_created) == 1
    client = MlflowClient(tracking_uri)
    run = only_run(client, "spooled")
    assert run.data.tags[SOURCE_RUN_TAG] == RUN
    check_exact(client, run.info.run_id, spec)
    second = sync(str(tmp_path / "spool"), tracking_uri)
    assert (second.records, second.delivered, second.runs_created) == (0, 0, [])
    assert second.segments_skipped == first.segments
    check_exact(client, only_run(client, "spooled").info.run_id, spec)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("crash_after", [1, 7, 15])
def test_interrupted_sync_resumes_without_duplicates(tmp_path: Path, tracking_uri: str,
                                                     monkeypatch: pytest.MonkeyPatch, crash_after: int) -> None:
    from mlflow_er.delivery import Deliverer

    spec = make_spool(tmp_path / "spool")
    real = Deliverer.deliver
    calls = {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] > crash_after:
            raise Crash()
        return real(self, batch)

    monkeypatch.setattr(Deliverer, "deliver", dying)
    with pytest.raises(Crash):
        sync(str(tmp_path / "spool"), tracking_uri, chunk_records=50)
    monkeypatch.setattr(Deliverer, "deliver", real)
    resumed = sync(str(tmp_path / "spool"), tracking_uri, chunk_records=50)
    assert 0 < resumed.records < spec["records"]  # it resumed, it did not start over
    assert spec["records"] - resumed.records <= crash_after * 100 + 50  # at most one chunk is re-sent
    client = MlflowClient(tracking_uri)
    check_exact(client, only_run(client, "spooled").info.run_id, spec)
    assert sync(str(tmp_path / "spool"), tracking_uri).records == 0


@pytest.mark.timeout(60)
def test_crash_between_run_creation_and_mapping_makes_no_second_run(tmp_path: Path, tracking_uri: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow_er.spool.runs as replay  # the module that records the run mapping

    spec = make_spool(tmp_path / "spool", n=300)
    real = replay.write_atomic

    def dying(fs, path, data):
        if "/runs/" in path:
            raise Crash()
        return real(fs, path, data)

    monkeypatch.setattr(replay, "write_atomic", dying)
    with pytest.raises(Crash):
        sync(str(tmp_path / "spool"), tracking_uri)
    monkeypatch.setattr(replay, "write_atomic", real)
    report = sync(str(tmp_path / "spool"), tracking_uri)
    assert report.runs_created == []  # found by its source tag
    client = MlflowClient(tracking_uri)
    check_exact(client, only_run(client, "spooled").info.run_id, spec)


@pytest.mark.timeout(60)
def test_run_matched_by_original_id_and_run_facts(tmp_path: Path, tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("existing")
    existing = client.create_run(exp).info.run_id
    sink = SpoolSink(tmp_path / "spool", experiment_name="offline-exp")
    sink.start_run("parent-run", run_name="parent", description="the parent")
    sink.start_run("child-run", run_name="child", parent_run_id="parent-run", tags={"team": "ml"})
    sink.write_batch(Batch.of("child-run", [Metric("child-run", "acc", 0.9, TS, 1, 0)]))
    sink.write_batch(Batch.of(existing, [Metric(existing, "acc", 0.5, TS, 1, 0)]))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.json").write_text("{}")
    sink.write_artifact(Artifact("child-run", str(tmp_path / "notes.txt"), "docs", TS, 1))
    sink.write_artifact(Artifact("child-run", str(tmp_path / "folder"), None, TS, 2, is_dir=True))
    sink.write_artifact(Artifact("child-run", None, "cfg", TS, 3, payload=("json", {"x": 1}), name="c.json"))
    sink.end_run("child-run", "FAILED", end_time=TS + 50)
    sink.end_run("parent-run")
    sink.close()
    report = sync(str(tmp_path / "spool"), tracking_uri)
    assert report.failed == [] and report.artifacts == 3 and len(report.runs_created) == 2
    assert [m.value for m in client.get_metric_history(existing, "acc")] == [0.5]  # matched by id
    oexp = client.get_experiment_by_name("offline-exp").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([oexp])}
    child, parent = runs["child"], runs["parent"]
    assert child.info.status == "FAILED" and child.info.end_time == TS + 50
    assert parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.tags["team"] == "ml"
    assert parent.data.tags["mlflow.note.content"] == "the parent"
    paths = sorted(f.path for f in client.list_artifacts(child.info.run_id)) + \
        sorted(f.path for f in client.list_artifacts(child.info.run_id, "docs"))
    assert paths == ["a.json", "cfg", "docs", "docs/notes.txt"]  # a folder's contents, as MLflow's log_artifacts


@pytest.mark.timeout(60)
def test_corrupt_segment_syncs_the_rest_with_a_warning(tmp_path: Path, tracking_uri: str) -> None:
    with SpoolWriter(tmp_path / "spool", fsync_interval=None, experiment_name="dmg") as w:
        w.append([Metric(RUN, "m", float(i), TS, i, i) for i in range(50)])
    (seg,) = (tmp_path / "spool" / "segments").glob("*.seg")
    data = bytearray(seg.read_bytes())
    _, start, _ = decode_header(bytes(data))
    frames = list(scan(bytes(data), start))
    data[frames[20].start + 14] ^= 0x10
    seg.write_bytes(bytes(data))
    with pytest.warns(SpoolWarning, match="corrupt"):
        report = sync(str(tmp_path / "spool"), tracking_uri)
    assert len(report.gaps) == 1 and report.records == 49
    client = MlflowClient(tracking_uri)
    steps = sorted(m.step for m in client.get_metric_history(only_run(client, "dmg").info.run_id, "m"))
    assert steps == [i for i in range(50) if i != 20]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sync(str(tmp_path / "spool"), tracking_uri).records == 0  # done: not re-read, not re-warned


@pytest.mark.timeout(60)
def test_cli_sync_and_status(tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spool(tmp_path / "spool", n=400)
    spool = str(tmp_path / "spool")
    assert status_main([spool, "--json"]) == EXIT_OK
    before = json.loads(capsys.readouterr().out)
    assert before["totals"]["records"] == spec["records"] == before["totals"]["acknowledged"]
    assert before["totals"]["synced"] == {} and before["totals"]["gaps"] == 0
    assert all(s["state"] == "sealed" for s in before["segments"])
    assert sync_main([spool, "--tracking-uri", tracking_uri, "--json", "--no-progress"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == spec["records"] and out["failed"] == []
    assert status_main([spool]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"synced into {tracking_uri}: {spec['records']} of {spec['records']}" in text
    assert "SEGMENT" in text and "done" in text
    assert sync_main([spool, "--tracking-uri", tracking_uri]) == EXIT_OK
    assert "synced 0 record(s)" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_status_of_a_live_writer_and_a_partial_sync(tmp_path: Path, tracking_uri: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    w = SpoolWriter(tmp_path / "spool", fsync_interval=None, experiment_name="live", segment_bytes=3000)
    w.append([Metric(RUN, "m", float(i), TS, i, i) for i in range(100)])
    w.flush()
    assert sync(str(tmp_path / "spool"), tracking_uri).records == 100  # open segments sync too
    w.append([Metric(RUN, "m", float(i), TS, i, i) for i in range(100, 130)])
    assert status_main([str(tmp_path / "spool"), "--json"]) == EXIT_OK
    st = json.loads(capsys.readouterr().out)
    live = [s for s in st["segments"] if s["state"] == "open"]
    assert len(live) == 1 and live[0]["writer_alive"] is True
    assert st["totals"]["records"] == 130 and st["totals"]["open_records"] == live[0]["records"]
    (key,) = st["targets"]
    assert st["totals"]["synced"][key] == 100 and st["targets"][key] == tracking_uri
    assert sync(str(tmp_path / "spool"), tracking_uri).records == 30  # resumes inside the open segment
    w.close()
    assert sync(str(tmp_path / "spool"), tracking_uri).records == 0
    client = MlflowClient(tracking_uri)
    assert len(client.get_metric_history(only_run(client, "live").info.run_id, "m")) == 130


# -- a spooling process killed with SIGKILL, 20 times ----------------------------------------------------
CHILD = r"""
import random, sys, time, types
root, k, pkg_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# Load mlflow_er's modules without its package __init__ (which imports MLflow: ~1 s per start).
pkg = types.ModuleType("mlflow_er"); pkg.__path__ = [pkg_dir]; sys.modules["mlflow_er"] = pkg
from mlflow_er.records import Batch, Metric, Param, Tag
from mlflow_er.sinks.spool import SpoolSink
RUN = "feedfacefeedfacefeedfacefeedface"
sink = SpoolSink(root, experiment_name="kill9", fsync_interval=0.002, segment_bytes=24_000)
base, ts = k * 1_000_000, 1_700_000_000_000
sink.write_batch(Batch.of(RUN, [Param(RUN, f"p{k}", str(k), ts, 0), Tag(RUN, "child", str(k), ts, 1)]))
print("READY", flush=True)
i, last, rng = 0, -1, random.Random(k)
while True:
    n = rng.randint(1, 30)
    sink.write_batch(Batch(RUN, metrics=[Metric(RUN, "m", float(base + j), ts + j, base + j, 2 + j)
                                         for j in range(i, i + n)]))
    i += n
    time.sleep(0.002)  # a training loop's pace: keeps the volume (and the sync) small
    ack = sink.writer.acknowledged
    if ack != last:
        print(ack, flush=True)
        last = ack
"""


@pytest.mark.timeout(120)
def test_sigkill_20_times_then_sync_stores_every_acknowledged_record_once(tmp_path: Path, tracking_uri: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    spool = tmp_path / "spool"
    rng = random.Random(20)
    acked: dict[int, int] = {}
    t0 = time.monotonic()
    for k in range(20):
        proc = subprocess.Popen([sys.executable, str(script), str(spool), str(k), PKG_DIR],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if k % 4 == 3:
            time.sleep(rng.uniform(0.0, 0.25))  # any moment: start-up, recovery, first appends
        else:
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read() if proc.stderr else ""
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err
        numbers = [int(x) for x in out.split() if x.isdigit()]
        acked[k] = numbers[-1] if numbers else 0
    assert time.monotonic() - t0 < 60
    assert sum(acked.values()) > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpoolWarning)  # crashes leave torn tails, never damage to warn about
        report = sync(str(spool), tracking_uri, chunk_records=2000)
    client = MlflowClient(tracking_uri)
    run = only_run(client, "kill9")
    by_child: dict[int, list[int]] = {}
    for m in client.get_metric_history(run.info.run_id, "m"):
        assert m.value == float(m.step)
        by_child.setdefault(m.step // 1_000_000, []).append(m.step % 1_000_000)
    total = 0
    for k, ack in acked.items():
        steps = sorted(by_child.get(k, []))
        assert steps == list(range(len(steps))), f"child {k}: holes or duplicates"
        assert len(steps) >= ack - 2, f"child {k}: {len(steps)} stored, {ack - 2} metrics acknowledged"
        total += len(steps)
    assert set(by_child) <= set(acked)
    params = run.data.params
    assert all(params[f"p{k}"] == str(k) for k, ack in acked.items() if ack >= 1)
    spooled = [r for r, _ in SpoolReader(spool, warn=False).records()]
    assert sum(1 for r in spooled if type(r) is Metric) == total  # every spooled metric stored exactly once
    assert report.records == len(spooled)
    # Recovering the last writer's open segment (as the next start would) must not cause re-delivery.
    SpoolWriter(spool, fsync_interval=None).close()
    assert not list((spool / "segments").glob("*.open"))
    assert sync(str(spool), tracking_uri).records == 0


# -- the process exits while the tracking server is down ------------------------------------------------
TRACKER_CHILD = r"""
import sys
from mlflow_er import ExperimentTracker
uri, spool, name = sys.argv[1], sys.argv[2], sys.argv[3]
tracker = ExperimentTracker("down", tracking_uri=uri, sinks=["spool"], sink_options={"spool": {"path": spool}})
with tracker.run(run_name=name) as run:
    print(run.run_id, flush=True)
    for i in range(500):
        run.log_metric("loss", 1.0 / (i + 1), step=i)
    run.log_param("lr", "0.01")
    run.set_tag("state", "last")
    run.flush()
    print("LOGGED", flush=True)
    sys.stdin.readline()  # the parent stops the server, then lets us leave the block (or SIGTERMs us)
"""


@pytest.mark.server
@pytest.mark.timeout(150)
def test_exit_or_sigterm_with_server_down_keeps_segments_and_a_later_sync_delivers(
        tmp_path: Path, restartable_mlflow_server, capsys: pytest.CaptureFixture[str]) -> None:
    server = restartable_mlflow_server
    script = tmp_path / "tracker_child.py"
    script.write_text(TRACKER_CHILD)
    spool = tmp_path / "spool"
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_ids = []
    for how in ("exit", "sigterm"):
        if not server.is_running():
            server.start()
        proc = subprocess.Popen([sys.executable, str(script), server.uri, str(spool), how], cwd=tmp_path, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        run_ids.append(proc.stdout.readline().strip())
        assert proc.stdout.readline().strip() == "LOGGED", proc.communicate(timeout=30)
        server.stop()
        if how == "exit":
            proc.stdin.write("\n")
            proc.stdin.flush()
        else:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        if how == "exit":  # closed at interpreter exit: the last segment is sealed
            assert list((spool / "segments").glob("*.seg")) and not list((spool / "segments").glob("*.open"))
    assert sync_main([str(spool), "--tracking-uri", server.uri, "--retry-deadline", "1", "--no-progress"]) \
        == EXIT_STOPPED
    capsys.readouterr()
    server.start()
    assert sync_main([str(spool), "--tracking-uri", server.uri, "--no-progress"]) == EXIT_OK
    client = MlflowClient(server.uri)
    # A spool-only tracker is offline: its run ids are local; sync created the runs on the
    # server (tagged with the original id) and recorded the mapping.
    exp = client.get_experiment_by_name("down")
    by_source = {r.data.tags.get("mlflow_er.source_run_id"): r.info.run_id
                 for r in client.search_runs([exp.experiment_id])}
    assert set(run_ids) <= set(by_source)
    for source_id in run_ids:
        run_id = by_source[source_id]
        hist = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in hist) == list(range(500))
        assert all(m.value == 1.0 / (m.step + 1) for m in hist)
        data = client.get_run(run_id).data
        assert data.params["lr"] == "0.01" and data.tags["state"] == "last"
    assert sync_main([str(spool), "--tracking-uri", server.uri]) == EXIT_OK
    assert "synced 0 record(s)" in capsys.readouterr().out
