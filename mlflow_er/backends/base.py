"""The backend contract: a backend only moves records to one delivery target, the Pipeline.

A tracker (or a tracking-URI scheme) builds a :class:`~mlflow_er.pipeline.Pipeline` for its
sinks and calls :meth:`Backend.open` with it, then :meth:`Backend.submit` once per record on
the caller's thread — that call is the hot path and must be cheap. How records travel
(inline, from a writer thread, from another process), how they are queued and batched and
what happens when the queue is full is the backend's business; where they land (per-sink
lanes, retries, bisection, artifacts, run start/end) is the pipeline's. This is the shape of
OpenTelemetry's ``BatchSpanProcessor(exporter)``.

:meth:`flush` and :meth:`close` raise :class:`~mlflow_er.errors.DeliveryError` for whatever
could not be delivered since the last time they raised, and never wait longer than their
``timeout``. See ``docs/plugins.md`` for a complete third-party backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..records import StreamItem
from ..staging import materialize as materialize  # 0.2's home of it; the pipeline's staging owns it now

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from ..sinks.base import Sink


class Backend:
    """Base class for backends."""

    #: The name users type to select the backend (the entry-point name).
    name: str = "backend"
    #: Whether log_artifact must snapshot files at call time. A backend that uploads before
    #: the log call returns (``sync``) sets this False and saves the copy.
    snapshots: bool = True
    pipeline: Pipeline

    def open(self, pipeline: Pipeline | Sequence[Sink]) -> None:
        """Attach the delivery target. Called before the first submit (and again after a close).

        A list of sinks (the 0.2 contract) is wrapped into a pipeline of those sinks.
        """
        from ..pipeline import Pipeline

        old = getattr(self, "pipeline", None)
        if old is not None and old is not pipeline:
            # Counters live in the pipeline; a backend's stats() stay cumulative across its pipelines.
            carried = getattr(self, "_carried", {})
            for k, v in old.stats().items():
                if isinstance(v, int) and not isinstance(v, bool):
                    carried[k] = carried.get(k, 0) + v
            self._carried = carried
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline(list(pipeline))

    def pipeline_stats(self) -> dict[str, Any]:
        """The pipeline's counters, added to those of the pipelines this backend delivered to before."""
        pipeline = getattr(self, "pipeline", None)
        out = pipeline.stats() if pipeline is not None else {"lanes": {}}
        for k, v in getattr(self, "_carried", {}).items():
            out[k] = out.get(k, 0) + v
        return out

    @property
    def sinks(self) -> list[Sink]:
        """The sinks of the pipeline this backend delivers to (empty before :meth:`open`)."""
        pipeline = getattr(self, "pipeline", None)
        return pipeline.sinks if pipeline is not None else []

    def submit(self, record: StreamItem) -> None:
        """Hand one validated, stamped record over. Called on the caller's thread."""
        raise NotImplementedError

    def submit_many(self, records: Sequence[StreamItem]) -> None:
        """Hand several records of one call over (``log_metrics`` and friends)."""
        for r in records:
            self.submit(r)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record submitted before the call is delivered or has failed."""
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:  # never opened: nothing was submitted
            pipeline.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop and close the pipeline. A closed backend may be opened again."""
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close(timeout)

    def stats(self) -> dict[str, Any]:
        """Health counters: queued, delivered, dropped (by reason), retries, failed, ..."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def backend_hooks(backend_name: str, factory: Callable[..., Backend]) -> tuple[Callable[..., Any], ...]:
    """The two plugin hooks of a module that provides one backend: ``names, make = backend_hooks(NAME, Cls)``.

    Assign them to module globals named ``mlflow_er_backend_names`` and ``mlflow_er_make_backend``
    (pluggy finds hook implementations by those names).
    """
    from ..hookspecs import hookimpl

    @hookimpl
    def mlflow_er_backend_names() -> list[str]:
        return [backend_name]

    @hookimpl
    def mlflow_er_make_backend(name: str, options: dict[str, Any]) -> Backend | None:
        return factory(**options) if name == backend_name else None

    return mlflow_er_backend_names, mlflow_er_make_backend
