"""The backend contract: a backend owns the travel from a log call to the sinks.

A tracker builds (or is given) one backend, calls :meth:`Backend.open` with its sinks,
then :meth:`submit` once per record on the caller's thread — that call is the hot path
and must be cheap. :meth:`flush` and :meth:`close` raise
:class:`~mlflow_er.errors.DeliveryError` for whatever could not be delivered since the
last time they raised, and never wait longer than their ``timeout``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .. import artifacts
from ..records import Artifact, Record
from ..sinks.base import Sink


class Backend:
    """Base class for backends."""

    #: The name users type to select the backend (the entry-point name).
    name: str = "backend"
    #: Whether log_artifact must snapshot files at call time. A backend that uploads before
    #: the log call returns (``sync``) sets this False and saves the copy.
    snapshots: bool = True

    def open(self, sinks: Sequence[Sink]) -> None:
        """Attach the sinks records go to. Called by the tracker before the first submit."""
        self.sinks = list(sinks)

    def submit(self, record: Record) -> None:
        """Hand one validated, stamped record over. Called on the caller's thread."""
        raise NotImplementedError

    def submit_many(self, records: Sequence[Record]) -> None:
        """Hand several records of one call over (``log_metrics`` and friends)."""
        for r in records:
            self.submit(r)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record submitted before the call is delivered or has failed."""

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop. A closed backend may be opened again by the tracker."""

    def stats(self) -> dict[str, Any]:
        """Health counters: queued, delivered, dropped (by reason), retries, failed, ..."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def materialize(artifact: Artifact) -> Artifact:
    """Make an artifact ready to upload: render a payload into a file, check a linked snapshot."""
    if artifact.payload is None:
        if artifact.fingerprint and artifact.local_path:
            artifacts.verify(artifact.local_path, artifact.is_dir, artifact.fingerprint)
        return artifact
    kind, content = artifact.payload
    path = artifacts.render(kind, content, artifact.name or "artifact")
    return artifact._replace(local_path=path, payload=None, owned=True, size=os.path.getsize(path))
