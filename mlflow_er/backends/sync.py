"""The ``sync`` backend: every log call is delivered before it returns.

It behaves like MLflow's default synchronous logging (and is the default backend, as in
the original helper) but still validates in the caller, splits at MLflow's limits and
retries transient failures under mlflow-er's own policy.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .. import artifacts
from ..delivery import Deliverer, DeliveryStats, RetryPolicy
from ..errors import DeliveryError, FailedRecord
from ..hookspecs import hookimpl
from ..records import Artifact, Record, split_batches
from ..sinks.base import Sink
from .base import Backend, materialize

NAME = "sync"


class SyncBackend(Backend):
    """Deliver in the caller's thread; raise :class:`DeliveryError` at once on failure.

    ``retry_deadline`` bounds how long one call may keep retrying a transient failure.
    """

    name = NAME
    snapshots = False  # uploaded before the call returns: nothing can change under us

    def __init__(self, retry_deadline: float = 60.0):
        self.policy = RetryPolicy(deadline=retry_deadline)
        self._stats = DeliveryStats()
        self._deliverers: list[Deliverer] = []
        self._submitted = 0
        self._lock = threading.Lock()  # sinks are called from one thread at a time

    def open(self, sinks: Sequence[Sink]) -> None:
        super().open(sinks)
        self._deliverers = [Deliverer(s, self.policy, self._stats) for s in sinks]

    def submit(self, record: Record) -> None:
        self.submit_many((record,))

    def submit_many(self, records: Sequence[Record]) -> None:
        failed: list[FailedRecord] = []
        by_run: dict[str, list] = defaultdict(list)
        arts: list[Artifact] = []
        for r in records:
            (arts.append(r) if type(r) is Artifact else by_run[r.run_id].append(r))
        with self._lock:
            self._submitted += len(records)
            for d in self._deliverers:
                for run_id, recs in by_run.items():
                    for batch in split_batches(run_id, recs):
                        failed += d.deliver(batch)
            for a in arts:
                a = materialize(a)
                try:
                    for d in self._deliverers:
                        failed += d.deliver_artifact(a)
                finally:
                    if a.owned:
                        artifacts.discard(a.local_path)
        if failed:
            raise DeliveryError(failed)

    def flush(self, timeout: float | None = None) -> None:
        """Everything is already delivered; ask each sink to make it durable (``Sink.flush``)."""
        failed: list[FailedRecord] = []
        with self._lock:
            for d in self._deliverers:
                try:
                    d.sink.flush()
                except Exception as exc:  # a third-party sink may raise anything
                    failed.append(FailedRecord("sink", d.sink.name, f"flush failed: {type(exc).__name__}: {exc}"))
        if failed:
            raise DeliveryError(failed)

    def close(self, timeout: float | None = None) -> None:
        """Flush the sinks. They stay open: the tracker may open this backend again for its next run."""
        self.flush(timeout)

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {"backend": NAME, "queued": 0, "submitted": self._submitted,
                "delivered": s.delivered, "failed": s.failed, "retries": s.retries, "batches": s.batches,
                "dropped": {}, "dropped_total": 0,  # nothing queued, nothing dropped: a failure raises
                "oldest_unsent_age": 0.0}


@hookimpl
def mlflow_er_backend_names() -> list[str]:
    return [NAME]


@hookimpl
def mlflow_er_make_backend(name: str, options: dict[str, Any]) -> Backend | None:
    return SyncBackend(**options) if name == NAME else None
