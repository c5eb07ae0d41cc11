"""The spool's on-disk format, version 1: segment header, frames, record payloads.

A spool is a folder (or any fsspec URL) laid out as::

    segments/<writer_id>-<index>.open   the segment a live writer appends to
    segments/<writer_id>-<index>.seg    a sealed segment (fsynced, renamed, never written again)
    artifacts/<id>/<name>               artifact snapshots referenced by ARTIFACT records
    uploaded/...                        local markers: this segment/artifact is at upload_url
    sync/<target>/...                   replay progress and run mapping, per tracking server
    destination.json                    (at an upload_url only) marks the folder as an upload copy

A segment is a header followed by frames (all integers little-endian)::

    header  = "MLERSPL\\0" | version u16 | flags u16 | json_len u32 | crc32(json) u32 | json
    frame   = 0xA5 0x5A | length u32 | crc32(payload) u32 | payload[length]
    payload = kind u8 | run_len u16 | fixed fields      | run_id | rest
      METRIC    1        seq q, timestamp q, step q, value d      | key
      PARAM     2        seq q, timestamp q, key_len u16         | key | value
      TAG       3        seq q, timestamp q, key_len u16         | key | value
      ARTIFACT  4        seq q, timestamp q                       | json
      RUN_INFO  5        seq q, timestamp q                       | json

Why this encoding: a metric is ~35 fixed bytes + ids, packed by one precompiled
``struct`` call and checksummed by one ``zlib.crc32`` call, both C code, so a Python
writer encodes well over 500k records/s with the standard library only (JSON is ~5x
slower and bigger; msgpack would be a new dependency for a smaller win). Every payload
names its run, so a frame lost to corruption never orphans the frames after it. The
rare, open-ended records (artifacts, run info) carry JSON, so they can grow fields
without a format bump. The 2-byte frame mark lets a reader find the next frame after
damage with ``bytes.find`` instead of trying every offset; the CRC then rules out a
false match. A reader skips unknown payload kinds (a newer writer) with a warning and
refuses a segment whose header version it does not know.

The header holds the format version, writer id, segment index, experiment id and name
and the first run: never a tracking URI, so no credential can end up in a spool.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from ..records import Artifact, Metric, Param, Record, Tag

VERSION = 1
MAGIC = b"MLERSPL\x00"
HEADER = struct.Struct("<8sHHII")  # magic, version, flags, json_len, crc
FRAME_MARK = b"\xa5\x5a"
FRAME = struct.Struct("<2sII")  # mark, payload length, crc32(payload)
FRAME_SIZE = FRAME.size
#: Bigger than any valid record (a tag value is at most 8000 chars = 32 kB of UTF-8).
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_HEADER = 64 * 1024

METRIC, PARAM, TAG, ARTIFACT, RUN_INFO = 1, 2, 3, 4, 5
_M = struct.Struct("<BHqqqd")  # kind, run_len, seq, timestamp, step, value
_KV = struct.Struct("<BHqqH")  # kind, run_len, seq, timestamp, key_len
_J = struct.Struct("<BHqq")  # kind, run_len, seq, timestamp

SEGMENTS_DIR = "segments"
ARTIFACTS_DIR = "artifacts"
UPLOADED_DIR = "uploaded"
SYNC_DIR = "sync"
#: Written by the uploader at the root of a destination: marks a folder as an upload copy of a spool.
DESTINATION_FILE = "destination.json"
OPEN_SUFFIX = ".open"
SEALED_SUFFIX = ".seg"


class RunInfo(NamedTuple):
    """Facts about a run itself (name, status, start/end time...) that are not metrics, params or tags.

    Written by :meth:`~mlflow_er.sinks.spool.SpoolSink.start_run`/``end_run`` so an offline
    run can be created and ended in MLflow by ``mlflow-er sync``.
    """

    run_id: str
    timestamp: int
    seq: int
    fields: dict[str, Any]


class FormatError(ValueError):
    """A payload or header that passed its CRC but cannot be decoded."""


SpoolRecord = Record | RunInfo


def segment_name(writer_id: str, index: int) -> str:
    """File stem of segment ``index`` of writer ``writer_id``; sorts in write order."""
    return f"{writer_id}-{index:06d}"


def segment_sort_key(stem: str) -> tuple[str, int]:
    """Order segments: writers by id (they start with their creation time), then by index."""
    writer, _, index = stem.rpartition("-")
    try:
        return writer, int(index)
    except ValueError:
        return stem, 0


# -- header ----------------------------------------------------------------------------------
def encode_header(fields: dict[str, Any]) -> bytes:
    """The segment header for ``fields`` (JSON-able; must not contain credentials)."""
    body = json.dumps({"format": VERSION, **fields}, separators=(",", ":"), sort_keys=True).encode()
    return HEADER.pack(MAGIC, VERSION, 0, len(body), zlib.crc32(body)) + body


def decode_header(buf: bytes | memoryview) -> tuple[dict[str, Any] | None, int, str | None]:
    """``(fields, end_offset, problem)``: fields is ``None`` and problem says why when invalid.

    ``problem`` is ``"short"`` when ``buf`` ends inside a header that looks right so far (a
    torn write), else a description of the damage.
    """
    n = len(buf)
    if n < HEADER.size:
        return None, 0, "short" if bytes(buf[:n]) == MAGIC[:n] else "bad magic"
    magic, version, _flags, length, crc = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        return None, 0, "bad magic"
    if version != VERSION:
        return None, 0, f"unsupported format version {version} (this reader knows {VERSION})"
    if length > MAX_HEADER:
        return None, 0, "header length out of range"
    end = HEADER.size + length
    if end > n:
        return None, 0, "short"
    body = bytes(buf[HEADER.size:end])
    if zlib.crc32(body) != crc:
        return None, 0, "header checksum mismatch"
    try:
        fields = json.loads(body)
    except ValueError as exc:
        return None, 0, f"header is not JSON: {exc}"
    return (fields if isinstance(fields, dict) else {}), end, None


# -- records -> frames -------------------------------------------------------------------------
class Encoder:
    """Encodes records into frames. Caches the UTF-8 of run ids and keys (the same few, logged often).

    Safe to share between threads: the caches only ever gain equal values.
    """

    _CACHE_LIMIT = 100_000

    def __init__(self) -> None:
        self._tails: dict[tuple[str, str], bytes] = {}  # (run_id, key) -> run_id + key bytes
        self._runs: dict[str, bytes] = {}

    def _tail(self, run_id: str, key: str) -> bytes:
        tail = self._tails.get((run_id, key))
        if tail is None:
            if len(self._tails) > self._CACHE_LIMIT:
                self._tails.clear()  # pathological key churn: bound memory, lose only speed
            tail = self._tails[(run_id, key)] = self._run(run_id) + key.encode()
        return tail

    def _run(self, run_id: str) -> bytes:
        rb = self._runs.get(run_id)
        if rb is None:
            if len(self._runs) > self._CACHE_LIMIT:
                self._runs.clear()
            rb = self._runs[run_id] = run_id.encode()
            if len(rb) > 0xFFFF:
                raise FormatError("run id longer than 65535 bytes")
        return rb

    def payload(self, r: SpoolRecord) -> bytes:
        """The payload of one record (no frame)."""
        t = type(r)
        if t is Metric:
            return _M.pack(METRIC, len(self._run(r.run_id)), r.seq, r.timestamp, r.step, r.value) + \
                self._tail(r.run_id, r.key)
        if t is Param or t is Tag:
            key = r.key.encode()
            if len(key) > 0xFFFF:
                raise FormatError("key longer than 65535 bytes")
            rb = self._run(r.run_id)
            return _KV.pack(PARAM if t is Param else TAG, len(rb), r.seq, r.timestamp, len(key)) + rb + key + \
                r.value.encode()
        if t is Artifact:
            return _json_payload(ARTIFACT, self._run(r.run_id), r.seq, r.timestamp, _artifact_fields(r))
        if t is RunInfo:
            return _json_payload(RUN_INFO, self._run(r.run_id), r.seq, r.timestamp, r.fields)
        raise FormatError(f"cannot spool a {t.__name__}")

    def frames(self, records: Sequence[SpoolRecord]) -> bytes:
        """All of ``records`` as consecutive frames, ready for one ``write``."""
        out: list[bytes] = []
        append = out.append
        pack, crc32, mark, m_pack, tail = FRAME.pack, zlib.crc32, FRAME_MARK, _M.pack, self._tail
        runs = self._runs
        for r in records:
            if type(r) is Metric:  # the hot case, inlined
                rb = runs.get(r.run_id) or self._run(r.run_id)
                p = m_pack(METRIC, len(rb), r.seq, r.timestamp, r.step, r.value) + tail(r.run_id, r.key)
            else:
                p = self.payload(r)
            append(pack(mark, len(p), crc32(p)))
            append(p)
        return b"".join(out)


def _json_payload(kind: int, rb: bytes, seq: int, timestamp: int, fields: dict[str, Any]) -> bytes:
    body = json.dumps(fields, separators=(",", ":"), allow_nan=True).encode()
    return _J.pack(kind, len(rb), seq, timestamp) + rb + body


def _artifact_fields(a: Artifact) -> dict[str, Any]:
    fields: dict[str, Any] = {"local_path": a.local_path, "artifact_path": a.artifact_path, "owned": a.owned,
                              "is_dir": a.is_dir, "name": a.name, "size": a.size}
    fingerprint = getattr(a, "fingerprint", None)
    if fingerprint:
        fields["fingerprint"] = [list(f) for f in fingerprint]
    if a.payload is not None:
        kind, content = a.payload
        if kind not in ("text", "json"):
            # Images are arrays: render them (backends.base.materialize) before spooling.
            raise FormatError(f"cannot spool an artifact payload of kind {kind!r}; render it to a file first")
        fields["payload"] = [kind, content]
    return fields


# -- frames -> records -------------------------------------------------------------------------
def decode_payload(p: bytes | memoryview) -> SpoolRecord | None:
    """The record in one payload; ``None`` for a kind this version does not know (a newer writer)."""
    p = bytes(p)
    if not p:
        raise FormatError("empty payload")
    kind = p[0]
    try:
        if kind == METRIC:
            _, rl, seq, ts, step, value = _M.unpack_from(p)
            o = _M.size
            return Metric(p[o:o + rl].decode(), p[o + rl:].decode(), value, ts, step, seq)
        if kind in (PARAM, TAG):
            _, rl, seq, ts, kl = _KV.unpack_from(p)
            o = _KV.size
            if o + rl + kl > len(p):
                raise FormatError("key runs past the payload")
            run_id, key, value = p[o:o + rl].decode(), p[o + rl:o + rl + kl].decode(), p[o + rl + kl:].decode()
            return (Param if kind == PARAM else Tag)(run_id, key, value, ts, seq)
        if kind in (ARTIFACT, RUN_INFO):
            _, rl, seq, ts = _J.unpack_from(p)
            o = _J.size
            run_id, fields = p[o:o + rl].decode(), json.loads(p[o + rl:])
            if not isinstance(fields, dict):
                raise FormatError("JSON payload is not an object")
            if kind == RUN_INFO:
                return RunInfo(run_id, ts, seq, fields)
            payload = fields.get("payload")
            artifact = Artifact(run_id, fields.get("local_path"), fields.get("artifact_path"), ts, seq,
                                bool(fields.get("owned")), bool(fields.get("is_dir")),
                                tuple(payload) if payload else None, fields.get("name"), int(fields.get("size") or 0))
            if fields.get("fingerprint") and "fingerprint" in Artifact._fields:
                artifact = artifact._replace(fingerprint=tuple(tuple(f) for f in fields["fingerprint"]))
            return artifact
    except (struct.error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise FormatError(f"undecodable payload of kind {kind}: {exc}") from exc
    return None


class Frame(NamedTuple):
    """A valid frame found by :func:`scan`: payload bytes and where the frame starts and ends."""

    start: int
    end: int
    payload: memoryview


class Damage(NamedTuple):
    """Bytes :func:`scan` had to skip: ``torn`` when they can be the start of an unfinished frame."""

    start: int
    end: int
    torn: bool


def _valid_at(buf: bytes, i: int, n: int) -> int:
    """End offset of a valid frame starting at ``i``, or -1."""
    if n - i < FRAME_SIZE:
        return -1
    mark, length, crc = FRAME.unpack_from(buf, i)
    end = i + FRAME_SIZE + length
    if mark != FRAME_MARK or length > MAX_PAYLOAD or end > n:
        return -1
    return end if zlib.crc32(memoryview(buf)[i + FRAME_SIZE:end]) == crc else -1


def _looks_torn(buf: bytes, i: int, n: int) -> bool:
    """True when the bytes from ``i`` to the end could be an unfinished frame (a write cut short)."""
    rest = n - i
    if rest < 2:
        return buf[i:n] == FRAME_MARK[:rest]
    if buf[i:i + 2] != FRAME_MARK:
        return False
    if rest < 6:
        return True
    length = int.from_bytes(buf[i + 2:i + 6], "little")
    return length <= MAX_PAYLOAD and i + FRAME_SIZE + length > n


def scan(buf: bytes, start: int) -> Iterator[Frame | Damage]:
    """Walk the frames of ``buf`` from offset ``start``; never raises on any input.

    Yields each valid :class:`Frame`, and a :class:`Damage` for bytes that are not a valid
    frame: after damage the scan resumes at the next offset where a whole valid frame
    starts. Damage that runs to the end of ``buf`` and looks like an unfinished frame is
    ``torn`` (a crash or a live writer mid-write), anything else is corruption.
    """
    n = len(buf)
    i = start
    view = memoryview(buf)
    while i < n:
        end = _valid_at(buf, i, n)
        if end >= 0:
            yield Frame(i, end, view[i + FRAME_SIZE:end])
            i = end
            continue
        j = buf.find(FRAME_MARK, i + 1)
        while j >= 0 and _valid_at(buf, j, n) < 0:
            j = buf.find(FRAME_MARK, j + 1)
        if j < 0:
            yield Damage(i, n, _looks_torn(buf, i, n))
            return
        yield Damage(i, j, False)
        i = j
