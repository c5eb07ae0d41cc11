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

from .. import artifacts
from ..records import MAX_METRICS_PER_BATCH, Record

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
        self._pos = None
        self.appended = 0
        self.read = 0

    def pending(self) -> int:
        """Records spilled and not yet read back."""
        return self.appended - self.read

    def append(self, record: Record) -> None:
        """Write one record (called with the backend's lock held, so order is call order)."""
        self._writer.append([record])
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
            out.append(record)  # type: ignore[arg-type]
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


class Spilling:
    """Spill half of the threaded backend (a mixin: it shares the backend's lock and queue state)."""

    def _spill_locked(self, record: Record) -> None:
        """Append to the spill (lock held). Once spilling, every record goes there until it is drained."""
        if self._spill is None:
            self._spill = Spill(self.spill_path)
        if not self._spilling:
            self._spilling = True
            self._limit = 0  # route the hot path here too, so call order holds
            log.warning("mlflow-er: buffer full; spilling to %s until the writer catches up", self._spill.path)
        self._spill.append(record)
        self._spilled += 1
        self._wake.set()

    def _finish_spill(self) -> None:
        """Close the spill; records left in it stay on disk for ``mlflow-er sync`` (counted)."""
        with self._lock:
            if self._spill is None:
                return
            self._spill_kept += self._spill.pending()
            self._spill.close()  # keeps the folder, and says so, if records are left
            self._spill, self._spilling, self._limit = None, False, self.max_queue

    def _spill_pending(self) -> int:
        return self._spill.pending() if self._spill is not None else 0

    def _drain_spill(self, upto: int | None = None) -> None:
        """Deliver the next chunk of spilled records; stop spilling once it is empty."""
        assert self._spill is not None
        recs = self._spill.take(20 * MAX_METRICS_PER_BATCH, upto)
        self._inflight = len(recs)
        try:
            self._deliver(recs)
        finally:
            self._inflight = 0
        with self._lock:
            if self._spilling and not self._spill.pending():
                self._spilling = False
                self._limit = self.max_queue
                if self._waiters:
                    self._not_full.notify_all()
