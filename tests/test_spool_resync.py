"""Resynchronising after damage never imports a frame found inside another record's payload.

Tag and param values below carry byte-exact frames (version-1 frames, and version-2 frames
made with another writer's salt) as valid UTF-8, the way a crafted or unlucky value can.
Any single bit flip or truncation of the segment must yield only records that were
written, in order, and report a gap for whatever it could not read.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_er.records import Artifact, Metric, Param, Tag
from mlflow_er.spool import RunInfo, SpoolReader, SpoolWriter

RUN = "0123456789abcdef0123456789abcdef"
OTHER = "ffffffffffffffffffffffffffffffff"
TS = 1_700_000_000_000
NAME = "0000000000001-aaaaaaaaaaaa-000000.seg"


def _ascii_frame(version: int, salt: bytes = b"") -> bytes:
    """A whole frame of a metric for another run, value 2**40, whose bytes after the mark are ASCII."""
    for k in range(100_000):
        key = f"x{k}"
        payload = struct.pack("<BHqqqd", 1, len(OTHER), 5, 100, 7, 2.0**40) + OTHER.encode() + key.encode()
        n = len(payload)
        if version == 1:
            head = struct.pack("<2sII", b"\xa5\x5a", n, zlib.crc32(payload))
        else:
            crc = zlib.crc32(struct.pack("<II", n, 3), zlib.crc32(payload, zlib.crc32(salt)))
            head = struct.pack("<2sIII", b"\xa5\x5a", n, 3, crc)
        frame = head + payload
        if all(b < 0x80 for b in frame[1:]):
            return frame
    raise AssertionError("no ASCII frame found")


def _as_text(frame: bytes) -> str:
    # "\u00a5" is C2 A5 in UTF-8: the frame mark's first byte, made a valid character.
    return "\u00a5" + frame[1:].decode("ascii")


V1_LOOKALIKE = _as_text(_ascii_frame(1))
V2_LOOKALIKE = _as_text(_ascii_frame(2, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
RECORDS = [
    RunInfo(RUN, TS, -1, {"event": "start", "run_name": "r"}),
    *[Metric(RUN, f"m{i % 3}", float(i), TS + i, i, i) for i in range(6)],
    Tag(RUN, "note", "a" + V1_LOOKALIKE + "b", TS, 6),
    Param(RUN, "p", V2_LOOKALIKE, TS, 7),
    Tag(RUN, "both", V1_LOOKALIKE + V2_LOOKALIKE + V1_LOOKALIKE, TS, 8),
    Artifact(RUN, None, "cfg", TS, 9, payload=("json", {"text": V1_LOOKALIKE}), name="c.json"),
    *[Metric(RUN, "m", float(i), TS + i, i, i) for i in range(10, 14)],
    RunInfo(RUN, TS + 99, -1, {"event": "end", "status": "FINISHED"}),
]


def _segment() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        with SpoolWriter(d, fsync_interval=None, experiment_name="e") as w:
            w.append(RECORDS)
        (seg,) = (Path(d) / "segments").glob("*.seg")
        return seg.read_bytes()


SEGMENT = _segment()


def _read(data: bytes, root: Path) -> tuple[list, list]:
    seg_dir = root / "segments"
    seg_dir.mkdir(parents=True, exist_ok=True)
    (seg_dir / NAME).write_bytes(data)
    reader = SpoolReader(root, warn=False)
    return [r for r, _ in reader.records()], reader.gaps


def _check(got: list, gaps: list) -> None:
    it = iter(RECORDS)
    for r in got:  # only records that were written, in write order
        assert any(r == w for w in it), f"a record that was never written came out: {r}"
    if len(got) < len(RECORDS):
        assert gaps, "records went missing without a reported gap"


def test_lookalike_frames_are_really_inside_the_payloads() -> None:
    # The values carry the exact frame bytes: a reader that resynchronised by mark + CRC alone
    # (format version 1) would import them after damage.
    for text in (V1_LOOKALIKE, V2_LOOKALIKE):
        assert text.encode()[1:] in SEGMENT
    got, gaps = _read(SEGMENT, Path(tempfile.mkdtemp()))
    assert got == RECORDS and gaps == []


def test_flipping_the_outer_frames_length_never_imports_the_inner_frame(tmp_path: Path) -> None:
    """The issue's case: one bit of the tag's frame length flipped; a metric of another run appeared."""
    start = SEGMENT.index(V1_LOOKALIKE.encode()) - 1  # inside the "note" tag's payload
    frame_start = SEGMENT.rindex(b"\xa5\x5a", 0, start - 40)
    for bit in range(32):  # every bit of the length field
        bad = bytearray(SEGMENT)
        bad[frame_start + 2 + bit // 8] ^= 1 << (bit % 8)
        got, gaps = _read(bytes(bad), tmp_path / f"b{bit}")
        assert all(getattr(r, "run_id", RUN) == RUN for r in got), bit
        _check(got, gaps)


@settings(max_examples=1200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.tuples(st.just("flip"), st.integers(0, len(SEGMENT) * 8 - 1)),
                 st.tuples(st.just("cut"), st.integers(0, len(SEGMENT) - 1))))
def test_any_single_bit_flip_or_truncation_yields_only_written_records_plus_gaps(change: tuple[str, int]) -> None:
    how, at = change
    bad = bytearray(SEGMENT)
    if how == "flip":
        bad[at // 8] ^= 1 << (at % 8)
    else:
        del bad[at:]
    with tempfile.TemporaryDirectory() as d:
        got, gaps = _read(bytes(bad), Path(d))
    _check(got, gaps)


def _v1_segment(records: list[Metric]) -> bytes:
    """A version-1 segment, byte for byte as mlflow-er wrote them before version 2."""
    import json

    body = json.dumps({"format": 1, "experiment_name": "old", "writer_id": "w"}).encode()
    out = [struct.pack("<8sHHII", b"MLERSPL\x00", 1, 0, len(body), zlib.crc32(body)), body]
    for m in records:
        p = struct.pack("<BHqqqd", 1, len(m.run_id), m.seq, m.timestamp, m.step, m.value) + \
            m.run_id.encode() + m.key.encode()
        out += [struct.pack("<2sII", b"\xa5\x5a", len(p), zlib.crc32(p)), p]
    return b"".join(out)


def test_version_1_segments_are_still_read(tmp_path: Path) -> None:
    records = [Metric(RUN, "m", float(i), TS + i, i, i) for i in range(20)]
    got, gaps = _read(_v1_segment(records), tmp_path)
    assert got == records and gaps == []
