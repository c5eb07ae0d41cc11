"""Sinks a pipeline builds by name: made through the plugins, rebuilt after ``fork()``, closed with it.

A sink given by name (``sinks=["mlflow", "spool"]``) belongs to the pipeline built for it:
:func:`build` makes it through the plugin door and keeps how to make it again (a forked
child gets sinks of its own), and :meth:`~mlflow_er.pipeline.Pipeline.close` closes it with
:func:`close_sinks`. A :class:`~mlflow_er.sinks.base.Sink` instance belongs to the caller:
used as it is, never closed here.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import FailedRecord

if TYPE_CHECKING:
    from .delivery import RetryPolicy
    from .pipeline import Pipeline
    from .sinks.base import Sink


def build(specs: Sequence[str | Sink], context: Callable[[str], Any], *, policy: RetryPolicy | None = None,
          tracking_uri: str | None = None, **options: Any) -> Pipeline:
    """The one way to build a pipeline: sinks given by name are made through the plugins (and
    rebuilt after ``fork()``, closed with the pipeline); instances are used as they are.

    ``context(name)`` returns the :class:`~mlflow_er.hookspecs.SinkContext` for a sink name.
    """
    from . import plugins
    from .pipeline import Pipeline

    sinks: list[Sink] = []
    rebuild: list[Callable[[], Sink] | None] = []
    named: list[tuple[str, Any] | None] = []
    try:
        for spec in specs:
            if isinstance(spec, str):
                def make(name: str = spec) -> Sink:
                    return plugins.make_sink(name, context(name))

                sinks.append(make())
                rebuild.append(make)
                named.append((spec, context(spec)))
            else:
                sinks.append(spec)
                rebuild.append(None)
                named.append(None)
    except BaseException:
        for sink, r in zip(sinks, rebuild, strict=False):  # a later sink failed: release the earlier ones
            if r is not None:
                try:
                    sink.close()
                except Exception:
                    pass
        raise
    pipeline = Pipeline(sinks, policy=policy, rebuild=rebuild, tracking_uri=tracking_uri, **options)
    pipeline.specs = named
    return pipeline


def close_sinks(sinks: Sequence[tuple[str, Sink]], end: float) -> list[FailedRecord]:
    """Close each ``(name, sink)`` by ``end`` (``time.monotonic()``); a failure is returned, not raised."""
    failed: list[FailedRecord] = []
    for name, sink in sinks:
        try:
            close = sink.close
            if "timeout" in inspect.signature(close).parameters:  # the spool bounds its last uploads
                close(timeout=max(0.0, end - time.monotonic()))  # type: ignore[call-arg]
            else:
                close()
        except Exception as exc:  # a third-party sink may raise anything
            failed.append(FailedRecord("sink", name, f"close failed: {type(exc).__name__}: {exc}"))
    return failed
