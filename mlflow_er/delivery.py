"""How a batch reaches a sink: retry transient failures, bisect permanent ones.

Shared by every backend so ``sync`` and ``threaded`` mean the same thing by "delivered".
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import FailedRecord, SinkError
from .records import Artifact, Batch, record_kind
from .sinks.base import Sink

log = logging.getLogger(__name__)


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter until ``deadline`` seconds after the first failure."""

    deadline: float = 300.0
    base: float = 0.25
    cap: float = 15.0

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = random.uniform(0, min(self.cap, self.base * (2**attempt)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap * 4))
        return delay


@dataclass
class DeliveryStats:
    """Delivery counters, each instance written by one thread only (a backend sums them in ``stats()``)."""

    delivered: int = 0
    failed: int = 0
    retries: int = 0
    batches: int = 0
    artifacts: int = 0


def classify(exc: BaseException) -> SinkError:
    """Any exception from a sink as a :class:`SinkError` (third-party sinks may raise anything)."""
    if isinstance(exc, SinkError):
        return exc
    transient = isinstance(exc, (ConnectionError, TimeoutError))
    err = SinkError(f"{type(exc).__name__}: {exc}", transient=transient)
    err.__cause__ = exc
    return err


class Deliverer:
    """Delivers batches and artifacts to one sink under a retry policy.

    ``stop`` is an event that, once set, makes retries give up at once (used when a
    close timeout has passed), so nothing here sleeps past what the caller allowed.

    A sink error with ``whole_run`` set (the store no longer accepts writes to that run:
    deleted, ended, unknown) is taken as the answer for the whole run: the batch is not
    bisected and every later batch of that run fails at once, without a request, until
    :meth:`forget_run`.
    """

    def __init__(self, sink: Sink, policy: RetryPolicy, stats: DeliveryStats,
                 stop: threading.Event | None = None):
        self.sink = sink
        self.policy = policy
        self.stats = stats
        self.stop = stop or threading.Event()
        self.rejected: dict[str, str] = {}  # run id -> why the store refuses it

    def _attempt(self, fn: Callable[[], None]) -> SinkError | None:
        """Call ``fn`` until it succeeds, fails permanently, or the deadline passes."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                fn()
                return None
            except Exception as exc:
                err = classify(exc)
            if not err.transient:
                return err
            remaining = self.policy.deadline - (time.monotonic() - start)
            if remaining <= 0 or self.stop.is_set():
                return SinkError(f"gave up after {attempt + 1} attempt(s) in {time.monotonic() - start:.1f}s: "
                                 f"{err}", transient=True)
            self.stats.retries += 1
            delay = min(self.policy.backoff(attempt, err.retry_after), remaining)
            log.debug("transient failure from %r (%s); retrying in %.2fs", self.sink, err, delay)
            if self.stop.wait(delay):
                return SinkError(f"stopped while retrying: {err}", transient=True)
            attempt += 1

    def forget_run(self, run_id: str) -> None:
        """The run ended: a later run with the same id (resumed) is tried afresh."""
        self.rejected.pop(run_id, None)

    def _fail_all(self, batch: Batch, reason: str, permanent: bool) -> list[FailedRecord]:
        failed = [FailedRecord(record_kind(r), r.key, reason, batch.run_id, permanent=permanent)
                  for r in batch.records()]
        self.stats.failed += len(failed)
        return failed

    def deliver(self, batch: Batch) -> list[FailedRecord]:
        """Deliver ``batch``; return the records that failed (empty when all landed)."""
        refused = self.rejected.get(batch.run_id)
        if refused is not None:
            return self._fail_all(batch, refused, True)
        err = self._attempt(lambda: self.sink.write_batch(batch))
        if err is None:
            self.stats.delivered += len(batch)
            self.stats.batches += 1
            return []
        if getattr(err, "whole_run", False):
            reason = f"run refused by the store: {err}"
            self.rejected[batch.run_id] = reason
            log.error("mlflow-er: %r refuses run %s (%s); its remaining records fail without being sent",
                      self.sink, batch.run_id, err)
            return self._fail_all(batch, reason, True)
        if err.transient or len(batch) == 1:
            # A transient failure past the deadline fails the whole batch: bisecting would
            # only multiply requests to a server that is not answering.
            return self._fail_all(batch, str(err), not err.transient)
        # Permanent failure of a merged batch: split it to find the offending record(s) and
        # deliver everything else, in order.
        records = list(batch.records())
        mid = len(records) // 2
        return self.deliver(Batch.of(batch.run_id, records[:mid])) + self.deliver(
            Batch.of(batch.run_id, records[mid:]))

    def deliver_artifact(self, artifact: Artifact) -> list[FailedRecord]:
        """Upload one artifact snapshot; return a failure entry if it could not be stored."""
        refused = self.rejected.get(artifact.run_id)
        err = SinkError(refused) if refused else self._attempt(lambda: self.sink.write_artifact(artifact))
        if err is None:
            self.stats.artifacts += 1
            self.stats.delivered += 1
            return []
        self.stats.failed += 1
        key = artifact.name or (artifact.local_path or "?").rsplit("/", 1)[-1]
        return [FailedRecord("artifact", key, str(err), artifact.run_id, permanent=not err.transient)]
