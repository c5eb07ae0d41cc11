"""Exactly once without relying on the store to drop duplicate rows.

MLflow's SQL stores keep a metric row once per (key, timestamp, step, value), but the
``file:`` store (and any store behind a server that does the same) appends every row it
is sent: a re-sent batch doubles it. So ``mlflow-er sync`` never re-sends a record that
may have landed without first asking the store whether it did:

* before a chunk is sent, its *intent* (the byte range it covers) is saved in the
  segment's progress file; after it is delivered, the progress moves past it. A sync that
  finds an intent left by an interrupted one re-reads exactly that chunk and sends only
  what :func:`missing` says the store lacks.
* inside one sync, a batch whose request failed in a way that may have reached the store
  (timeout, reset, 5xx) is checked the same way before each retry (:class:`CheckedSink`).

The check: a metric is present when the run's history of its key holds a row with the
same timestamp, step and value; a param when the run has it with the same value. Tags
(last write wins), artifacts (same path, overwritten) and run status are idempotent and
always re-sent. Consequence (documented): two *identical* metric records (same key,
timestamp, step and value) in one interrupted chunk are stored once.
"""

from __future__ import annotations

import logging
from typing import Any

from ..delivery import classify
from ..errors import SinkError
from ..records import Artifact, Batch, Metric, Param
from ..sinks.base import Sink

log = logging.getLogger(__name__)


def missing(client: Any, batch: Batch) -> Batch:
    """The records of ``batch`` the store does not hold yet (a new :class:`Batch`, maybe empty)."""
    records = list(batch.records())
    keys = {r.key for r in records if type(r) is Metric}
    rows: dict[str, set[tuple[int, int, float]]] = {}
    for key in keys:
        rows[key] = {(m.timestamp, m.step, m.value) for m in client.get_metric_history(batch.run_id, key)}
    params: dict[str, str] = {}
    if any(type(r) is Param for r in records):
        params = dict(client.get_run(batch.run_id).data.params)
    keep = []
    for r in records:
        if isinstance(r, Metric) and (r.timestamp, r.step, r.value) in rows[r.key]:
            continue
        if isinstance(r, Param) and params.get(r.key) == r.value:
            continue
        keep.append(r)
    if len(keep) < len(records):
        log.info("mlflow-er sync: %d of %d record(s) of run %s were already stored; not re-sent",
                 len(records) - len(keep), len(records), batch.run_id)
    return Batch.of(batch.run_id, keep)


class CheckedSink(Sink):
    """Wraps the MLflow sink: a batch retried after a failure that may have landed is checked first.

    ``last_error`` is the last failure seen (as a :class:`SinkError`), so the replay can tell
    a store that answers with its own error for one batch from a store that is down.
    """

    def __init__(self, inner: Sink, client: Any):
        self.inner = inner
        self.client = client
        self.last_error: SinkError | None = None
        self._suspect: Batch | None = None

    def write_batch(self, batch: Batch) -> None:
        send = batch
        if self._suspect is batch:
            send = missing(self.client, batch)
            if not len(send):
                self._suspect = None
                return
        try:
            self.inner.write_batch(send)
        except Exception as exc:
            self.last_error = classify(exc)
            if self.last_error.transient:
                self._suspect = batch  # it may have been stored before the failure reached us
            raise
        self._suspect = None

    def write_artifact(self, artifact: Artifact) -> None:
        try:
            self.inner.write_artifact(artifact)
        except Exception as exc:
            self.last_error = classify(exc)
            raise

    def __repr__(self) -> str:
        return repr(self.inner)
