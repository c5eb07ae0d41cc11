"""The sink contract: as small as an HTTP transport.

A sink is told to write a :class:`~mlflow_er.records.Batch` (one run, within MLflow's
``log_batch`` limits) or one :class:`~mlflow_er.records.Artifact` (a local file or folder
already snapshotted). It raises on failure: a :class:`~mlflow_er.errors.SinkError` with
``transient=True`` when retrying may help (the backend retries with backoff), anything
else is taken as permanent (the backend bisects the batch to find the bad record).
A backend calls ``write_batch`` from one thread at a time and ``write_artifact`` from
one thread at a time, but the two may run concurrently (the threaded backend uploads
artifacts on their own thread so a large file does not hold metrics back).
"""

from __future__ import annotations

from types import TracebackType

from ..records import Artifact, Batch


class Sink:
    """Base class for sinks. Override :meth:`write_batch` and :meth:`write_artifact`."""

    #: The name users type to select the sink (the entry-point name).
    name: str = "sink"
    #: False for a sink that works with no tracking server (a tracker whose sinks all say
    #: False runs offline). Sinks built by name answer through ``mlflow_er_sink_needs_server``.
    needs_server: bool = True

    def start_run(self, run_id: str, *, run_name: str | None = None, parent_run_id: str | None = None,
                  description: str | None = None, tags: dict[str, str] | None = None) -> None:
        """A run block started (called before its first record). Optional: the default does nothing."""

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """A run block ended, after its records were delivered. Optional: the default does nothing."""

    def write_batch(self, batch: Batch) -> None:
        """Store every record of ``batch``; raise if any could not be stored."""
        raise NotImplementedError

    def write_artifact(self, artifact: Artifact) -> None:
        """Store the file or folder at ``artifact.local_path`` under ``artifact.artifact_path``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable (no-op for sinks that write through)."""

    def close(self) -> None:
        """Release resources. The sink is not used after this."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
