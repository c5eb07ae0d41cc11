"""Overflow of the threaded backend on local disk (``on_full="spill"``), read back in order.

While the in-memory buffer is full, the caller appends each record to a spool segment
(the spool's own format: framed, CRC-checked, one ``write(2)`` per record, no fsync: it
protects memory, not against a crash) and the writer thread reads them back, in order,
once it has emptied memory. Nothing is dropped and memory stays bounded. Spill segments
are valid spool segments, so whatever is left at exit can be replayed with
``mlflow-er sync SPILL_DIR --tracking-uri ...``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import artifacts
from ..records import MAX_METRICS_PER_BATCH, Record, RunEnd, RunStart
from ..spool.format import RunInfo

log = logging.getLogger(__name__)


class Spill:
    """One backend's spill folder: :meth:`append` from callers, :meth:`take` from the writer."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path else Path(tempfile.mkdtemp(prefix=f"spill-{os.getpid()}-",
                                                                  dir=artifacts.staging_root()))
        from ..spool import SpoolReader, SpoolWriter

        # No group commit thread and no age-based rotation: spilled records only need to
        # be readable, and segments are rotated by size so drained ones can be deleted.
        self._writer = SpoolWriter(self.path, role="spill", fsync_interval=None, segment_age=None,
                                   segment_bytes=8 * 1024 * 1024)
        self._reader = SpoolReader(self.path, warn=True)
        self._pos: Any = None
        self.appended = 0
        self.read = 0

    def pending(self) -> int:
        """Records spilled and not yet read back."""
        return self.appended - self.read

    def append(self, record: Record) -> None:
        """Write one record (called with the backend's lock held, so order is call order)."""
        self._writer.append([_to_spool(record)])
        self.appended += 1

    def take(self, limit: int, upto: int | None = None) -> list[Record]:
        """Read back up to ``limit`` records, never past the ``upto``-th record spilled."""
        if upto is not None:
            limit = min(limit, upto - self.read)
        out: list[Record] = []
        if limit <= 0:
            return out
        pos = None
        for record, where in self._reader.records(after=self._pos):
            out.append(_from_spool(record))
            pos = where
            if len(out) >= limit:
                break
        if pos is not None:
            self._pos = pos
            self.read += len(out)
            if not self.pending():
                self._writer.rotate()  # seal, so consume() can delete every drained segment
                self._reader.consume(pos)
        return out

    def close(self) -> None:
        """Seal the last segment; remove the folder if everything was read back."""
        self._writer.close()
        if not self.pending():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            log.error("mlflow-er: %d spilled record(s) were not delivered; they are kept in %s "
                      "(replay them with `mlflow-er sync %s --tracking-uri URI`)", self.pending(), self.path,
                      self.path)


def _to_spool(item: Any) -> Any:
    """A run's start/end as the spool's own run record (the format has no other way to say it)."""
    if type(item) is RunStart:
        fields = {"event": "start", "run_name": item.run_name, "parent_run_id": item.parent_run_id,
                  "description": item.description, "tags": item.tags or {}}
        return RunInfo(item.run_id, item.timestamp, item.seq, {k: v for k, v in fields.items() if v is not None})
    if type(item) is RunEnd:
        return RunInfo(item.run_id, item.timestamp, item.seq, {"event": "end", "status": item.status})
    return item


def _from_spool(rec: Any) -> Any:
    # Called once per record by the delivery process: imports stay at module level (a function-level
    # import costs ~1 µs a call, a third of this function in py-spy).
    if type(rec) is not RunInfo:
        return rec
    f = rec.fields
    if f.get("event") == "end":
        return RunEnd(rec.run_id, rec.timestamp, rec.seq, f.get("status", "FINISHED"))
    return RunStart(rec.run_id, rec.timestamp, rec.seq, f.get("run_name"), f.get("parent_run_id"),
                    f.get("description"), f.get("tags"))


class Overflow:
    """The threaded backend's ``on_full="spill"`` state: a :class:`Spill` while the buffer is full.

    Callers append (with the backend's lock held, so order is call order); the writer thread
    reads back. Composed into the backend, not mixed in: it owns its own fields.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = path
        self.spill: Spill | None = None
        self.active = False  # once spilling, every record goes to disk until it is drained
        self.spilled = 0
        self.kept = 0  # spilled records left on disk at close, for `mlflow-er sync`

    def append(self, record: Record) -> bool:
        """Spill one record (lock held). True when this starts a spilling episode."""
        if self.spill is None:
            self.spill = Spill(self.path)
        started = not self.active
        if started:
            self.active = True
            log.warning("mlflow-er: buffer full; spilling to %s until the writer catches up", self.spill.path)
        self.spill.append(record)
        self.spilled += 1
        return started

    def pending(self) -> int:
        return self.spill.pending() if self.spill is not None else 0

    def appended(self) -> int:
        return self.spill.appended if self.spill is not None else 0

    def read(self) -> int:
        return self.spill.read if self.spill is not None else 0

    def take(self, upto: int | None = None) -> list[Record]:
        """The next chunk of spilled records (writer thread)."""
        return self.spill.take(20 * MAX_METRICS_PER_BATCH, upto) if self.spill is not None else []

    def drained(self) -> bool:
        """True (and spilling stops) once everything spilled was read back (lock held)."""
        if self.active and not self.pending():
            self.active = False
            return True
        return False

    def finish(self) -> None:
        """Close the spill; records left in it stay on disk for ``mlflow-er sync`` (counted, lock held)."""
        if self.spill is None:
            return
        self.kept += self.spill.pending()
        self.spill.close()  # keeps the folder, and says so, if records are left
        self.spill, self.active = None, False
