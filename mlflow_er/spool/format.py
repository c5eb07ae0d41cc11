"""The spool's on-disk format, version 2: segment header, frames, record payloads.

A spool is a folder (or any fsspec URL) laid out as::

    segments/<writer_id>-<index>.open   the segment a live writer appends to
    segments/<writer_id>-<index>.seg    a sealed segment (fsynced, renamed, never written again)
    artifacts/<id>/<name>               artifact snapshots referenced by ARTIFACT records
    uploaded/...                        local markers: this segment/artifact is at upload_url
    sync/<target>/...                   replay progress, run mapping and the sync lease, per tracking server
    destination.json                    (at an upload_url only) marks the folder as an upload copy

A segment is a header followed by frames (all integers little-endian)::

    header  = "MLERSPL\\0" | version u16 | flags u16 | salt 8 | json_len u32 | crc u32 | json
              crc = crc32(the 24 bytes before it + json): every header field, the version too
    frame   = 0xA5 0x5A | length u32 | index u32 | crc u32 | payload[length]
              crc = crc32(salt + payload + length + index)
    payload = kind u8 | run_len u16 | fixed fields      | run_id | rest
      METRIC    1        seq q, timestamp q, step q, value d      | key
      PARAM     2        seq q, timestamp q, key_len u16         | key | value
      TAG       3        seq q, timestamp q, key_len u16         | key | value
      ARTIFACT  4        seq q, timestamp q                       | json
      RUN_INFO  5        seq q, timestamp q                       | json
      END       6        frames u32      (the last frame of every sealed v2 segment)

Why a resync can never import a frame found inside another record's payload: after
damage the reader searches for the next frame mark and accepts a candidate only if (1)
its checksum matches *with this writer's salt* — 8 random bytes drawn when the writer
starts, stored only in the segment headers — and (2) its frame index (0, 1, 2... per
segment) is higher than the last frame accepted. A byte sequence inside a param or tag
value that looks like a frame was written by the user's code, which never sees the salt:
it fails (1) except by a 2^-32 accident. A real frame of the same segment copied into a
payload, or a block duplicated by a filesystem, fails (2). The index also tells how many
frames a gap lost. A sealed segment ends with an END frame, so a segment
cut exactly at a frame boundary is reported as truncated instead of looking complete.
A single flipped bit cannot turn damaged bytes into a valid frame
(CRC32 detects every 1- and 2-bit error), so any single bit flip or truncation yields
only records that were written, plus reported gaps (a hypothesis test checks it).

Why this encoding: a metric is ~35 fixed bytes + ids, packed by one precompiled
``struct`` call and checksummed by ``zlib.crc32`` (C code), so a Python writer encodes
well over 500k records/s with the standard library only (JSON is ~5x slower and bigger;
msgpack would be a new dependency for a smaller win). The payload's checksum is computed
outside the writer's lock; only the 8 bytes of length and index are added under it.
Every payload names its run, so a frame lost to corruption never orphans the frames
after it. The rare, open-ended records (artifacts, run info) carry JSON, so they can
grow fields without a format bump. A reader skips unknown payload kinds (a newer writer)
with a warning.

Versions: every version from 2 on starts with the same 28-byte prefix, so a reader can
tell a *newer* segment (intact checksum, unknown version: refused as a whole, "upgrade
mlflow-er"; ``mlflow-er sync`` then syncs nothing) from a *damaged* one (checksum
mismatch: reported as a gap; its frames are still found if the salt survived, since they
only validate with it). Version 1 segments (no salt, no index, checksum over the JSON
only) are still read, with version 1's weaker resynchronisation.

The header holds the format version, writer id, segment index, experiment id and name
and the first run: never a tracking URI, so no credential can end up in a spool.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..records import Artifact, Metric, Param, Record, Tag
from .framing import (  # noqa: F401 - re-exported: the format's public names live here
    _LEN_INDEX,
    FRAME,
    FRAME_MARK,
    FRAME_SIZE,
    FRAME_V2,
    HEADER,
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    READABLE_VERSIONS,
    VERSION,
    Damage,
    FormatError,
    Frame,
    Framing,
    Header,
    decode_header,
    encode_header,
    new_salt,
    parse_header,
    scan,
)

METRIC, PARAM, TAG, ARTIFACT, RUN_INFO = 1, 2, 3, 4, 5
#: Closes a sealed segment: its absence at the end of a sealed v2 segment means it was cut short.
END = 6
_END = struct.Struct("<BI")  # kind, frames before it


def end_frame(framing: Framing, index: int) -> bytes:
    """The END frame that seals a segment holding ``index`` frames."""
    p = _END.pack(END, index)
    return framing.frame(p, framing.payload_crc(p), index) + p


def is_end(payload: bytes | memoryview) -> bool:
    """True for the payload of an END frame."""
    return len(payload) == _END.size and payload[0] == END
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
        if isinstance(r, Metric):
            return _M.pack(METRIC, len(self._run(r.run_id)), r.seq, r.timestamp, r.step, r.value) + \
                self._tail(r.run_id, r.key)
        if isinstance(r, (Param, Tag)):
            key = r.key.encode()
            if len(key) > 0xFFFF:
                raise FormatError("key longer than 65535 bytes")
            rb = self._run(r.run_id)
            return _KV.pack(PARAM if t is Param else TAG, len(rb), r.seq, r.timestamp, len(key)) + rb + key + \
                r.value.encode()
        if isinstance(r, Artifact):
            return _json_payload(ARTIFACT, self._run(r.run_id), r.seq, r.timestamp, _artifact_fields(r))
        if isinstance(r, RunInfo):
            return _json_payload(RUN_INFO, self._run(r.run_id), r.seq, r.timestamp, r.fields)
        raise FormatError(f"cannot spool a {t.__name__}")

    def encode(self, records: Sequence[SpoolRecord], framing: Framing) -> Encoded:
        """Payloads and their salted checksums: the CPU-heavy part, done before taking the writer's lock."""
        payloads: list[bytes] = []
        crcs: list[int] = []
        add_p, add_c = payloads.append, crcs.append
        m_pack, tail, pcrc = _M.pack, self._tail, framing.payload_crc
        runs = self._runs
        for r in records:
            if type(r) is Metric:  # the hot case, inlined
                rb = runs.get(r.run_id) or self._run(r.run_id)
                p = m_pack(METRIC, len(rb), r.seq, r.timestamp, r.step, r.value) + \
                    tail(r.run_id, r.key)  # type: ignore[union-attr]  # type() is the fast test
            else:
                p = self.payload(r)
            add_p(p)
            add_c(pcrc(p))
        return Encoded(payloads, crcs, sum(map(len, payloads)) + framing.size * len(payloads))


class Encoded(NamedTuple):
    """Records encoded by :meth:`Encoder.encode`, waiting for their frame indexes."""

    payloads: list[bytes]
    crcs: list[int]
    size: int  # bytes once framed

    def frames(self, framing: Framing, first_index: int) -> bytes:
        """The frames, numbered from ``first_index``, ready for one ``write``."""
        # framing.frame() inlined: this runs under the writer's lock, once per record.
        pack, li_pack, crc32, mark = FRAME_V2.pack, _LEN_INDEX.pack, zlib.crc32, FRAME_MARK
        out: list[bytes] = []
        append = out.append
        index = first_index
        for p, c in zip(self.payloads, self.crcs, strict=True):
            n = len(p)
            append(pack(mark, n, index, crc32(li_pack(n, index), c)))
            append(p)
            index += 1
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


