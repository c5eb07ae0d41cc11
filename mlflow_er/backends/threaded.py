"""The ``threaded`` backend: log calls cost microseconds, one writer thread delivers.

Hand-off is an append to a ``collections.deque`` (atomic under the GIL, no lock on the
hot path). One daemon writer thread per backend drains it in call order, coalesces each
run's records into ``log_batch``-sized batches and delivers them through the shared
retry/bisect logic. Artifacts go to a second daemon thread so a 1 GB upload never holds
metrics back. ``flush()`` puts a marker into the same deque, so "everything enqueued
before it" is exact. Not built on ``ThreadPoolExecutor``: its workers are joined before
``atexit`` hooks run, which would make a bounded drain at exit impossible.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from typing import Any

from ..delivery import Deliverer, DeliveryStats, RetryPolicy
from ..errors import BackendClosed, DeliveryError, FailedRecord, QueueFull
from ..hookspecs import hookimpl
from ..records import MAX_METRICS_PER_BATCH, Artifact, Metric, Record, approx_size, split_batches
from ..sinks.base import Sink
from . import lifecycle
from .base import Backend, materialize
from .spill import Spill, Spilling
from .uploads import ArtifactUploads

log = logging.getLogger(__name__)

NAME = "threaded"
ON_FULL = ("block", "drop", "spill")


class _Marker:
    """Placed in the queue by ``flush()``; set once everything before it is delivered."""

    __slots__ = ("done", "spill_upto")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.spill_upto = 0  # spilled records submitted before the flush: deliver them first


class ThreadedBackend(ArtifactUploads, Spilling, Backend):
    """Deliver from a background writer thread.

    :param max_queue: records held in memory before ``on_full`` applies (~250 B each).
    :param max_bytes: bytes of param/tag/artifact payloads held before ``on_full`` applies.
    :param on_full: ``"block"`` (wait up to ``block_timeout``, then :class:`QueueFull`),
        ``"drop"`` (count by reason in ``stats()``, warn once) or ``"spill"`` (to the spool).
    :param flush_interval: longest a record waits in memory before the writer sends it.
        0.25 s keeps the UI current and coalesces a fast loop into few requests (a batch
        holds up to 1000 metrics, so 4 batches/s carry 4000 metrics/s per run).
    :param retry_deadline: seconds a batch keeps retrying transient failures.
    :param close_timeout: what the ``atexit`` drain may take.
    """

    name = NAME
    _marker_type = _Marker  # what the uploader (a mixin in uploads.py) releases in order

    def __init__(self, max_queue: int = 100_000, max_bytes: int = 32 * 1024 * 1024, on_full: str = "block",
                 block_timeout: float = 30.0, flush_interval: float = 0.25, retry_deadline: float = 300.0,
                 close_timeout: float = 30.0, spill_path: str | None = None):
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        if max_queue < 1 or max_bytes < 1:
            raise ValueError("max_queue and max_bytes must be positive")
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.flush_interval = flush_interval
        self.policy = RetryPolicy(deadline=retry_deadline)
        self.close_timeout = close_timeout
        self.spill_path = spill_path
        self.sinks: list[Sink] = []
        self._init_state()
        lifecycle.track(self)

    def _init_state(self) -> None:
        """Fresh queue, locks and counters (at construction and in a forked child)."""
        self._buf: deque[Any] = deque()
        # Wake the writer early once a full batch waits, or the buffer is full, whichever first.
        self._kick_default = min(MAX_METRICS_PER_BATCH, self.max_queue)
        self._kick_at = self._kick_default
        self._limit = self.max_queue  # the hot path's bound; 0 while spilling (all go to disk)
        self._spill: Spill | None = None
        self._spilling = False
        self._spilled = 0
        self._spill_kept = 0  # spilled records left on disk at close, for `mlflow-er sync`
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._waiters = 0
        self._bytes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()  # aborts retries when a close timeout has passed
        self._closing = False
        # Each thread writes only its own counters (no lost updates between threads); drop
        # counts change under the lock. stats() adds them up.
        self._stats = DeliveryStats()  # the writer's
        self._art_stats = DeliveryStats()  # the uploader's
        self._dropped: Counter[str] = Counter()
        self._failures: list[FailedRecord] = []
        self._warned_drop = False
        self._inflight = 0
        self._inflight_oldest: int | None = None
        self._fatal: BaseException | None = None
        self._writer: threading.Thread | None = None
        self._uploader: threading.Thread | None = None
        self._art_q: deque[Any] = deque()
        self._art_pending = 0  # artifacts handed to the uploader and not yet uploaded
        self._markers = 0  # flush markers in the queue: the writer must not linger
        self._art_wake = threading.Event()
        self._deliverers: list[Deliverer] = []
        self._art_deliverers: list[Deliverer] = []

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._stop.clear()
        self._closing = False
        self._make_deliverers()
        self._ensure_threads()

    def _make_deliverers(self) -> None:
        self._deliverers = [Deliverer(s, self.policy, self._stats, self._stop) for s in self.sinks]
        self._art_deliverers = [Deliverer(s, self.policy, self._art_stats, self._stop) for s in self.sinks]

    def _ensure_threads(self) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._writer_main, name="mlflow-er-writer", daemon=True)
                self._writer.start()
            if self._uploader is None or not self._uploader.is_alive():
                self._uploader = threading.Thread(target=self._uploader_main, name="mlflow-er-uploader",
                                                  daemon=True)
                self._uploader.start()

    def after_fork_in_child(self) -> None:
        """The child starts empty: the parent's records are the parent's to deliver."""
        sinks = self.sinks
        self._init_state()
        self.sinks = sinks
        self._make_deliverers()
        self._kick_at = 0  # first submit in the child starts fresh threads

    # -- the hot path ----------------------------------------------------------------------
    def submit(self, record: Record) -> None:
        buf = self._buf
        if type(record) is not Metric or len(buf) >= self._limit:
            self._submit_slow(record, approx_size(record) if type(record) is not Metric else 0)
            return
        buf.append(record)
        if len(buf) >= self._kick_at:
            self._kick()

    def submit_many(self, records: Sequence[Record]) -> None:
        for r in records:
            self.submit(r)

    def _kick(self) -> None:
        if self._kick_at == 0:
            self._kick_at = self._kick_default
            self._ensure_threads()
        self._wake.set()

    def _submit_slow(self, record: Record, size: int) -> None:
        if type(record) is Artifact and record.payload is not None:
            size += _payload_size(record.payload)
            if self.on_full == "spill" and (self._spilling or len(self._buf) >= self.max_queue
                                            or self._bytes + size > self.max_bytes):
                # An image array cannot be spilled as is: render it to a file first.
                record, size = materialize(record), 0
        with self._lock:
            if self._spilling:
                self._spill_locked(record)
                return
            over_records = len(self._buf) >= self.max_queue
            # A single record larger than max_bytes still goes through an empty buffer.
            if over_records or (self._bytes + size > self.max_bytes and self._bytes > 0):
                if self.on_full == "spill":
                    self._spill_locked(record)
                    return
                if not self._make_room(size, "queue_full" if over_records else "bytes_full"):
                    return
            self._bytes += size
            self._buf.append((record, size) if size else record)
        if type(record) is Artifact or len(self._buf) >= self._kick_at:
            self._kick()  # an artifact goes to the uploader now: no reason to linger

    def _make_room(self, size: int, reason: str) -> bool:
        """Apply ``on_full`` with the lock held. False means the record was dropped."""
        if self._fatal is not None or (self._writer is not None and not self._writer.is_alive()):
            raise BackendClosed(f"the writer thread is not running ({self._fatal!r}); nothing more can be sent")
        self._wake.set()  # a full buffer is the writer's business now, whatever the policy
        if self.on_full == "drop":
            self._dropped[reason] += 1
            if not self._warned_drop:
                self._warned_drop = True
                warnings.warn(f"mlflow-er: buffer full ({self.max_queue} records / {self.max_bytes} bytes); "
                              "dropping records (counted in stats()['dropped'])", RuntimeWarning, stacklevel=5)
            return False
        deadline = time.monotonic() + self.block_timeout
        self._wake.set()
        self._waiters += 1
        try:
            while len(self._buf) >= self.max_queue or (self._bytes + size > self.max_bytes and self._bytes > 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QueueFull(f"buffer stayed full for {self.block_timeout}s "
                                    f"({len(self._buf)} records, {self._bytes} bytes queued); "
                                    "the sink is slower than logging or unavailable")
                self._not_full.wait(min(left, 0.5))
        finally:
            self._waiters -= 1
        return True

    # -- the writer ------------------------------------------------------------------------
    def _writer_main(self) -> None:
        try:
            while True:
                if not self._buf and self._spill_pending() and not self._stop.is_set():
                    self._drain_spill()
                    continue
                if not self._buf:
                    if self._closing:
                        if self._stop.is_set():
                            self._finish_spill()  # gave up: what is spilled stays on disk
                        self._art_wake.set()  # the uploader exits once the writer has
                        return
                    self._wake.wait(self.flush_interval)
                    self._wake.clear()
                    continue
                oldest = self._buf[0]
                oldest = oldest[0] if type(oldest) is tuple else oldest
                # Linger (to coalesce) only while no batch is full, nothing waits for room
                # and no flush is pending.
                if len(self._buf) < self._kick_default and not self._closing and not self._markers:
                    age = time.time() - getattr(oldest, "timestamp", 0) / 1000
                    if 0 <= age < self.flush_interval:
                        self._wake.wait(self.flush_interval - age)
                        self._wake.clear()
                self._drain_once()
        except BaseException as exc:  # never die silently: flush()/close() report it
            self._art_wake.set()
            self._fatal = exc
            log.exception("mlflow-er writer thread died")
            with self._lock:
                self._not_full.notify_all()

    def _drain_once(self) -> None:
        """Take what is queued (up to a marker), deliver it in order, release the markers."""
        taken: list[Any] = []
        freed = 0
        markers: list[_Marker] = []
        buf = self._buf
        while buf and len(taken) < 20 * MAX_METRICS_PER_BATCH:
            item = buf.popleft()
            if type(item) is _Marker:
                markers.append(item)
                with self._lock:
                    self._markers -= 1
                if item.spill_upto:
                    self._deliver(taken)  # memory first: it holds the older records
                    taken = []
                    while self._spill is not None and self._spill.read < item.spill_upto and not self._stop.is_set():
                        self._drain_spill(item.spill_upto)
                break  # records after a marker belong to the next round
            if type(item) is tuple and type(item[0]) is not Artifact:
                item, size = item
                freed += size
            taken.append(item)  # (artifact, size) pairs keep their bytes until rendered
        if freed or self._waiters:
            with self._lock:
                self._bytes -= freed
                if self._waiters:
                    self._not_full.notify_all()
        self._inflight = len(taken)
        first = taken[0] if taken else None
        self._inflight_oldest = (first[0] if type(first) is tuple else first).timestamp if taken else None
        try:
            self._deliver(taken)
        finally:
            self._inflight = 0
            self._inflight_oldest = None
        if markers:
            self._flush_sinks()
        for m in markers:
            self._art_q.append(m)  # the uploader releases it after earlier artifacts
            self._art_wake.set()

    def _deliver(self, records: list[Record]) -> None:
        by_run: dict[str, list] = defaultdict(list)
        for r in records:
            if type(r) is tuple or type(r) is Artifact:
                with self._lock:
                    self._art_pending += 1
                self._art_q.append(r)
                self._art_wake.set()
            else:
                by_run[r.run_id].append(r)
        if by_run and not self._deliverers:
            raise BackendClosed("records reached a backend that was never opened with sinks")
        for run_id, recs in by_run.items():
            for batch in split_batches(run_id, recs):
                for d in self._deliverers:
                    failed = d.deliver(batch)
                    if failed:
                        self._record_failures(failed, self._stats)

    def _record_failures(self, failed: list[FailedRecord], stats: DeliveryStats) -> None:
        """Keep failures for the next flush (``stats``: the calling thread's own counters)."""
        with self._lock:
            if self._stop.is_set():
                # close() gave up on these and already reported them as unsent: count them
                # once, as dropped at close, instead of reporting them again as failed.
                self._dropped["unsent_at_close"] += len(failed)
                stats.failed -= len(failed)
            else:
                self._failures.extend(failed)

    def _flush_sinks(self) -> None:
        """``Sink.flush`` on every sink: the durability point of ``flush()`` (e.g. the spool's fsync)."""
        for d in self._deliverers:
            try:
                d.sink.flush()
            except Exception as exc:  # a third-party sink may raise anything
                with self._lock:
                    self._failures.append(FailedRecord("sink", d.sink.name,
                                                       f"flush failed: {type(exc).__name__}: {exc}"))

    # -- flush / close ---------------------------------------------------------------------
    def _unsent(self) -> int:
        return max(0, len(self._buf) - self._markers) + self._inflight + self._art_pending + self._spill_pending()

    def _take_failures(self) -> list[FailedRecord]:
        with self._lock:
            failed, self._failures = self._failures, []
        return failed

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted before this call is delivered or failed.

        Raises :class:`DeliveryError` listing the records that failed since the last
        raise, or saying how many are unsent if ``timeout`` ran out first.
        """
        if self._writer is None and not self._buf:
            failed = self._take_failures()
            if failed:
                raise DeliveryError(failed)
            return
        marker = _Marker()
        with self._lock:
            marker.spill_upto = self._spill.appended if self._spill is not None else 0
            self._markers += 1
            self._buf.append(marker)
        self._ensure_threads()
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if self._fatal is not None:
                break
            marker.done.wait(0.2 if left is None else min(left, 0.2))
        failed = self._take_failures()
        if not marker.done.is_set():
            unsent = self._unsent()
            why = f"the writer died: {self._fatal!r}" if self._fatal else f"timed out after {timeout}s"
            raise DeliveryError(failed, unsent=unsent,
                                message=f"flush {why}; {unsent} record(s) unsent"
                                + (f"; {len(failed)} failed: " + "; ".join(map(str, failed[:10])) if failed else ""))
        if failed:
            raise DeliveryError(failed)

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout``, then stop the threads. Records still unsent are counted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.flush(timeout)
        except DeliveryError as exc:
            if exc.unsent:
                self._stop.set()  # stop retrying: the caller's time is up
                self._abandon()
            raise
        finally:
            self._closing = True
            self._wake.set()
            self._art_wake.set()
            for t in (self._writer, self._uploader):
                if t is not None and t is not threading.current_thread():
                    left = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                    t.join(left)
            writer_gone = self._writer is None or not self._writer.is_alive()
            self._writer = self._uploader = None
            if writer_gone:
                self._finish_spill()  # else the writer does it when its current call returns

    def _abandon(self) -> None:
        """Count what is left in memory as dropped at close (it cannot be sent in time)."""
        left = 0
        with self._lock:
            while self._buf:
                item = self._buf.popleft()
                if type(item) is not _Marker:
                    left += 1
            self._markers = 0
            self._bytes = 0
        if left:
            self._dropped["unsent_at_close"] += left

    def stats(self) -> dict[str, Any]:
        s, a = self._stats, self._art_stats
        dropped = dict(self._dropped)
        oldest = None
        try:
            first = self._buf[0]
        except IndexError:  # the writer emptied it meanwhile
            first = None
        first = first[0] if type(first) is tuple else first
        oldest = getattr(first, "timestamp", None)
        if self._inflight_oldest is not None:
            oldest = self._inflight_oldest if oldest is None else min(oldest, self._inflight_oldest)
        age = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        return {"backend": NAME, "queued": self._unsent(), "queued_bytes": self._bytes,
                "delivered": s.delivered + a.delivered, "failed": s.failed + a.failed,
                "retries": s.retries + a.retries, "batches": s.batches, "artifacts": a.artifacts,
                "dropped": dropped, "dropped_total": sum(dropped.values()),
                "spilled": self._spilled, "spill_pending": self._spill_pending(),
                "spill_kept": self._spill_kept,
                "oldest_unsent_age": age, "writer_alive": bool(self._writer and self._writer.is_alive()),
                "on_full": self.on_full}


def _payload_size(payload: tuple[str, Any]) -> int:
    kind, content = payload
    nbytes = getattr(content, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    if kind == "text":
        return len(content)
    return 4096


@hookimpl
def mlflow_er_backend_names() -> list[str]:
    return [NAME]


@hookimpl
def mlflow_er_make_backend(name: str, options: dict[str, Any]) -> Backend | None:
    return ThreadedBackend(**options) if name == NAME else None
