"""Reading a spool back, in order, from a local folder or any fsspec URL.

The reader never raises on the content of a segment: it stops cleanly at a torn tail
(a crash mid-write, or a live writer mid-append), resynchronises after a damaged frame
at the next valid one, and reports every skipped byte range as a :class:`Gap` (segment,
offset, bytes skipped, why) — with a :class:`SpoolWarning` unless the damage is the
expected torn tail of a segment still open.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from .format import (
    HEADER,
    MAX_HEADER,
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    SEGMENTS_DIR,
    Damage,
    FormatError,
    Frame,
    Header,
    SpoolRecord,
    decode_payload,
    is_end,
    parse_header,
    scan,
    segment_sort_key,
)

CURSOR_FILE = "consumed.json"


class SpoolWarning(UserWarning):
    """Damage found in a spool: the records in the reported gap could not be read."""


@dataclass(frozen=True)
class Gap:
    """Bytes of a segment that held no readable record."""

    segment: str
    offset: int
    length: int
    reason: str  # "torn-tail", "corrupt", "bad-header", "undecodable", "unknown-kind", "unsupported-version"
    lost: int = -1  # records known lost here (from the frame indexes); -1: unknown

    def __str__(self) -> str:
        lost = f", {self.lost} record(s) lost" if self.lost > 0 else ""
        return f"{self.segment} @ {self.offset}: {self.reason}, {self.length} bytes skipped{lost}"


class Position(NamedTuple):
    """Just after one record: its segment, the byte offset where the next frame starts, records so far.

    ``index`` is the record's frame index (v2 segments; ``-1`` unknown): a reader resuming
    here accepts only frames that continue it. (A named tuple: one is made per record read, and
    a frozen dataclass cost the delivery process ~1 µs each.)
    """

    segment: str
    offset: int
    count: int  # type: ignore[assignment]  # a field, not tuple.count: the name is the spool's
    index: int = -1  # type: ignore[assignment]


@dataclass(frozen=True)
class Segment:
    """A segment file of a spool. ``name`` is the stem (``<writer_id>-<index>``), stable across sealing."""

    name: str
    path: str
    sealed: bool
    size: int

    @property
    def writer_id(self) -> str:
        return self.name.rpartition("-")[0]


def open_fs(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(filesystem, root path)`` for a spool URL or local path (fsspec imported here, lazily)."""
    from fsspec.core import url_to_fs

    return url_to_fs(os.fspath(url), **(storage_options or {}))


def is_local(fs: Any) -> bool:
    """True for fsspec's local filesystem (where open segments, locks and renames are real)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def list_segments(fs: Any, root: str) -> list[Segment]:
    """Every segment under ``root``, sealed and open, in write order."""
    base = f"{root.rstrip('/')}/{SEGMENTS_DIR}"
    try:
        entries = fs.ls(base, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: dict[str, Segment] = {}
    for e in entries:
        path = e["name"]
        fname = path.rsplit("/", 1)[-1]
        if fname.startswith("."):
            continue  # a segment being created, or an upload's temporary name
        for suffix, sealed in ((SEALED_SUFFIX, True), (OPEN_SUFFIX, False)):
            if fname.endswith(suffix) and e.get("type", "file") == "file":
                stem = fname[: -len(suffix)]
                if sealed or stem not in found:  # sealed wins if a rename raced the listing
                    found[stem] = Segment(stem, path, sealed, int(e.get("size") or 0))
    return sorted(found.values(), key=lambda s: segment_sort_key(s.name))


class SpoolReader:
    """Reads the records of a spool in write order, reporting damage as :attr:`gaps`.

    ``SpoolReader(path).records()`` yields ``(record, Position)`` pairs, starting after the
    consumed cursor (see :meth:`consume`) or after an explicit ``after`` position.
    ``warn=False`` silences :class:`SpoolWarning` (gaps are still collected).
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 warn: bool = True):
        self.url = os.fspath(url)
        self.fs, self.root = open_fs(self.url, storage_options)
        self.warn = warn
        self.gaps: list[Gap] = []
        self.unknown = 0  # records of kinds this version does not know (skipped)
        #: Bytes at the end of open segments that are not a whole frame yet (live writer or unrecovered crash).
        self.open_tails: dict[str, int] = {}
        #: Segments written by a newer format version (name -> version): never read, see :meth:`header_info`.
        self.unsupported: dict[str, int] = {}
        self._headers: dict[str, Header] = {}
        self._seen_gaps: set[tuple[str, int]] = set()

    def segments(self) -> list[Segment]:
        """The spool's segments (sealed and open), oldest first."""
        return list_segments(self.fs, self.root)

    # -- reading ---------------------------------------------------------------------------
    def _read(self, seg: Segment, start: int, limit: int = -1) -> tuple[bytes, Segment]:
        candidates = [seg]
        if not seg.sealed:  # it may have been sealed (renamed) since it was listed
            candidates.append(Segment(seg.name, seg.path[: -len(OPEN_SUFFIX)] + SEALED_SUFFIX, True, seg.size))
        for candidate in candidates:
            try:
                with self.fs.open(candidate.path, "rb") as f:
                    if start:
                        f.seek(start)
                    return f.read(limit), candidate
            except FileNotFoundError:
                continue
        return b"", seg

    def header_info(self, seg: Segment) -> Header:
        """The segment's parsed header (read once); damage is reported as a gap, a newer version in
        :attr:`unsupported`."""
        if seg.name not in self._headers:
            data, seg = self._read(seg, 0, HEADER.size + 8 + MAX_HEADER)  # not the whole segment
            self._note_header(seg, parse_header(data), bool(data))
        return self._headers[seg.name]

    def header(self, seg: Segment) -> dict[str, Any] | None:
        """The segment's header fields, or ``None`` if it is damaged (reported as a gap)."""
        h = self.header_info(seg)
        return h.fields if h.problem is None else None

    def _note_header(self, seg: Segment, h: Header, nonempty: bool) -> None:
        if seg.name in self._headers:
            return
        self._headers[seg.name] = h
        if h.unsupported:
            self.unsupported[seg.name] = int(h.version or 0)
            self._gap(seg, 0, seg.size, f"unsupported-version ({h.problem}: upgrade mlflow-er to read it)", warn=True)
        elif h.problem is not None and (nonempty or seg.sealed) and not (h.problem == "short" and not seg.sealed):
            self._gap(seg, 0, 0, f"bad-header ({h.problem})", warn=True)

    def _gap(self, seg: Segment, offset: int, length: int, reason: str, warn: bool, lost: int = -1) -> None:
        if (seg.name, offset) in self._seen_gaps:
            return  # re-reading a segment must not report (or warn about) the same damage twice
        self._seen_gaps.add((seg.name, offset))
        gap = Gap(seg.name, offset, length, reason, lost)
        self.gaps.append(gap)
        if warn and self.warn:
            warnings.warn(f"mlflow-er spool: {gap}", SpoolWarning, stacklevel=4)

    def iter_segment(self, seg: Segment, start: Position | None = None) -> Iterator[tuple[SpoolRecord, Position]]:
        """Records of one segment, after ``start`` (a position in this segment) or from its beginning.

        A segment of a newer format version yields nothing (see :attr:`unsupported`).
        """
        base = start.offset if start is not None else 0
        count = start.count if start is not None else 0
        data, seg = self._read(seg, base)
        if start is None:
            h = parse_header(data)
            self._note_header(seg, h, bool(data))
            offset0 = h.end
        else:
            h = self.header_info(seg)
            offset0 = 0
        if h.unsupported:
            return
        if h.framing is None:  # a header cut short: a writer that has not written one whole yet
            return
        ended = False
        for item in scan(data, offset0, h.framing, start.index if start is not None else -1):
            if type(item) is not Frame:  # one type test per frame: this loop runs once per record
                assert isinstance(item, Damage)
                if item.torn and not seg.sealed:
                    self.open_tails[seg.name] = item.end - item.start
                    continue  # a live writer mid-append (or a crash not yet recovered): not damage yet
                reason = "torn-tail" if item.torn else ("corrupt" if item.end > item.start else "missing-frames")
                self._gap(seg, base + item.start, item.end - item.start, reason, warn=True, lost=item.lost)
                continue
            if is_end(item.payload):
                ended = True
                continue
            try:
                record = decode_payload(item.payload)
            except FormatError as exc:
                self._gap(seg, base + item.start, item.end - item.start, f"undecodable ({exc})", warn=True)
                continue
            count += 1
            if record is None:
                self.unknown += 1
                self._gap(seg, base + item.start, item.end - item.start, "unknown-kind", warn=True)
                continue
            yield record, Position(seg.name, base + item.end, count, item.number)
        if seg.sealed and h.framing.version >= 2 and not ended and not any(
                g.segment == seg.name and g.reason == "torn-tail" for g in self.gaps):
            self._gap(seg, base + len(data), 0, "truncated (its END frame is missing)", warn=True)

    def records(self, after: Position | None = None) -> Iterator[tuple[SpoolRecord, Position]]:
        """Every record after ``after`` (default: after the consumed cursor), in write order."""
        start = after if after is not None else self.cursor()
        for seg in self.segments():
            if start is not None:
                order = segment_sort_key(seg.name), segment_sort_key(start.segment)
                if order[0] < order[1]:
                    continue
                if seg.name == start.segment:
                    yield from self.iter_segment(seg, start)
                    continue
            yield from self.iter_segment(seg)

    # -- consuming (spill drain) ---------------------------------------------------------------
    def _cursor_path(self) -> str:
        return f"{self.root.rstrip('/')}/{CURSOR_FILE}"

    def cursor(self) -> Position | None:
        """The last position passed to :meth:`consume` (persisted in the spool), if any."""
        try:
            raw = json.loads(self.fs.cat_file(self._cursor_path()))
            return Position(str(raw["segment"]), int(raw["offset"]), int(raw["count"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def consume(self, position: Position) -> list[str]:
        """Mark every record up to ``position`` consumed; delete sealed segments fully consumed.

        The cursor is saved atomically in the spool folder, so a restarted reader resumes
        after it. Returns the names of the segments deleted.
        """
        from .upload import write_atomic

        write_atomic(self.fs, self._cursor_path(), json.dumps(position._asdict()).encode())
        deleted = []
        limit = segment_sort_key(position.segment)
        for seg in self.segments():
            key = segment_sort_key(seg.name)
            if key > limit:
                break
            if not seg.sealed:
                continue
            if key < limit or position.offset >= seg.size:
                try:
                    self.fs.rm(seg.path)
                except FileNotFoundError:
                    pass
                deleted.append(seg.name)
        return deleted
