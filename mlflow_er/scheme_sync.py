"""``spool+``: records the mlflow lane delivered live count as synced into the inner URI.

The spool sink writes every record first; the mlflow lane then sends the same records to the
store. Without this, ``mlflow-er status`` says "synced: never" and ``mlflow-er sync`` re-sends
everything. :class:`LiveSync` writes, per segment of *this process's* spool writer, the sync
progress file that :mod:`mlflow_er.spool.replay` already reads for the target URI
(``sync/<target_key(inner)>/progress/<segment>.json``: offset, record count, ``done``), so a
later sync starts where live delivery stopped, and ``status`` counts those records as synced.

A marker only ever claims what is safe: a position in the spool is marked after a flush that
*began after* every record up to it was submitted returned with nothing unsent and no
transient failure (records the store refused for good are, as in a sync, passed). After a
transient failure that outlived the retries, marking stops for good: a later sync re-sends from
the last marker, which MLflow absorbs (metric rows dedupe, equal params are accepted, tags end
at the same last value).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between two markers written for ordinary flushes (reads flush often).
INTERVAL = 1.0

Snapshot = tuple[list[Path], Path | None, int]  # sealed segments, open segment, its size


class LiveSync:
    """Sync-progress markers for one ``spool+`` route (see the module docstring).

    ``submits`` is the route's submit counter: the route calls ``next()`` on it after every
    submit, and this class calls it around a flush to learn whether anything was submitted
    meanwhile (``itertools.count`` is atomic under the GIL: no lock on the logging path).
    """

    def __init__(self, sink: Any, tracking_uri: str, submits: itertools.count):
        from .sinks.mlflow import _redact
        from .spool.format import SYNC_DIR
        from .spool.reader import SpoolReader
        from .spool.replay import target_key

        self.writer = sink.writer
        self.root = Path(sink.path)
        self.state = self.root / SYNC_DIR / target_key(tracking_uri)
        self.redacted = _redact(tracking_uri)
        self.reader = SpoolReader(str(self.root), warn=False)
        self.submits = submits
        self.frozen = False
        self.candidate: tuple[int, Snapshot] | None = None
        self.positions: dict[str, tuple[int, int, bool]] = {}  # segment -> (offset, count, done) marked
        self.lock = threading.Lock()
        self.last = 0.0

    # -- the route's hooks ---------------------------------------------------------------------
    def begin(self) -> int:
        """Before a flush: the submit counter now."""
        return next(self.submits)

    def flushed(self, token: int, clean: bool, final: bool = False) -> None:
        """After a flush that began at ``token``; ``clean``: nothing unsent, no transient failure.

        Markers are written at most every :data:`INTERVAL` seconds (reads flush often), and
        always for a ``final`` flush (a run's end, the close).
        """
        if self.frozen or not clean:
            return
        now = time.monotonic()
        if not final and now - self.last < INTERVAL:
            return
        if not self.lock.acquire(blocking=final):
            return  # another thread is marking; the next flush catches up
        try:
            self.last = now
            self._flushed(token)
        finally:
            self.lock.release()

    def _flushed(self, token: int) -> None:
        try:
            if self.candidate is not None and self.candidate[0] < token:
                self._mark(self.candidate[1])  # everything in it was submitted before this flush began
                self.candidate = None
            snap = self._snapshot()
            after = next(self.submits)
            if after == token + 1:
                self._mark(snap)  # nothing submitted while flushing: the snapshot is all delivered
            else:
                self.candidate = (after, snap)
        except Exception as exc:  # progress is an optimisation: a later sync re-sends, never loses
            log.warning("mlflow-er spool+: could not record live delivery as synced: %s", exc)
            self.frozen = True

    def freeze(self, why: str) -> None:
        """A record was not delivered live (and may never be): a later sync must re-send from here."""
        if not self.frozen:
            log.info("mlflow-er spool+: %s; `mlflow-er sync` will re-send from the last live position", why)
        self.frozen = True

    def closed(self) -> None:
        """After the backend closed cleanly: every segment of this writer is delivered."""
        if not self.frozen:
            self.flushed(next(self.submits), True, final=True)

    # -- markers -------------------------------------------------------------------------------
    def _snapshot(self) -> Snapshot:
        current = self.writer.current_segment
        sealed = self.writer.sealed
        size = 0
        if current is not None:
            try:
                size = current.stat().st_size
            except FileNotFoundError:  # sealed meanwhile: it is in the next snapshot's list
                current = None
        return sealed, current, size

    def _mark(self, snap: Snapshot) -> None:
        sealed, current, size = snap
        for path in sealed:
            self._mark_segment(path, path.stat().st_size, True)
        if current is not None:
            self._mark_segment(current, size, False)  # the reader also finds it if sealed since

    def _mark_segment(self, path: Path, upto: int, done: bool) -> None:
        from .spool.reader import Position, Segment

        name = path.stem  # "<writer id>-<index>", the same open or sealed
        offset, count, was_done = self.positions.get(name) or self._saved(name)
        if was_done or (offset >= upto and not done):
            return
        seg = Segment(name, str(path), done, upto)
        end = (offset, count)
        for _, pos in self.reader.iter_segment(seg, Position(name, offset, count) if offset else None):
            if pos.offset > upto:
                break  # written after the snapshot: not known to be delivered
            end = (pos.offset, pos.count)
        if end[0] <= offset and not done:
            return
        self._write(name, end[0], end[1], done, upto)
        self.positions[name] = (end[0], end[1], done)

    def _saved(self, name: str) -> tuple[int, int, bool]:
        try:
            prog = json.loads((self.state / "progress" / f"{name}.json").read_bytes())
            return int(prog.get("offset", 0)), int(prog.get("count", 0)), bool(prog.get("done"))
        except (FileNotFoundError, ValueError, AttributeError):
            return 0, 0, False

    def _write(self, name: str, offset: int, count: int, done: bool, size: int) -> None:
        from .spool.reader import open_fs
        from .spool.upload import write_atomic

        fs, _ = open_fs(str(self.root))
        target = self.state / "target.json"
        if not target.exists():
            write_atomic(fs, str(target), json.dumps({"tracking_uri": self.redacted}).encode())
        data = {"segment": name, "offset": offset, "count": count, "done": done, "size": size, "gaps": [],
                "failed": [], "live": True}
        write_atomic(fs, str(self.state / "progress" / f"{name}.json"), json.dumps(data).encode())
