"""Segment headers and frames: writing them, and finding the valid ones in damaged bytes.

The byte layout and why it is provably safe to resynchronise are explained in
:mod:`mlflow_er.spool.format`; this module implements it for format versions 1 and 2.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

VERSION = 2
#: Versions this reader decodes. Version 1 (no salt, no frame index) is read as before.
READABLE_VERSIONS = (1, 2)
MAGIC = b"MLERSPL\x00"
#: Version 1 header: magic, version, flags, json_len, crc32(json).
HEADER_V1 = struct.Struct("<8sHHII")
#: Version 2 (and every later version: the promise a reader relies on to tell "newer" from
#: "damaged"): magic, version, flags, salt, json_len, then crc32 of those 24 bytes + json.
HEADER_PREFIX = struct.Struct("<8sHH8sI")
HEADER_CRC = struct.Struct("<I")
HEADER_V2_SIZE = HEADER_PREFIX.size + HEADER_CRC.size
HEADER = HEADER_V1  # kept for callers that size a header read: the v2 header adds 8 bytes, see MAX_HEADER
FRAME_MARK = b"\xa5\x5a"
FRAME_V1 = struct.Struct("<2sII")  # mark, payload length, crc32(payload)
FRAME_V2 = struct.Struct("<2sIII")  # mark, payload length, frame index, crc (see format docstring)
_LEN_INDEX = struct.Struct("<II")
FRAME = FRAME_V2
FRAME_SIZE = FRAME_V2.size
#: Bigger than any valid record (a tag value is at most 8000 chars = 32 kB of UTF-8).
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_HEADER = 64 * 1024


class FormatError(ValueError):
    """A payload or header that passed its CRC but cannot be decoded."""


class Header(NamedTuple):
    """What :func:`parse_header` found at the start of a segment.

    ``fields`` is ``None`` when the header is unusable; ``problem`` then says why (``"short"``:
    a header cut short, as a live writer's or a torn one). ``unsupported`` is set when the
    header is intact (its checksum matches) but written by a newer format version: such a
    segment must not be read at all. ``framing`` is how to read the frames after it — for
    a damaged header, the best guess (its frames only validate if the guess is right).
    """

    fields: dict[str, Any] | None
    end: int
    problem: str | None
    version: int | None
    framing: Framing | None
    unsupported: bool = False


class Framing:
    """How the frames of one segment are laid out and checked (per format version and writer salt)."""

    __slots__ = ("version", "salt", "size", "_salt_crc")

    def __init__(self, version: int, salt: bytes = b""):
        self.version = version
        self.salt = salt
        self.size = FRAME_V1.size if version == 1 else FRAME_V2.size
        self._salt_crc = zlib.crc32(salt)

    def payload_crc(self, payload: bytes | memoryview) -> int:
        """The part of a v2 frame checksum that depends only on the payload (computed outside any lock)."""
        return zlib.crc32(payload, self._salt_crc)

    def frame(self, payload: bytes, payload_crc: int, index: int) -> bytes:
        """The v2 frame header for ``payload`` at ``index`` (``payload_crc`` from :meth:`payload_crc`)."""
        n = len(payload)
        return FRAME_V2.pack(FRAME_MARK, n, index, zlib.crc32(_LEN_INDEX.pack(n, index), payload_crc))

    def valid_at(self, buf: bytes, view: memoryview, i: int, n: int) -> tuple[int, int]:
        """``(end, index)`` of a valid frame starting at ``i``, or ``(-1, -1)``. Never raises."""
        if n - i < self.size:
            return -1, -1
        if self.version == 1:
            mark, length, crc = FRAME_V1.unpack_from(buf, i)
            end = i + self.size + length
            if mark != FRAME_MARK or length > MAX_PAYLOAD or end > n:
                return -1, -1
            return (end, -1) if zlib.crc32(view[i + self.size:end]) == crc else (-1, -1)
        mark, length, index, crc = FRAME_V2.unpack_from(buf, i)
        end = i + self.size + length
        if mark != FRAME_MARK or length > MAX_PAYLOAD or end > n:
            return -1, -1
        if zlib.crc32(view[i + 2:i + 10], zlib.crc32(view[i + self.size:end], self._salt_crc)) != crc:
            return -1, -1
        return end, index

    def looks_torn(self, buf: bytes, i: int, n: int) -> bool:
        """True when the bytes from ``i`` to the end could be an unfinished frame (a write cut short)."""
        rest = n - i
        if rest < 2:
            return buf[i:n] == FRAME_MARK[:rest]
        if buf[i:i + 2] != FRAME_MARK:
            return False
        if rest < 6:
            return True
        length = int.from_bytes(buf[i + 2:i + 6], "little")
        return length <= MAX_PAYLOAD and i + self.size + length > n


V1_FRAMING = Framing(1)


def new_salt() -> bytes:
    """A writer's random salt: frames of one writer validate only with it."""
    return os.urandom(8)


def encode_header(fields: dict[str, Any], salt: bytes) -> bytes:
    """The v2 segment header for ``fields`` (JSON-able; must not contain credentials)."""
    body = json.dumps({"format": VERSION, **fields}, separators=(",", ":"), sort_keys=True).encode()
    prefix = HEADER_PREFIX.pack(MAGIC, VERSION, 0, salt, len(body))
    return prefix + HEADER_CRC.pack(zlib.crc32(body, zlib.crc32(prefix))) + body


def _json_fields(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        fields = json.loads(body)
    except ValueError as exc:
        return None, f"header is not JSON: {exc}"
    return (fields if isinstance(fields, dict) else {}), None


def parse_header(buf: bytes | memoryview) -> Header:
    """Decode the header at the start of ``buf`` (any version); never raises."""
    n = len(buf)
    if n < HEADER_V1.size:
        short = bytes(buf[:n]) == MAGIC[:n]
        return Header(None, 0, "short" if short else "bad magic", None, None)
    magic, version, _flags = struct.unpack_from("<8sHH", buf, 0)
    if magic != MAGIC:
        # Guess the framing from the version field: reading v2 frames by v1 rules would accept
        # unsalted look-alikes inside payloads. A wrong guess finds nothing, which is reported.
        if version == 1:
            return Header(None, 0, "bad magic", None, V1_FRAMING)
        if n < HEADER_V2_SIZE:
            return Header(None, 0, "bad magic", None, None)
        return Header(None, HEADER_V2_SIZE, "bad magic", None, Framing(2, bytes(buf[12:20])))
    if version == 1:
        _, _, _, length, crc = HEADER_V1.unpack_from(buf, 0)
        end = HEADER_V1.size + length
        if length > MAX_HEADER:
            return Header(None, HEADER_V1.size, "header length out of range", 1, V1_FRAMING)
        if end > n:
            return Header(None, 0, "short", 1, V1_FRAMING)
        body = bytes(buf[HEADER_V1.size:end])
        if zlib.crc32(body) != crc:
            return Header(None, HEADER_V1.size, "header checksum mismatch", 1, V1_FRAMING)
        fields, problem = _json_fields(body)
        return Header(fields, end, problem, 1, V1_FRAMING)
    # Version 2 and later share the prefix; the checksum covers every field, version included.
    if n < HEADER_V2_SIZE:
        return Header(None, 0, "short", version, None)
    _, _, _, salt, length = HEADER_PREFIX.unpack_from(buf, 0)
    (crc,) = HEADER_CRC.unpack_from(buf, HEADER_PREFIX.size)
    end = HEADER_V2_SIZE + length
    # A damaged header still tells where its frames may be: they only validate with the right salt.
    guess = Framing(2, salt)
    if length > MAX_HEADER:
        return Header(None, HEADER_V2_SIZE, "header length out of range", version, guess)
    if end > n:
        return Header(None, 0, "short", version, guess)
    body = bytes(buf[HEADER_V2_SIZE:end])
    if zlib.crc32(body, zlib.crc32(bytes(buf[:HEADER_PREFIX.size]))) != crc:
        return Header(None, HEADER_V2_SIZE, "header checksum mismatch", version, guess)
    if version not in READABLE_VERSIONS:
        fields, _ = _json_fields(body)
        return Header(fields, end, f"format version {version} is newer than this mlflow-er reads "
                                   f"({', '.join(map(str, READABLE_VERSIONS))})", version, None, unsupported=True)
    fields, problem = _json_fields(body)
    return Header(fields, end, problem, version, guess)


def decode_header(buf: bytes | memoryview) -> tuple[dict[str, Any] | None, int, str | None]:
    """``(fields, end_offset, problem)`` of a segment header; fields is ``None`` when invalid."""
    h = parse_header(buf)
    if h.unsupported:
        return None, 0, h.problem
    return (h.fields if h.problem is None else None), (h.end if h.problem is None else 0), h.problem


class Frame(NamedTuple):
    """A valid frame found by :func:`scan`: payload bytes, where the frame starts and ends, its index
    (``number``; ``-1`` in v1 segments)."""

    start: int
    end: int
    payload: memoryview
    number: int = -1


class Damage(NamedTuple):
    """Bytes :func:`scan` had to skip: ``torn`` when they can be the start of an unfinished frame.

    ``lost`` is how many frames are known missing there (v2: from the frame indexes around
    it; ``-1`` when unknown, e.g. at the end of a segment or in a v1 segment).
    """

    start: int
    end: int
    torn: bool
    lost: int = -1


def scan(buf: bytes, start: int, framing: Framing | None = None, last_index: int = -1) -> Iterator[Frame | Damage]:
    """Walk the frames of ``buf`` from offset ``start``; never raises on any input.

    ``framing`` defaults to what the header at the start of ``buf`` says. Yields each valid
    :class:`Frame` and a :class:`Damage` for bytes that are not one. After damage the scan
    resumes at the next offset where a whole valid frame starts; in a v2 segment that frame
    must also continue the frame index (higher than ``last_index``, the last one accepted),
    so a frame copied into a payload can never be taken for a real one. Damage that runs
    to the end of ``buf`` and looks like an unfinished frame is ``torn``.
    """
    if framing is None:
        framing = parse_header(buf).framing or V1_FRAMING
    n = len(buf)
    i = start
    view = memoryview(buf)
    valid_at = framing.valid_at
    v2 = framing.version >= 2
    while i < n:
        end, index = valid_at(buf, view, i, n)
        if end >= 0 and (not v2 or index > last_index):
            if v2 and index != last_index + 1 and last_index >= 0:
                yield Damage(i, i, False, index - last_index - 1)  # frames missing without a byte skipped
            yield Frame(i, end, view[i + framing.size:end], index)
            last_index = index
            i = end
            continue
        j = buf.find(FRAME_MARK, i + 1)
        while j >= 0:
            end, index = valid_at(buf, view, j, n)
            if end >= 0 and (not v2 or index > last_index):
                break
            j = buf.find(FRAME_MARK, j + 1)
        if j < 0:
            yield Damage(i, n, framing.looks_torn(buf, i, n))
            return
        yield Damage(i, j, False, (index - last_index - 1) if v2 else -1)
        # The frame at j is yielded by the next turn of the loop, without a second gap.
        if v2:
            last_index = index - 1
        i = j
