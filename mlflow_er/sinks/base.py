"""The sink contract: as small as an HTTP transport.

Only :meth:`Sink.write_batch` is required: store a :class:`~mlflow_er.records.Batch` (one
run, within MLflow's ``log_batch`` limits) or raise — a :class:`~mlflow_er.errors.SinkError`
with ``transient=True`` when retrying may help (the pipeline retries with backoff), anything
else is permanent (the pipeline bisects the batch to isolate the bad record). A
``SinkError`` with ``whole_run=True`` says the destination refuses the run itself.

Optional capabilities, used only when a subclass overrides them:

* :meth:`Sink.write_artifact` — store a file or folder (a snapshot the pipeline already
  rendered and verified). A sink without it is simply not given artifacts.
* :meth:`Sink.start_run` / :meth:`Sink.end_run` — the run's start and end, which travel in
  the same ordered stream as its records (``end_run`` comes after every record and artifact
  of the run).
* :meth:`Sink.flush` (make durable) and :meth:`Sink.close` (release).

Threads: the :class:`~mlflow_er.pipeline.Pipeline` is the only caller. Each sink has its
own lane: ``write_batch``, ``start_run`` and ``end_run`` are called from one thread at a time
(the lane's), ``write_artifact`` from one other thread at a time (the lane's artifact
thread, so a big file never holds metrics back), ``flush``/``close`` from the thread that
flushes or closes, never concurrently with each other. With the ``sync`` backend all of
them run on the caller's thread.
"""

from __future__ import annotations

from types import TracebackType

from ..records import MAX_METRICS_PER_BATCH, Artifact, Batch


class Sink:
    """Base class for sinks. Override :meth:`write_batch`; the rest is optional (module docstring)."""

    #: How the sink is shown (reprs, stats, errors). For a sink built by name, the name users
    #: type is the one its plugin answers to in ``mlflow_er_make_sink``; keep the two equal.
    name: str = "sink"
    #: False for a sink that works with no tracking server (a tracker whose sinks all say
    #: False runs offline). Asked before a sink is built through ``mlflow_er_sink_needs_server``;
    #: a plugin can answer that hook from this attribute (see docs/plugins.md).
    needs_server: bool = True
    #: True for a sink whose writes survive a crash once :meth:`flush` returns (the spool):
    #: the pipeline writes it first, on the delivering thread, ahead of every other sink.
    durable: bool = False
    #: The most metrics one ``write_batch`` may carry; the lane joins metrics-only batches up to it.
    max_metrics_per_write: int = MAX_METRICS_PER_BATCH

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


def handles_artifacts(sink: Sink) -> bool:
    """Whether ``sink`` implements :meth:`Sink.write_artifact` (else it is not given artifacts)."""
    return _overrides(sink, "write_artifact")


def handles_runs(sink: Sink) -> bool:
    """Whether ``sink`` implements :meth:`Sink.start_run` or :meth:`Sink.end_run`."""
    return _overrides(sink, "start_run") or _overrides(sink, "end_run")


def _overrides(sink: object, method: str) -> bool:
    mine = getattr(type(sink), method, None)
    return mine is not None and mine is not getattr(Sink, method, None)
