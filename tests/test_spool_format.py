"""Spool format, writer and reader: round trips, durability counters, torn tails, corruption, disk full."""

from __future__ import annotations

import errno
import math
import os
import random
import stat
import time
import warnings
from pathlib import Path

import pytest

from mlflow_er.errors import MlflowErError, SinkError
from mlflow_er.hookspecs import SinkContext
from mlflow_er.records import Artifact, Metric, Param, Tag
from mlflow_er.spool import (
    RunInfo,
    SpoolDiskFull,
    SpoolReader,
    SpoolWarning,
    SpoolWriteError,
    SpoolWriter,
)
from mlflow_er.spool.format import FRAME_SIZE, Encoder, decode_header, decode_payload, scan

pytestmark = pytest.mark.timeout(60)

RUN = "0123456789abcdef0123456789abcdef"
TS = 1_700_000_000_000


def metrics(n: int, start: int = 0, run: str = RUN) -> list[Metric]:
    return [Metric(run, f"m/{i % 3}", float(i), TS + i, i, i) for i in range(start, start + n)]


def read_all(path: Path, **kw) -> tuple[list, SpoolReader]:
    reader = SpoolReader(path, **kw)
    return [r for r, _ in reader.records()], reader


def sealed_segment(tmp_path: Path, records: list) -> Path:
    with SpoolWriter(tmp_path / "src", fsync_interval=None, experiment_name="e") as w:
        w.append(records)
    (seg,) = (tmp_path / "src" / "segments").glob("*.seg")
    return seg


def frame_offsets(data: bytes) -> list[tuple[int, int]]:
    _, start, _ = decode_header(data)
    return [(f.start, f.end) for f in scan(data, start)]


def put_segment(root: Path, data: bytes, name: str = "0000000000001-aaaaaaaaaaaa-000000.seg") -> Path:
    (root / "segments").mkdir(parents=True, exist_ok=True)
    for d in (root, root / "segments"):
        d.chmod(0o700)  # made by hand: a writer refuses a spool folder open to other users
    p = root / "segments" / name
    p.write_bytes(data)
    return p


# -- round trips ---------------------------------------------------------------------------------
def test_every_record_kind_round_trips(tmp_path: Path) -> None:
    records = [
        Metric(RUN, "loss", 0.25, TS, 3, 0),
        Metric(RUN, "nan", math.nan, TS, -1, 1),
        Metric(RUN, "inf", -math.inf, TS, 2**63 - 1, 2),
        Param(RUN, "lr", "1e-3", TS, 3),
        Param(RUN, "ünïcødé/κλειδί", "värde ✓" * 700, TS, 4),
        Tag(RUN, "phase", "", TS, 5),
        Tag("other-run", "mlflow.note.content", "x" * 8000, TS + 1, 0),
        Artifact(RUN, "/abs/model.pt", "models", TS, 6, owned=True, is_dir=False, name=None, size=12),
        Artifact(RUN, None, "cfg", TS, 7, payload=("json", {"a": [1, 2]}), name="c.json"),
        Artifact(RUN, "/staging/big.bin", None, TS, 8, owned=True, size=9, fingerprint=(("", 11, 9, 123),)),
        RunInfo(RUN, TS, -1, {"status": "FINISHED", "end_time": TS + 9}),
    ]
    with SpoolWriter(tmp_path, fsync_interval=None) as w:
        w.append(records)
        assert w.appended == len(records)
    got, reader = read_all(tmp_path)
    assert reader.gaps == []
    assert math.isnan(got[1].value)
    got[1] = got[1]._replace(value=0.0)
    expected = list(records)
    expected[1] = expected[1]._replace(value=0.0)
    expected[8] = expected[8]._replace(payload=("json", {"a": [1, 2]}))
    assert got == expected
    assert [type(r) for r in got] == [type(r) for r in records]


def test_unspoolable_artifact_payload_writes_nothing(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, fsync_interval=None)
    with pytest.raises(ValueError, match="render"):
        w.append([Metric(RUN, "a", 1.0, TS, 0, 0), Artifact(RUN, None, None, TS, 1, payload=("image", object()))])
    assert w.appended == 0
    w.close()
    assert read_all(tmp_path)[0] == []


def test_header_names_writer_experiment_run_and_never_credentials(tmp_path: Path) -> None:
    from mlflow_er.sinks.spool import SpoolSink

    ctx = SinkContext("http://alice:s3cr3t-pw@127.0.0.1:5000", "7", "exp-name", {"path": str(tmp_path)})
    sink = SpoolSink.from_context(ctx)
    sink.write_batch(__import__("mlflow_er").Batch.of(RUN, metrics(3)))
    sink.close()
    (seg,) = (tmp_path / "segments").glob("*.seg")
    data = seg.read_bytes()
    header, _, problem = decode_header(data)
    assert problem is None
    assert header["format"] == 2 and header["experiment_id"] == "7" and header["experiment_name"] == "exp-name"
    assert header["run_id"] == RUN and header["writer_id"] == sink.writer.writer_id
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"s3cr3t" not in path.read_bytes() and b"alice" not in path.read_bytes()
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


# -- durability counters, rotation -----------------------------------------------------------------
def test_acknowledged_only_after_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = SpoolWriter(tmp_path, fsync_interval=None)
    w.append(metrics(10))
    assert (w.appended, w.acknowledged) == (10, 0)
    w.flush()
    assert w.acknowledged == 10
    w.close()

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    g = SpoolWriter(tmp_path / "g", fsync_interval=0.002)
    for i in range(20):
        g.append(metrics(100, start=i * 100))
    deadline = time.monotonic() + 5
    while g.acknowledged < 2000 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert g.acknowledged == 2000
    assert 1 <= len(synced) < 20  # group commit: fewer fsyncs than appends
    g.close()


def test_rotation_by_size_and_age(tmp_path: Path) -> None:
    sealed = []
    w = SpoolWriter(tmp_path, fsync_interval=None, segment_bytes=2000, segment_age=0.2, on_seal=sealed.append)
    for i in range(10):
        w.append(metrics(20, start=i * 20))
    assert len(sealed) >= 5 and all(p.suffix == ".seg" for p in sealed)
    w.append(metrics(1, start=1000))
    deadline = time.monotonic() + 5
    n = len(sealed)
    while len(sealed) == n and time.monotonic() < deadline:  # sealed by age, with no new append
        time.sleep(0.05)
    assert len(sealed) == n + 1 and w.current_segment is None and w.acknowledged == w.appended
    w.close()
    got, reader = read_all(tmp_path)
    assert got == metrics(200) + metrics(1, start=1000) and reader.gaps == []


# -- torn tails and corruption --------------------------------------------------------------------------
def test_cut_at_every_byte_of_last_record(tmp_path: Path) -> None:
    records = metrics(5) + [Tag(RUN, "t", "last-value", TS, 99)]
    data = sealed_segment(tmp_path, records).read_bytes()
    (last_start, last_end), (end_start, end_end) = frame_offsets(data)[-2:]  # the last record, the END frame
    assert end_end == len(data) and end_start == last_end
    for cut in range(last_start, last_end):
        root = tmp_path / f"cut{cut}"
        put_segment(root, data[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, reader = read_all(root)
        assert got == records[:-1], cut
        (gap,) = reader.gaps
        if cut == last_start:  # cut at a frame boundary: the missing END frame tells it was cut
            assert (gap.offset, gap.length, gap.reason) == (cut, 0, "truncated (its END frame is missing)")
        else:
            assert (gap.offset, gap.length, gap.reason) == (last_start, cut - last_start, "torn-tail")
        assert all(issubclass(c.category, SpoolWarning) for c in caught) and caught
        # The same file left open by a dead writer: recovery cuts the tail and seals it, silently.
        open_root = tmp_path / f"open{cut}"
        put_segment(open_root, data[:cut], "0000000000001-bbbbbbbbbbbb-000000.open")
        SpoolWriter(open_root, fsync_interval=None).close()
        (sealed,) = (open_root / "segments").glob("*.seg")
        assert sealed.stat().st_size == last_start + (end_end - end_start)  # cut, then an END frame added
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, reader = read_all(open_root)
        assert got == records[:-1] and reader.gaps == []


def test_flipped_bit_mid_file_loses_only_that_record(tmp_path: Path) -> None:
    records = metrics(30)
    data = sealed_segment(tmp_path, records).read_bytes()
    frames = frame_offsets(data)
    k = 15
    start, end = frames[k]
    rng = random.Random(4)
    picks = {start, start + 1, start + 2, start + 5, start + 6, start + 9, *rng.sample(range(start, end), 8)}
    for byte in sorted(picks):
        bad = bytearray(data)
        bad[byte] ^= 1 << rng.randrange(8)
        root = tmp_path / f"flip{byte}"
        put_segment(root, bytes(bad))
        with pytest.warns(SpoolWarning, match="corrupt"):
            got, reader = read_all(root)
        assert got == records[:k] + records[k + 1:], byte
        (gap,) = reader.gaps
        assert (gap.segment, gap.offset, gap.length, gap.reason) == (
            "0000000000001-aaaaaaaaaaaa-000000", start, end - start, "corrupt")
        assert "bytes skipped" in str(gap)


def test_damaged_header_still_yields_records(tmp_path: Path) -> None:
    records = metrics(4)
    data = bytearray(sealed_segment(tmp_path, records).read_bytes())
    data[20] ^= 0xFF
    put_segment(tmp_path / "h", bytes(data))
    with pytest.warns(SpoolWarning, match="bad-header"):
        got, reader = read_all(tmp_path / "h")
    assert got == records


def test_garbage_never_raises(tmp_path: Path) -> None:
    records = metrics(40) + [Param(RUN, "p", "v", TS, 50), Tag(RUN, "t", "w", TS, 51)]
    data = sealed_segment(tmp_path, records).read_bytes()
    rng = random.Random(1234)
    enc = Encoder()
    valid = {enc.payload(r) for r in records}
    for i in range(300):
        bad = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            if not bad:
                break  # truncated to nothing
            op = rng.randrange(4)
            pos = rng.randrange(len(bad))
            if op == 0:
                bad[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                del bad[pos:pos + rng.randrange(1, 40)]
            elif op == 2:
                bad[pos:pos] = rng.randbytes(rng.randrange(1, 40))
            else:
                bad = bad[:pos]
        if i % 50 == 0:
            bad = bytearray(rng.randbytes(rng.randrange(0, 4000)))
        for item in scan(bytes(bad), 0):  # the bare scanner, too
            if hasattr(item, "payload"):
                try:
                    decode_payload(item.payload)
                except ValueError:
                    pass
        put_segment(tmp_path / f"g{i}", bytes(bad))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, _ = read_all(tmp_path / f"g{i}")
        assert all(enc.payload(r) in valid for r in got)  # only real records come out


# -- failures -----------------------------------------------------------------------------------------
def _failing_write(real_write, fd_of, err: int, calls: list):
    def fake(fd, data):
        if fd != fd_of():
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])  # half a batch lands on disk...
        raise OSError(err, os.strerror(err))  # ...then the disk is full
    return fake


@pytest.mark.parametrize("err, cls", [(errno.ENOSPC, SpoolDiskFull), (errno.EIO, SpoolWriteError)])
def test_disk_full_raises_specific_error_and_leaves_no_half_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   err: int, cls: type) -> None:
    w = SpoolWriter(tmp_path, fsync_interval=None)
    w.append(metrics(10))
    w.flush()
    seg = w.current_segment
    size = seg.stat().st_size
    calls: list[int] = []
    monkeypatch.setattr(os, "write", _failing_write(os.write, lambda: w._fd, err, calls))
    with pytest.raises(cls) as info:
        w.append(metrics(50, start=10))
    assert len(calls) == 2
    assert isinstance(info.value, MlflowErError) and isinstance(info.value, SinkError)
    assert info.value.errno == err and not info.value.transient
    assert (err == errno.ENOSPC) == isinstance(info.value, SpoolDiskFull)
    assert seg.stat().st_size == size and w.appended == 10
    monkeypatch.undo()
    w.append(metrics(5, start=60))  # space is back: the writer goes on
    w.close()
    got, reader = read_all(tmp_path)
    assert got == metrics(10) + metrics(5, start=60) and reader.gaps == []


def test_fsync_failure_stops_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = SpoolWriter(tmp_path, fsync_interval=None)
    w.append(metrics(3))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(SpoolWriteError, match="fsync"):
        w.flush()
    assert w.acknowledged == 0
    with pytest.raises(SpoolWriteError):
        w.append(metrics(1))
    monkeypatch.undo()
    with pytest.raises(SpoolWriteError):
        w.close()


# -- recovery and the drain API (for spill) ---------------------------------------------------------------
def test_live_writer_segment_is_not_recovered(tmp_path: Path) -> None:
    a = SpoolWriter(tmp_path, fsync_interval=None)
    a.append(metrics(3))
    b = SpoolWriter(tmp_path, fsync_interval=None)
    assert b.recovered == [] and a.current_segment.exists()
    a.append(metrics(2, start=3))
    a.close()
    b.close()
    assert read_all(tmp_path)[0] == metrics(5)


def test_reader_drains_while_writer_appends_and_consumes(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, fsync_interval=None, segment_bytes=1500, role="spill")
    reader = SpoolReader(tmp_path)
    got, pos = [], None
    for i in range(12):
        w.append(metrics(10, start=i * 10))
        for rec, at in reader.records(after=pos):
            got.append(rec)
            pos = at
    assert got == metrics(120)
    sealed_before = len(list((tmp_path / "segments").glob("*.seg")))
    assert sealed_before >= 3
    deleted = reader.consume(pos)
    assert len(deleted) == sealed_before  # every sealed segment was fully read; the open one stays
    w.append(metrics(5, start=120))
    again = SpoolReader(tmp_path)  # a restarted drainer resumes after the saved cursor
    assert [r for r, _ in again.records()] == metrics(5, start=120)
    w.close()
    cur = again.cursor()
    assert cur is not None and cur.count > 0
    assert FRAME_SIZE == 14
