"""The ``sync`` backend: every log call is delivered before it returns.

It behaves like MLflow's default synchronous logging (and is the default backend, as in
the original helper) but still validates in the caller, splits at MLflow's limits and
retries transient failures under mlflow-er's own policy (the pipeline's).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..records import StreamItem
from .base import Backend, backend_hooks

NAME = "sync"


class SyncBackend(Backend):
    """Deliver on the caller's thread; raise :class:`DeliveryError` at once on failure.

    ``retry_deadline`` bounds how long one call may keep retrying a transient failure.
    """

    name = NAME
    snapshots = False  # uploaded before the call returns: nothing can change under us

    def __init__(self, retry_deadline: float = 60.0):
        self.retry_deadline = retry_deadline
        self._submitted = 0
        self._lock = threading.Lock()  # sinks are called from one thread at a time

    def open(self, pipeline: Any) -> None:
        super().open(pipeline)
        self.pipeline.policy.deadline = self.retry_deadline

    def submit(self, record: StreamItem) -> None:
        self.submit_many((record,))

    def submit_many(self, records: Sequence[StreamItem]) -> None:
        with self._lock:
            self._submitted += len(records)
            self.pipeline.deliver_now(records)

    def flush(self, timeout: float | None = None) -> None:
        """Everything is already delivered; ask each sink to make it durable (``Sink.flush``)."""
        with self._lock:
            self.pipeline.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            self.pipeline.close(timeout)

    def stats(self) -> dict[str, Any]:
        p = self.pipeline_stats()
        return {"backend": NAME, "queued": 0, "submitted": self._submitted,
                "delivered": p.get("delivered", 0), "failed": p.get("failed", 0), "retries": p.get("retries", 0),
                "batches": p.get("batches", 0), "artifacts": p.get("artifacts", 0),
                "dropped": {}, "dropped_total": 0,  # nothing queued, nothing dropped: a failure raises
                "oldest_unsent_age": 0.0, "lanes": p.get("lanes", {})}


mlflow_er_backend_names, mlflow_er_make_backend = backend_hooks(NAME, SyncBackend)
