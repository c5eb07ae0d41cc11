"""The ``threaded`` backend: log calls cost microseconds, one writer thread moves records.

Hand-off is an append to a ``collections.deque`` (atomic under the GIL, no lock on the
metric hot path). One daemon writer thread per backend drains it in call order and hands
chunks to the :class:`~mlflow_er.pipeline.Pipeline`, which delivers them (each sink in its
own lane; the spool has them as soon as the chunk is handed over). ``flush()`` puts a marker
into the same deque, so "everything enqueued before it" is exact. Not built on
``ThreadPoolExecutor``: its workers are joined before ``atexit`` hooks run, which would make
a bounded drain at exit impossible.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Any

from ..errors import BackendClosed, DeliveryError, QueueFull
from ..records import MAX_METRICS_PER_BATCH, Artifact, Metric, RunEnd, RunStart, StreamItem, approx_size
from ..unsent import flush_for_close
from .base import backend_hooks
from .queued import QueuedBackend
from .spill import Overflow

log = logging.getLogger(__name__)

NAME = "threaded"
ON_FULL = ("block", "drop", "spill")
_CHUNK = 20 * MAX_METRICS_PER_BATCH  # records handed to the pipeline at once, at most


class _Marker:
    """Placed in the queue by ``flush()``; set once everything before it is handed to the pipeline."""

    __slots__ = ("handed", "spill_upto")

    def __init__(self, spill_upto: int) -> None:
        self.handed = threading.Event()
        self.spill_upto = spill_upto  # spilled records submitted before the flush: hand them over first


class ThreadedBackend(QueuedBackend):
    """Move records to the pipeline from a background writer thread.

    :param max_queue: records held in memory before ``on_full`` applies (~250 B each). A sink
        that falls behind holds up to twice as many in its lane before the buffer stops draining.
    :param max_bytes: bytes of param/tag/artifact payloads held before ``on_full`` applies.
    :param on_full: ``"block"`` (wait up to ``block_timeout``, then :class:`QueueFull`),
        ``"drop"`` (count by reason in ``stats()``, warn once) or ``"spill"`` (to local disk).
    :param flush_interval: longest a record waits in memory before the writer sends it.
        0.25 s keeps the UI current and coalesces a fast loop into few requests.
    :param retry_deadline: seconds a batch keeps retrying transient failures.
    :param close_timeout: what the ``atexit`` drain may take.
    :param spill_path: folder for ``on_full="spill"`` (default: a private staging folder).
    """

    name = NAME

    def __init__(self, max_queue: int = 100_000, max_bytes: int = 32 * 1024 * 1024, on_full: str = "block",
                 block_timeout: float = 30.0, flush_interval: float = 0.25, retry_deadline: float = 300.0,
                 close_timeout: float = 30.0, spill_path: str | None = None):
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, got {on_full!r}")
        if max_queue < 1 or max_bytes < 1:
            raise ValueError("max_queue and max_bytes must be positive")
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.spill_path = spill_path
        super().__init__(max_queue=max_queue, flush_interval=flush_interval, retry_deadline=retry_deadline,
                         close_timeout=close_timeout, block_timeout=block_timeout)

    def _init_state(self) -> None:
        """Fresh queue, locks and counters (at construction and in a forked child)."""
        super()._init_state()
        # Wake the writer early once a full batch waits, or the buffer is full, whichever first.
        self._kick_default = min(MAX_METRICS_PER_BATCH, self.max_queue)
        self._chunk = min(_CHUNK, self.max_queue)  # handed over at once: bounded like the buffer
        self._kick_at = self._kick_default
        self._limit = self.max_queue  # the hot path's bound; 0 while spilling (all go to disk)
        self._overflow = Overflow(self.spill_path)
        self._not_full = threading.Condition(self._lock)
        self._waiters = 0
        self._bytes = 0
        self._dropped: Counter[str] = Counter()
        self._warned_drop = False
        self._inflight = 0  # records taken from the queue, not yet handed to the pipeline
        self._inflight_oldest: int | None = None
        self._markers = 0  # flush markers in the queue: the writer must not linger
        self._lifecycle = 0  # run starts/ends in the queue: never dropped, not counted as records
        self._writer: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, pipeline: Any) -> None:
        super().open(pipeline)
        self.pipeline.policy.deadline = self.retry_deadline
        # A sink that falls behind holds the writer after max_queue records, so the buffer
        # fills and on_full applies: memory stays bounded by about twice max_queue records.
        self.pipeline.max_backlog = self.max_queue
        self._closing = False
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        if sys.is_finalizing():
            return  # a thread started while the interpreter shuts down never runs: start() would hang
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._writer_main, name="mlflow-er-writer", daemon=True)
                self._writer.start()

    def after_fork_in_child(self) -> None:
        """The child starts empty: the parent's records are the parent's to deliver."""
        super().after_fork_in_child()
        self._kick_at = 0  # first submit in the child starts a fresh writer

    # -- the hot path ----------------------------------------------------------------------
    def submit(self, record: StreamItem) -> None:
        buf = self._buf
        if type(record) is not Metric or len(buf) >= self._limit:
            self._submit_slow(record, approx_size(record) if type(record) is not Metric else 0)  # type: ignore[arg-type]
            return
        buf.append(record)
        if len(buf) >= self._kick_at:
            self._kick()

    def _kick(self) -> None:
        if self._kick_at == 0:
            self._kick_at = self._kick_default
            self._ensure_writer()
        self._wake.set()

    def _submit_slow(self, record: StreamItem, size: int) -> None:
        if type(record) is RunStart or type(record) is RunEnd:
            with self._lock:  # in call order with the records, past any bound: a run's end is never dropped
                if self._overflow.active:
                    self._spill_locked(record)
                else:
                    self._lifecycle += 1
                    self._limit += 1  # it takes no record's place in the bound
                    self._buf.append(record)
            self._kick()
            return
        if type(record) is Artifact and record.payload is not None:
            size += _payload_size(record.payload)
            if self.on_full == "spill" and (self._overflow.active or len(self._buf) >= self.max_queue
                                            or self._bytes + size > self.max_bytes):
                # An image array cannot be spilled as is: render it to a file first.
                from ..staging import materialize

                record, size = materialize(record), 0
        with self._lock:
            if self._overflow.active:
                self._spill_locked(record)
                return
            over_records = len(self._buf) - self._lifecycle >= self.max_queue
            # A single record larger than max_bytes still goes through an empty buffer.
            if over_records or (self._bytes + size > self.max_bytes and self._bytes > 0):
                if self.on_full == "spill":
                    self._spill_locked(record)
                    return
                if not self._make_room(size, "queue_full" if over_records else "bytes_full"):
                    return
            self._bytes += size
            self._buf.append((record, size) if size else record)
        if type(record) is not Metric or len(self._buf) >= self._kick_at:
            self._kick()  # an artifact or a run's start/end: no reason to linger

    def _spill_locked(self, record: StreamItem) -> None:
        if self._overflow.append(record):  # type: ignore[arg-type]
            self._limit = 0  # route the hot path here too, so call order holds
        self._wake.set()

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
        self._waiters += 1
        try:
            while len(self._buf) - self._lifecycle >= self.max_queue or \
                    (self._bytes + size > self.max_bytes and self._bytes > 0):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QueueFull(f"buffer stayed full for {self.block_timeout}s "
                                    f"({len(self._buf)} records, {self._bytes} bytes queued); "
                                    "the sink is slower than logging or unavailable: raise block_timeout, "
                                    "or use on_full='spill' to overflow to disk")
                self._not_full.wait(min(left, 0.5))
        finally:
            self._waiters -= 1
        return True

    # -- the writer ------------------------------------------------------------------------
    def _writer_main(self) -> None:
        try:
            while True:
                if not self._buf and self._overflow.pending() and not self.pipeline.stopping:
                    self._drain_spill()
                    continue
                if not self._buf:
                    if self._closing:
                        return
                    self._wake.wait(self.flush_interval)
                    self._wake.clear()
                    continue
                oldest = self._buf[0]
                oldest = oldest[0] if type(oldest) is tuple else oldest
                # Linger (to coalesce) only while no batch is full, nothing waits for room
                # and no flush is pending.
                if len(self._buf) < self._kick_default and not self._closing and not self._markers \
                        and type(oldest) is Metric:
                    age = time.time() - oldest.timestamp / 1000
                    if 0 <= age < self.flush_interval:
                        self._wake.wait(self.flush_interval - age)
                        self._wake.clear()
                self._drain_once()
        except BaseException as exc:  # never die silently: flush()/close() report it
            self._fatal = exc
            log.exception("mlflow-er writer thread died")
            with self._lock:
                self._not_full.notify_all()

    def _drain_once(self) -> None:
        """Take what is queued (up to a marker), hand it to the pipeline in order, release the markers."""
        taken: list[Any] = []
        freed = 0
        marker: _Marker | None = None
        buf = self._buf
        while buf and len(taken) < self._chunk:
            item = buf.popleft()
            if type(item) is _Marker:
                marker = item
                with self._lock:
                    self._markers -= 1
                break  # records after a marker belong to the next round
            if type(item) is tuple:
                item, size = item
                freed += size
            elif type(item) is RunStart or type(item) is RunEnd:
                with self._lock:
                    self._lifecycle -= 1
                    if not self._overflow.active:
                        self._limit -= 1
            taken.append(item)
        if freed or self._waiters:
            with self._lock:
                self._bytes -= freed
                if self._waiters:
                    self._not_full.notify_all()
        self._hand(taken)
        if marker is not None:
            if marker.spill_upto:  # spilled before the flush: on disk, older than what follows
                while self._overflow.read() < marker.spill_upto and not self.pipeline.stopping:
                    self._drain_spill(marker.spill_upto)
            marker.handed.set()

    def _hand(self, items: list[Any]) -> None:
        if not items:
            return
        self._inflight = sum(1 for it in items if type(it) is not RunStart and type(it) is not RunEnd)
        self._inflight_oldest = items[0].timestamp
        try:
            self.pipeline.deliver(items)
        finally:
            self._inflight = 0
            self._inflight_oldest = None

    def _drain_spill(self, upto: int | None = None) -> None:
        """Hand the next chunk of spilled records over; stop spilling once it is empty."""
        self._hand(self._overflow.take(upto))
        with self._lock:
            if self._overflow.drained():
                self._limit = self.max_queue + self._lifecycle
                if self._waiters:
                    self._not_full.notify_all()

    # -- flush / close ---------------------------------------------------------------------
    def _queued(self) -> int:
        return max(0, len(self._buf) - self._markers - self._lifecycle) + self._inflight + self._overflow.pending()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted before this call is delivered or failed.

        Raises :class:`DeliveryError` listing the records that failed since the last
        raise, or saying how many are unsent if ``timeout`` ran out first.
        """
        if getattr(self, "pipeline", None) is None:
            return  # never opened: nothing was ever submitted
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._buf or self._inflight or self._overflow.pending():
            with self._lock:
                marker = _Marker(self._overflow.appended())
                self._markers += 1
                self._buf.append(marker)
            self._ensure_writer()
            self._wake.set()
            while not marker.handed.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or self._fatal is not None:
                    failed = self.pipeline.take_failures()
                    unsent = self._queued() + self.pipeline.unsent()
                    why = f"the writer died: {self._fatal!r}" if self._fatal else f"timed out after {timeout}s"
                    raise DeliveryError(failed, unsent=unsent, message=f"flush {why}; {unsent} record(s) unsent")
                marker.handed.wait(0.2 if left is None else min(left, 0.2))
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.pipeline.flush(left)
        except DeliveryError as exc:
            if exc.unsent:
                exc.unsent += self._queued()
            raise

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout``, then stop the writer and the pipeline; unsent records are kept on disk."""
        if getattr(self, "pipeline", None) is None:
            return
        deadline, problem = flush_for_close(self.flush, timeout, self._close_interrupted)
        self._stop_writer(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
        left = 0.0 if problem is not None else (None if deadline is None else max(0.0, deadline - time.monotonic()))
        try:
            self.pipeline.close(left, extra=self._take_left() if problem is not None else ())
        except DeliveryError as exc:
            error = DeliveryError([*(problem.failed if problem else []), *exc.failed],
                                  unsent=max(exc.unsent, problem.unsent if problem else 0),
                                  message=str(exc) if problem else None)
            error.kept_in = exc.kept_in
            raise error from None
        if problem is not None:
            raise problem

    def _close_interrupted(self) -> None:
        """Ctrl-C / SIGTERM during the final flush: keep what is unsent on disk at once (the caller unwinds)."""
        self.pipeline.keep_unsent()  # stops retries and the writer's wait for a slow lane at once
        self._stop_writer(0.5)
        try:
            self.pipeline.close(0, extra=self._take_left())
        except DeliveryError as exc:
            log.error("mlflow-er: interrupted while delivering: %s", exc)

    def _stop_writer(self, wait: float) -> None:
        t = self._writer
        self._stop_thread(t, wait)
        if t is None or not t.is_alive():
            self._writer = None
            with self._lock:
                self._overflow.finish()  # spilled records stay on disk for `mlflow-er sync`, counted

    def _take_left(self) -> list[Any]:
        """What is still in memory, for the pipeline to keep on disk (counted as kept, not dropped)."""
        left: list[Any] = []
        with self._lock:
            while self._buf:
                item = self._buf.popleft()
                if type(item) is _Marker:
                    continue
                left.append(item[0] if type(item) is tuple else item)
            self._markers = self._lifecycle = 0
            self._bytes = 0
            self._not_full.notify_all()
        return left

    def stats(self) -> dict[str, Any]:
        p = self.pipeline_stats()
        dropped = dict(self._dropped)
        try:
            first = self._buf[0]
        except IndexError:  # the writer emptied it meanwhile
            first = None
        first = first[0] if type(first) is tuple else first
        candidates = [getattr(first, "timestamp", None), self._inflight_oldest]
        if getattr(self, "pipeline", None) is not None:
            candidates.append(self.pipeline.oldest_unsent())
        known = [c for c in candidates if c is not None]
        age = max(0.0, time.time() - min(known) / 1000) if known else 0.0
        unsent_pipe = self.pipeline.unsent() if getattr(self, "pipeline", None) is not None else 0
        return {"backend": NAME, "queued": self._queued() + unsent_pipe, "queued_bytes": self._bytes,
                "delivered": p.get("delivered", 0), "failed": p.get("failed", 0),
                "retries": p.get("retries", 0), "batches": p.get("batches", 0), "artifacts": p.get("artifacts", 0),
                "dropped": dropped, "dropped_total": sum(dropped.values()),
                "spilled": self._overflow.spilled, "spill_pending": self._overflow.pending(),
                "spill_kept": self._overflow.kept, "kept_on_disk": p.get("kept", 0), "lost": p.get("lost", 0),
                "oldest_unsent_age": age, "writer_alive": bool(self._writer and self._writer.is_alive()),
                "on_full": self.on_full, "lanes": p.get("lanes", {})}


def _payload_size(payload: tuple[str, Any]) -> int:
    kind, content = payload
    nbytes = getattr(content, "nbytes", None)
    if nbytes is not None:
        return int(nbytes)
    if kind == "text":
        return len(content)
    return 4096


mlflow_er_backend_names, mlflow_er_make_backend = backend_hooks(NAME, ThreadedBackend)
