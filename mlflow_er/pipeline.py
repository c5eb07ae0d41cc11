"""The Pipeline: the only object that touches sinks.

A backend moves records; the pipeline delivers them. It holds one
:class:`~mlflow_er.lanes.Lane` per sink, each with its own position in the ordered stream,
its own retries and its own failures, so a sink that is down or slow never delays another:

* **durable sinks first** (``Sink.durable``, the spool): written on the delivering thread the
  moment a chunk arrives, acknowledged by their own group fsync, whatever the others do;
* **every other sink** follows the stream from its own worker thread (``deliver``), or inline
  on the caller's thread (``deliver_now``, the ``sync`` backend);
* artifacts are rendered and verified once (:class:`~mlflow_er.staging.ArtifactStage`) and
  their snapshots discarded when the last lane has them;
* run start and end are items of the same stream, so "end the run" means "deliver everything
  up to and including its end";
* sinks built by name are opened, closed and rebuilt (after ``fork()``) here;
* what cannot be delivered in time is never dropped silently: :meth:`Pipeline.keep_unsent`
  puts it on disk in spool format and says which ``mlflow-er sync`` command replays it
  (:mod:`mlflow_er.unsent`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .delivery import RetryPolicy
from .errors import DeliveryError, FailedRecord
from .lanes import Lane, LaneWorker
from .named_sinks import build as build  # re-exported: its home before named_sinks
from .named_sinks import close_sinks
from .records import Artifact, RunEnd, RunStart, StreamItem
from .sinks.base import Sink, handles_artifacts
from .staging import ArtifactStage
from .unsent import Keeper, flush_for_close

log = logging.getLogger(__name__)

_LIFECYCLE = (RunStart, RunEnd)
#: Records a non-durable lane may fall behind before the delivering thread waits for it.
DEFAULT_MAX_BACKLOG = 200_000


class Pipeline:
    """Deliver an ordered stream of records to sinks (see the module docstring).

    :param sinks: the sinks, in any order (durable ones are served first).
    :param policy: retry policy of every lane.
    :param rebuild: for each sink built by name, how to build it again (after ``fork()``);
        the pipeline closes those sinks in :meth:`close`; sinks without one belong to the caller.
    :param max_backlog: records a lane may fall behind before :meth:`deliver` waits.
    :param tracking_uri: shown in the ``mlflow-er sync`` command for records kept on disk.
    """

    def __init__(self, sinks: Sequence[Sink], *, policy: RetryPolicy | None = None,
                 rebuild: Sequence[Callable[[], Sink] | None] | None = None,
                 max_backlog: int = DEFAULT_MAX_BACKLOG, tracking_uri: str | None = None,
                 keep_dir: str | os.PathLike[str] | None = None):
        if not sinks:
            raise ValueError("a pipeline needs at least one sink")
        self.policy = policy or RetryPolicy()
        self.max_backlog = max_backlog
        self.tracking_uri = tracking_uri
        self.keeper = Keeper(tracking_uri, keep_dir)
        self._rebuild = list(rebuild) if rebuild is not None else [None] * len(sinks)
        self._sinks = list(sinks)
        #: ``(name, SinkContext)`` of each sink built by name (``None`` for instances), so another
        #: process (the ``process`` backend's delivery process) can build the same pipeline.
        self.specs: list[tuple[str, Any] | None] = [None] * len(sinks)
        self._init_state()

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()  # set when a close gave up: retries stop at once
        self.stage = ArtifactStage()
        order = sorted(range(len(self._sinks)), key=lambda i: not getattr(self._sinks[i], "durable", False))
        self.lanes = [Lane(self._sinks[i], self.policy, self.stage, self._report, self._stop,
                           durable=bool(getattr(self._sinks[i], "durable", False))) for i in order]
        self._followers = [lane for lane in self.lanes if not lane.durable]
        self._workers: list[LaneWorker] = []
        self._chunks: deque[Sequence[StreamItem]] = deque()
        self._offsets: deque[int] = deque()  # records in the stream before each held chunk
        self._base = 0  # stream index of _chunks[0]
        self._end = 0  # chunks handed in so far
        self._total = 0  # records handed in so far
        self._failures: list[FailedRecord] = []
        self.kept = 0  # records put on disk because a close ran out of time (replay: mlflow-er sync)
        self.lost = 0  # records that could not even be kept on disk (counted, and logged as an error)
        self.late_failures = 0  # failures after giving up: already counted in `kept`
        self._closed = False
        self._kept_end = 0  # chunks below this were already put on disk by keep_unsent

    @property
    def sinks(self) -> list[Sink]:
        """The sinks, durable ones first."""
        return [lane.sink for lane in self.lanes]

    # -- handing records in ----------------------------------------------------------------------
    @property
    def keep_dir(self) -> Any:
        """Where unsent records are kept (now ``keeper.keep_dir``; this name kept for 0.2 callers)."""
        return self.keeper.keep_dir

    def deliver_now(self, items: Sequence[StreamItem]) -> None:
        """Deliver ``items`` to every sink on this thread; raise :class:`DeliveryError` for what failed."""
        self._check_fork()
        self._register_artifacts(items)
        for lane in self.lanes:
            lane.process(items, inline_artifacts=True)
            lane.pos += 1
        failed = self.take_failures()
        if failed:
            raise DeliveryError(failed)

    def deliver(self, items: Sequence[StreamItem]) -> None:
        """Hand ``items`` (in order) to the lanes and return; durable sinks have them when this returns.

        Waits (in bounded steps) only while a lane is more than ``max_backlog`` records behind.
        """
        if not items:
            return
        if self._stop.is_set() or self._closed:  # given up, or closed: straight to disk, counted
            self.keep_unsent(items)
            return
        self._check_fork()
        self._register_artifacts(items)
        for lane in self.lanes:
            if lane.durable:
                lane.process(items)
                lane.pos += 1
        if not self._followers:
            return
        self._ensure_workers()
        data = sum(1 for it in items if type(it) not in _LIFECYCLE)  # counts are of records, not markers
        with self._cond:
            self._chunks.append(items)
            self._offsets.append(self._total)
            self._end += 1
            self._total += data
            self._cond.notify_all()
            while self._behind() > self.max_backlog and not self._stop.is_set() and self._workers_alive():
                self._cond.wait(0.5)

    def _register_artifacts(self, items: Sequence[StreamItem]) -> None:
        users = None
        for item in items:
            if type(item) is Artifact:
                if users is None:
                    users = sum(1 for lane in self.lanes if handles_artifacts(lane.sink))
                self.stage.register(item, users)

    def _ensure_workers(self) -> None:
        if len(self._workers) == len(self._followers) and all(w.alive() or w.fatal for w in self._workers):
            return
        with self._lock:
            alive = {id(w.lane): w for w in self._workers if w.alive() or w.fatal}
            self._workers = [alive.get(id(lane)) or LaneWorker(lane, self._next_chunk, self._passed,
                                                                     self._stop.is_set)
                             for lane in self._followers]

    def _workers_alive(self) -> bool:
        return all(w.alive() for w in self._workers)

    # -- what lanes call ---------------------------------------------------------------------------
    def _next_chunk(self, pos: int, timeout: float) -> Sequence[StreamItem] | None:
        with self._cond:
            if pos >= self._end:
                self._cond.wait(timeout)
                if pos >= self._end:
                    return None
            return self._chunks[pos - self._base]

    def _passed(self) -> None:
        with self._cond:
            low = min(lane.pos for lane in self._followers)
            while self._base < low and self._chunks:
                self._chunks.popleft()
                self._offsets.popleft()
                self._base += 1
            self._cond.notify_all()

    def _report(self, failed: list[FailedRecord]) -> None:
        with self._lock:
            if self._stop.is_set():
                # close() gave up on these and reported them as unsent (kept on disk): once is enough.
                self.late_failures += len(failed)
            else:
                self._failures.extend(failed)

    def take_failures(self) -> list[FailedRecord]:
        """Failures since the last call (each is reported once)."""
        with self._lock:
            failed, self._failures = self._failures, []
        return failed

    # -- progress ----------------------------------------------------------------------------------
    def _records_behind(self, lane: Lane) -> int:
        if lane.durable or lane.pos >= self._end:
            return lane.inflight
        return self._total - self._offsets[lane.pos - self._base]

    def _behind(self) -> int:
        return max((self._records_behind(lane) for lane in self._followers), default=0)

    def unsent(self) -> int:
        """Records some lane has not delivered yet (artifacts included); none once kept on disk."""
        if self._stop.is_set():
            return 0  # given up: what was unsent is counted in `kept` (on disk), not as queued
        with self._lock:
            behind = self._behind()
        return behind + max((lane.artifacts_pending() for lane in self.lanes), default=0)

    def oldest_unsent(self) -> int | None:
        """Timestamp (ms) of the oldest record some lane has not delivered, if any."""
        with self._lock:
            oldest = [lane.inflight_oldest for lane in self.lanes if lane.inflight_oldest is not None]
            low = min((lane.pos for lane in self._followers), default=self._end)
            if low < self._end and self._chunks:
                first = self._chunks[max(0, low - self._base)]
                if first:
                    oldest.append(getattr(first[0], "timestamp", 0))
        return min(oldest) if oldest else None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every lane has passed everything handed in before the call, then ``Sink.flush``.

        Raises :class:`DeliveryError` with the failures since the last raise, and the count of
        records still unsent if ``timeout`` ran out first. Never waits longer than ``timeout``.
        """
        if self._closed or self._stop.is_set():
            # Nothing follows the stream any more: what it held was kept on disk (and said so).
            failed = self.take_failures()
            if failed:
                raise DeliveryError(failed)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self._end
        done = self._wait(lambda: all(lane.pos >= target for lane in self._followers), deadline)
        if done:
            queued = [lane.artifacts_done_upto()[0] for lane in self.lanes]
            for lane in self.lanes:
                lane.wake_artifacts()
            done = self._wait(lambda: all(lane.artifacts_done_upto()[1] >= q
                                          for lane, q in zip(self.lanes, queued, strict=True)), deadline)
        for lane in self.lanes:
            try:
                lane.sink.flush()
            except Exception as exc:  # a third-party sink may raise anything
                self._report([FailedRecord("sink", lane.name, f"flush failed: {type(exc).__name__}: {exc}")])
        failed = self.take_failures()
        dead = [w for w in self._workers if w.fatal is not None]
        if dead:
            failed += [FailedRecord("sink", w.lane.name, f"delivery lane died: {w.fatal!r}") for w in dead]
        if not done or dead:
            unsent = self.unsent()
            why = f"timed out after {timeout}s" if not done else "a delivery lane died"
            raise DeliveryError(failed, unsent=unsent, message=f"flush {why}; {unsent} record(s) unsent"
                                + (f"; {len(failed)} failed: " + "; ".join(map(str, failed[:10])) if failed else ""))
        if failed:
            raise DeliveryError(failed)

    def _wait(self, ready: Callable[[], bool], deadline: float | None) -> bool:
        with self._cond:
            while not ready():
                if any(w.fatal is not None for w in self._workers):
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.1 if left is None else min(left, 0.1))
        return True

    # -- giving up, closing ----------------------------------------------------------------------
    def keep_unsent(self, extra: Sequence[StreamItem] = ()) -> tuple[int, str | None]:
        """Stop retrying; put what some sink has not got (plus ``extra``) on disk. Returns ``(count, path)``.

        With a durable sink, it already holds everything handed in: only ``extra`` is added to it.
        Otherwise the records go to a new spool folder that ``mlflow-er sync`` can replay.
        """
        self._stop.set()
        with self._cond:
            # Each chunk is kept once, however often this is called (an interrupt, then the close).
            low = max(self._kept_end, min((lane.pos for lane in self._followers), default=self._end))
            backlog = [it for chunk in list(self._chunks)[max(0, low - self._base):] for it in chunk]
            behind = sum(1 for it in backlog if type(it) not in _LIFECYCLE)
            self._kept_end = self._end
            self._cond.notify_all()
        durable = self._durable_lane()
        items = list(extra) if durable is not None else [*backlog, *extra]
        count = sum(1 for it in extra if type(it) not in _LIFECYCLE) + behind
        if not items and not behind:
            return 0, None
        try:
            if durable is not None and items:
                self._register_artifacts(items)
            path = self.keeper.put(items, durable, self.stage, self._report)
        except Exception as exc:
            log.error("mlflow-er: %d record(s) could not be delivered and could not be kept on disk either: %s",
                      count, exc)
            self.lost += count
            return count, None
        self.kept += count
        log.error("mlflow-er: %d record(s) not delivered in time are kept in %s; replay them with `%s`",
                  count, path, self.keeper.sync_command(path))
        return count, path

    def keep_location(self) -> str:
        """Where :meth:`keep_unsent` puts records: the durable sink's folder, else a new spool folder."""
        return self.keeper.location(self._durable_lane())

    def _durable_lane(self) -> Lane | None:
        return next((lane for lane in self.lanes if lane.durable), None)

    def close(self, timeout: float | None = None, extra: Sequence[StreamItem] = ()) -> None:
        """Flush within ``timeout``, stop the lanes, close the sinks built by name.

        If time runs out, what is unsent is kept on disk (:meth:`keep_unsent`) and the
        :class:`DeliveryError` says how much and where.
        """
        if self._closed:
            return

        def interrupted() -> None:  # Ctrl-C / SIGTERM in the final flush: keep what is unsent, then unwind
            self.keep_unsent(extra)
            self._shutdown(0.0)

        deadline, problem = flush_for_close(self.flush, timeout, interrupted)
        path = None
        if problem is not None and problem.unsent:
            _, path = self.keep_unsent(extra)
        left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        failed = self._shutdown(left)
        if problem is not None or failed:
            message = str(problem) if problem and not failed else None
            if path and message:
                message += f"; kept in {path} (replay: {self.keeper.sync_command(path)})"
            error = DeliveryError([*(problem.failed if problem else []), *failed],
                                  unsent=problem.unsent if problem else 0, message=message)
            error.kept_in = path
            raise error

    def _shutdown(self, budget: float) -> list[FailedRecord]:
        self._closed = True
        end = time.monotonic() + min(budget, 5.0)
        for w in self._workers:
            w.stop(end)
        for lane in self.lanes:
            lane.stop_artifacts(max(0.0, end - time.monotonic()))
        owned = [lane for lane, mine in zip(self.lanes, self._owned_flags(), strict=True) if mine]
        failed = close_sinks([(lane.name, lane.sink) for lane in owned], end)
        if self._stop.is_set():
            self.stage.discard_all()
        return failed

    def _owned_flags(self) -> list[bool]:
        by_sink = {id(s): r is not None for s, r in zip(self._sinks, self._rebuild, strict=True)}
        return [by_sink.get(id(lane.sink), False) for lane in self.lanes]

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def stopping(self) -> bool:
        """True once the pipeline gave up on what is unsent (a close ran out of time)."""
        return self._stop.is_set()

    # -- fork ----------------------------------------------------------------------------------------
    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self.after_fork_in_child()

    def after_fork_in_child(self) -> None:
        """A forked child starts empty (the parent delivers its own records) with sinks of its own."""
        self._sinks = [r() if r is not None else s for s, r in zip(self._sinks, self._rebuild, strict=True)]
        self._init_state()

    # -- health --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters summed over lanes, plus ``lanes``: each sink's own counters and how far behind it is."""
        out: dict[str, Any] = {"delivered": 0, "failed": 0, "retries": 0, "batches": 0, "artifacts": 0}
        lanes: dict[str, dict[str, Any]] = {}
        with self._lock:
            behind = {id(lane): self._records_behind(lane) for lane in self.lanes}
        for lane in self.lanes:
            s, a = lane.stats, lane.art_stats
            one = {"delivered": s.delivered + a.delivered, "failed": s.failed + a.failed,
                   "retries": s.retries + a.retries, "batches": s.batches, "artifacts": a.artifacts,
                   "behind": behind[id(lane)] + lane.artifacts_pending(), "durable": lane.durable}
            for k in out:
                out[k] += one[k]
            lanes[_unique(lanes, lane.name)] = one
        out["lanes"] = lanes
        out["kept"] = self.kept
        out["lost"] = self.lost
        return out

    def __repr__(self) -> str:
        return f"<Pipeline {[lane.name for lane in self.lanes]}>"


def _unique(seen: dict[str, Any], name: str) -> str:
    if name not in seen:
        return name
    i = 2
    while f"{name}#{i}" in seen:
        i += 1
    return f"{name}#{i}"
