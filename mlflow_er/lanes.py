"""One delivery lane per sink: its own position in the stream, its own retries, its own failures.

A :class:`Lane` turns stream items into sink calls — batches (retry and bisect through
:class:`~mlflow_er.delivery.Deliverer`), artifacts (through the shared
:class:`~mlflow_er.staging.ArtifactStage`), run start and end — and records what failed.
It does not know about threads: the :class:`~mlflow_er.pipeline.Pipeline` calls
:meth:`Lane.process` inline (the ``sync`` backend, the durable lane) or from the lane's
own worker (:class:`LaneWorker`), so a sink that is slow or down delays nobody else.

Artifacts of a lane go to a second thread of that lane (:class:`_ArtifactWorker`): a
1 GB upload never holds the lane's metrics back. A run's end waits for the artifacts
logged before it, so "the run has ended" means everything of it is there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Any

from .delivery import Deliverer, DeliveryStats, RetryPolicy
from .errors import FailedRecord
from .records import (
    MAX_METRICS_PER_BATCH,
    Artifact,
    Metric,
    Param,
    RunEnd,
    RunStart,
    StreamItem,
    Tag,
    merge_metric_batches,
    split_batches,
)
from .sinks.base import Sink, handles_artifacts, handles_runs
from .staging import ArtifactStage

log = logging.getLogger(__name__)

Failures = Callable[[list[FailedRecord]], None]


class Lane:
    """Delivers the stream to one sink (see the module docstring)."""

    def __init__(self, sink: Sink, policy: RetryPolicy, stage: ArtifactStage, report: Failures,
                 stop: threading.Event, durable: bool = False):
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)
        self.durable = durable
        self.stats = DeliveryStats()
        self.art_stats = DeliveryStats()
        self.deliverer = Deliverer(sink, policy, self.stats, stop)
        self.art_deliverer = Deliverer(sink, policy, self.art_stats, stop)
        self.artifacts = handles_artifacts(sink)
        self.runs = handles_runs(sink)
        self.stage = stage
        self.report = report
        self.pos = 0  # chunks of the stream this lane has passed
        self.inflight = 0  # records of the chunk being delivered now
        self.inflight_oldest: int | None = None
        self._art: _ArtifactWorker | None = None
        self._art_lock = threading.Lock()

    # -- one chunk of the stream ---------------------------------------------------------------
    def process(self, items: Sequence[StreamItem], inline_artifacts: bool = False) -> None:
        """Deliver ``items`` in order: records batched per run, lifecycle and artifacts where they stand."""
        pending: dict[str, list[Metric | Param | Tag]] = defaultdict(list)
        for item in items:
            t = type(item)
            if t is Metric or t is Param or t is Tag:
                pending[item.run_id].append(item)  # type: ignore[arg-type]
                continue
            # Lifecycle and artifacts keep their place: what came before them is sent first.
            self._send(pending)
            pending.clear()
            if t is Artifact:
                if self.artifacts:
                    if inline_artifacts:
                        self._upload(item)  # type: ignore[arg-type]
                    else:
                        self._art_worker().put(item)  # type: ignore[arg-type]
                # else: a metrics-only sink is not charged a failure per artifact (and holds no reference)
            elif t is RunStart:
                self._start(item)  # type: ignore[arg-type]
            elif t is RunEnd:
                if self._art is not None and not inline_artifacts:
                    self._art.put(item)  # type: ignore[arg-type]  # after the artifacts logged before it
                else:
                    self._end(item)  # type: ignore[arg-type]
        self._send(pending)

    def _send(self, by_run: dict[str, list[Metric | Param | Tag]]) -> None:
        for run_id, recs in by_run.items():
            self.inflight = len(recs)
            self.inflight_oldest = recs[0].timestamp if recs else None
            try:
                batches = split_batches(run_id, recs)
                limit = self.sink.max_metrics_per_write
                if limit > MAX_METRICS_PER_BATCH and len(batches) > 1:
                    batches = merge_metric_batches(batches, limit)
                for batch in batches:
                    failed = self.deliverer.deliver(batch)
                    if failed:
                        self.report(failed)
            finally:
                self.inflight = 0
                self.inflight_oldest = None

    def _start(self, item: RunStart) -> None:
        if not self.runs:
            return
        try:
            self.sink.start_run(item.run_id, run_name=item.run_name, parent_run_id=item.parent_run_id,
                                description=item.description, tags=dict(item.tags or {}))
        except Exception as exc:  # a third-party sink may raise anything
            self.report([FailedRecord("run_start", self.name, f"start_run failed: {type(exc).__name__}: {exc}",
                                      item.run_id)])

    def _end(self, item: RunEnd) -> None:
        self.deliverer.forget_run(item.run_id)
        if not self.runs:
            return
        try:
            self.sink.end_run(item.run_id, item.status)
        except Exception as exc:
            self.report([FailedRecord("run_end", self.name, f"end_run failed: {type(exc).__name__}: {exc}",
                                      item.run_id)])

    def _upload(self, art: Artifact) -> None:
        try:
            ready = self.stage.acquire(art)
        except Exception as exc:
            self.art_stats.failed += 1
            self.report([FailedRecord("artifact", art.name or "?", f"not uploaded: {exc}", art.run_id)])
            self.stage.release(art)
            return
        try:
            failed = self.art_deliverer.deliver_artifact(ready)
            if failed:
                self.report(failed)
        finally:
            self.stage.release(art)

    # -- artifacts on their own thread ---------------------------------------------------------
    def _art_worker(self) -> _ArtifactWorker:
        with self._art_lock:
            if self._art is None:
                self._art = _ArtifactWorker(self)
            return self._art

    def artifacts_pending(self) -> int:
        """Artifacts (and run ends queued behind them) not processed yet."""
        return self._art.pending if self._art is not None else 0

    def artifacts_done_upto(self) -> tuple[int, int]:
        """``(queued, done)`` counters of the artifact thread: a flush waits until done reaches queued."""
        return (self._art.queued, self._art.done) if self._art is not None else (0, 0)

    def wake_artifacts(self) -> None:
        if self._art is not None:
            self._art.wake.set()

    def stop_artifacts(self, timeout: float) -> None:
        if self._art is not None:
            self._art.stop(timeout)

    def forget_threads(self) -> None:
        """After ``fork()``: the artifact thread did not survive; start a new one on demand."""
        self._art = None
        self._art_lock = threading.Lock()


class _ArtifactWorker:
    """The lane's artifact thread: uploads in order, then runs the run ends queued behind them."""

    def __init__(self, lane: Lane):
        self.lane = lane
        self.q: deque[Any] = deque()
        self.queued = 0
        self.done = 0
        self.wake = threading.Event()
        self._closing = False
        self.thread = threading.Thread(target=self._main, name=f"mlflow-er-artifacts-{lane.name}", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        return self.queued - self.done

    def put(self, item: Artifact | RunEnd) -> None:
        self.queued += 1  # only the lane's record worker puts: no lost update
        self.q.append(item)
        self.wake.set()

    def _main(self) -> None:
        while True:
            if not self.q:
                if self._closing:
                    return
                self.wake.wait(0.25)
                self.wake.clear()
                continue
            item = self.q.popleft()
            try:
                if type(item) is RunEnd:
                    self.lane._end(item)
                else:
                    self.lane._upload(item)
            except BaseException:  # never die silently: count it and go on
                log.exception("mlflow-er: artifact upload to %r crashed", self.lane.sink)
            finally:
                self.done += 1

    def stop(self, timeout: float) -> None:
        self._closing = True
        self.wake.set()
        if self.thread is not threading.current_thread():
            self.thread.join(max(0.0, timeout))


class LaneWorker:
    """The thread that moves one non-durable lane along the stream."""

    def __init__(self, lane: Lane, next_chunk: Callable[[int, float], Sequence[StreamItem] | None],
                 passed: Callable[[], None], given_up: Callable[[], bool] = lambda: False):
        self.lane = lane
        self._given_up = given_up
        self._next = next_chunk
        self._passed = passed
        self._closing = False
        self.fatal: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"mlflow-er-lane-{lane.name}", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        lane = self.lane
        try:
            while True:
                if self._closing and self._given_up():
                    return  # what this lane has not delivered was kept on disk: stop sending it
                items = self._next(lane.pos, 0.25)
                if items is None:
                    if self._closing:
                        return
                    continue
                lane.process(items)
                lane.pos += 1
                self._passed()
        except BaseException as exc:  # reported by the next flush
            self.fatal = exc
            log.exception("mlflow-er: delivery lane %r died", lane.sink)
            self._passed()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, deadline: float) -> None:
        self._closing = True
        if self.thread is not threading.current_thread():
            self.thread.join(max(0.0, deadline - time.monotonic()))
