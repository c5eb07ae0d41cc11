"""Issue 10 items 4, 7, 10, 15, 20: what ``mlflow-er sync``/``status`` refuse, skip, or get past — each exit code."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import FaultServer, Reply, free_port

from mlflow_er.records import Artifact, Metric
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool import SpoolWriter
from mlflow_er.spool.cli import (
    EXIT_FAILED,
    EXIT_NOT_A_SPOOL,
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    status_main,
    sync_main,
)
from mlflow_er.spool.errors import SpoolPermissionError

RUN = "0123456789abcdef0123456789abcdef"
TS = 1_700_000_000_000


def metrics(n: int, start: int = 0) -> list[Metric]:
    return [Metric(RUN, "m", float(i), TS + i, i, i) for i in range(start, start + n)]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- item 20: not a spool ---------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["missing", "typo", "unrelated"])
def test_sync_and_status_of_a_path_that_is_not_a_spool_fail_and_create_nothing(
        tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str], what: str) -> None:
    SpoolSink(tmp_path / "mlflow-er-spool").close()
    target = {"missing": tmp_path / "nowhere", "typo": tmp_path / "mlflow-er-spoll",
              "unrelated": tmp_path / "project"}[what]
    if what == "unrelated":
        target.mkdir()
        (target / "train.py").write_text("print('hi')")
    before = tree(tmp_path)
    assert sync_main([str(target), "--tracking-uri", tracking_uri]) == EXIT_NOT_A_SPOOL
    err = capsys.readouterr().err
    assert str(target) in err and ("does not exist" in err or "is not an mlflow-er spool" in err)
    assert status_main([str(target)]) == EXIT_NOT_A_SPOOL
    assert str(target) in capsys.readouterr().err
    assert tree(tmp_path) == before  # no sync/ state, no folder, no database


# -- item 4: a newer format version -------------------------------------------------------------------------
def _as_version(seg: Path, version: int) -> None:
    data = bytearray(seg.read_bytes())
    struct.pack_into("<H", data, 8, version)
    length = struct.unpack_from("<I", data, 20)[0]
    struct.pack_into("<I", data, 24, zlib.crc32(bytes(data[28:28 + length]), zlib.crc32(bytes(data[:24]))))
    seg.write_bytes(bytes(data))


def test_a_segment_of_a_newer_format_is_refused_and_nothing_lands(tmp_path: Path, tracking_uri: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    spool = tmp_path / "spool"
    with SpoolWriter(spool, fsync_interval=None, experiment_name="fine") as w:
        w.append(metrics(10))
    with SpoolWriter(spool, fsync_interval=None, experiment_name="newer") as w:
        w.append(metrics(10, 10))
    newer = sorted((spool / "segments").glob("*.seg"))[-1]
    _as_version(newer, 7)
    assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--no-progress"]) == EXIT_UNSUPPORTED
    err = capsys.readouterr().err
    assert newer.stem in err and "format version 7" in err and "upgrade mlflow-er" in err
    client = MlflowClient(tracking_uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]  # not even the good segment
    assert client.search_runs(["0"]) == []
    assert not (spool / "sync").exists()
    assert status_main([str(spool)]) == EXIT_UNSUPPORTED
    out = capsys.readouterr().out
    assert "unsupported (format v7)" in out and "upgrade mlflow-er" in out
    # A flipped bit in the version is damage, not a newer version: the header checksum covers it.
    data = bytearray(newer.read_bytes())
    data[8] ^= 0x04
    newer.write_bytes(bytes(data))
    assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--no-progress", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 20 and any("bad-header" in g for g in report["gaps"])


# -- item 7: nothing outside the spool's artifacts folder ------------------------------------------------------
def test_sync_reads_nothing_outside_the_spools_artifact_folder(tmp_path: Path, tracking_uri: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the syncing host's own file")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key").write_text("private")
    spool = tmp_path / "spool"
    sink = SpoolSink(spool, experiment_name="art")
    good = tmp_path / "good.txt"
    good.write_text("fine")
    sink.write_artifact(Artifact(RUN, str(good), None, TS, 0))
    snap = next((spool / "artifacts").iterdir())
    os.symlink(secret, spool / "artifacts" / "link.txt")
    (spool / "artifacts" / "dir1").mkdir()
    os.symlink(tmp_path / "secrets", spool / "artifacts" / "dir1" / "inner")
    crafted = [str(secret), "../secret.txt", "artifacts/../../secret.txt", "artifacts/link.txt", "artifacts/dir1",
               f"artifacts/{snap.name}/../../../secret.txt"]
    sink.writer.append([Artifact(RUN, p, None, TS, k + 1, is_dir=p.endswith("dir1"), name=f"a{k}")
                        for k, p in enumerate(crafted)])
    sink.close()
    assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--no-progress", "--json"]) == EXIT_FAILED
    report = json.loads(capsys.readouterr().out)
    assert report["artifacts"] == 1 and len(report["failed"]) == len(crafted)
    assert all("skipped" in f for f in report["failed"])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("art").experiment_id])
    stored = [f.path for f in client.list_artifacts(run.info.run_id)]
    assert stored == ["good.txt"]


# -- item 10: private files whatever the umask; foreign or open folders refused -------------------------------
UMASK0 = r"""
import os, sys
os.umask(0)
root = sys.argv[1]
from mlflow_er.records import Artifact, Batch, Metric
from mlflow_er.spool import SpoolReader, SpoolWriter
from mlflow_er.spool.upload import Uploader
from mlflow_er.spool.cli import sync_main
RUN = "0123456789abcdef0123456789abcdef"
w = SpoolWriter(os.path.join(root, "deep", "er", "spool"), fsync_interval=None, experiment_name="u")
w.append([Metric(RUN, "m", float(i), 1, i, i) for i in range(10)])
w.rotate()
w.append([Metric(RUN, "m", 1.0, 1, 99, 99)])
w.close()
spool = os.path.join(root, "deep", "er", "spool")
Uploader(spool, os.path.join(root, "up", "copy")).upload_pending()
reader = SpoolReader(spool)
pos = [p for _, p in reader.records()][-1]
reader.consume(pos)
sys.exit(sync_main([spool, "--tracking-uri", sys.argv[2], "--no-progress"]))
"""


@pytest.mark.timeout(150)
def test_spool_files_are_0600_and_folders_0700_with_umask_0(tmp_path: Path, tracking_uri: str) -> None:
    script = tmp_path / "umask0.py"
    script.write_text(UMASK0)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "w"), tracking_uri], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    spool = tmp_path / "w" / "deep" / "er" / "spool"
    assert (spool / "sync").is_dir() and (spool / "uploaded").is_dir()  # sync state and upload markers exist
    bad = []
    for root in (tmp_path / "w",):
        for p in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            if p.is_dir() and mode != 0o700 or p.is_file() and mode != 0o600:
                bad.append(f"{p.relative_to(tmp_path)} {oct(mode)}")
    assert bad == []


def test_a_too_open_or_foreign_spool_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o700)
    open_dir.chmod(0o755)
    with pytest.raises(SpoolPermissionError, match=r"open to other users \(mode 0o755.*chmod 700"):
        SpoolWriter(open_dir, fsync_interval=None)
    assert list(open_dir.iterdir()) == []  # nothing written into it
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
    else:  # pragma: no cover - a non-root run cannot make another user's folder
        me = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: me + 1)
    with pytest.raises(SpoolPermissionError, match="belongs to .* not to you .*a folder of your own"):
        SpoolWriter(theirs, fsync_interval=None)


# -- item 15: a record the store keeps refusing ------------------------------------------------------------------
def test_a_record_the_store_keeps_refusing_is_reported_and_the_rest_delivered(
        tmp_path: Path, fault_server: FaultServer, capsys: pytest.CaptureFixture[str]) -> None:
    spool = tmp_path / "spool"
    with SpoolWriter(spool, fsync_interval=None, experiment_name="poison") as w:
        w.append([Metric(RUN, "bad", 666.0, TS, 0, 0)] + metrics(500, 1))

    def refuse_the_poison(req) -> Reply | None:
        body = req.body if isinstance(req.body, dict) else {}
        if req.path.endswith("runs/log-batch") and any(m.get("value") == 666.0 for m in body.get("metrics", [])):
            return Reply(status=500, body={"error_code": "INTERNAL_ERROR", "message": "boom"}, forward=False)
        return None

    fault_server.responder = refuse_the_poison
    argv = [str(spool), "--tracking-uri", fault_server.uri, "--retry-deadline", "1", "--no-progress", "--json",
            "--chunk", "200"]
    assert sync_main(argv) == EXIT_FAILED
    report = json.loads(capsys.readouterr().out)
    assert len(report["failed"]) == 1 and "'bad'" in report["failed"][0] and "INTERNAL_ERROR" in report["failed"][0]
    delivered = [m["step"] for r in fault_server.requests_to("runs/log-batch") if r.status == 200
                 for m in r.body.get("metrics", [])]
    assert sorted(delivered) == list(range(1, 501))  # every record behind it, once
    n = len(fault_server.requests)
    assert sync_main(argv) == EXIT_OK  # progress moved past it: the next sync does not stop there again
    assert not [r for r in fault_server.requests[n:] if r.path.endswith("runs/log-batch")]


# -- the other exit codes -----------------------------------------------------------------------------------------
def test_exit_codes_usage_and_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    with SpoolWriter(spool, fsync_interval=None, experiment_name="x") as w:
        w.append(metrics(3))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exc:
        sync_main([str(spool)])
    assert exc.value.code == EXIT_USAGE and "--tracking-uri is required" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert sync_main([str(spool), "--tracking-uri", dead, "--retry-deadline", "0.5", "--no-progress"]) == EXIT_STOPPED
    assert "progress saved; run it again" in capsys.readouterr().err
