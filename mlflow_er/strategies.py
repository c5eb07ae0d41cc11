"""Which backend and sinks a tracker uses: from its arguments, else the environment, else the defaults.

``backend`` is a name (``"sync"``, ``"threaded"``, a third-party entry point) or a
:class:`~mlflow_er.backends.base.Backend` instance (``MLFLOW_ER_BACKEND`` sets the default);
``sinks`` is a list of names or :class:`~mlflow_er.sinks.base.Sink` instances, or one
comma-separated string (``MLFLOW_ER_SINKS`` sets the default). Names are built through the
plugins (:mod:`mlflow_er.plugins`), so a built-in and a third-party strategy go through one door.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .backends.base import Backend
from .errors import MlflowErError
from .sinks.base import Sink

DEFAULT_BACKEND = "sync"
DEFAULT_SINKS = ("mlflow",)


def backend_name(backend: str | None) -> str:
    """The backend name to use: ``backend``, else ``$MLFLOW_ER_BACKEND``, else :data:`DEFAULT_BACKEND`."""
    return (backend or os.environ.get("MLFLOW_ER_BACKEND") or DEFAULT_BACKEND).strip()


def make_backend(backend: str | Backend | None, options: dict[str, Any]) -> Backend:
    """The backend instance: ``backend`` itself when it is one, else the plugin of :func:`backend_name`."""
    from . import plugins

    if isinstance(backend, Backend):
        return backend
    return plugins.make_backend(backend_name(backend), **options)


def sink_names(sinks: Sequence[str | Sink] | str | None) -> list[str | Sink]:
    """The sinks to use (names stripped, instances as given); raises if there is none."""
    if sinks is None:
        env = os.environ.get("MLFLOW_ER_SINKS")
        sinks = env if env else list(DEFAULT_SINKS)
    if isinstance(sinks, str):
        sinks = [s.strip() for s in sinks.split(",") if s.strip()]
    out = [s if isinstance(s, Sink) else str(s).strip() for s in sinks]
    if not out:
        raise MlflowErError("at least one sink is needed")
    return out


def needs_server(pm: Any, sink: str | Sink) -> bool:
    """Whether ``sink`` needs the tracking server (asked of its plugin before it is built; default True)."""
    if isinstance(sink, Sink):
        return bool(getattr(sink, "needs_server", True))
    answer = pm.hook.mlflow_er_sink_needs_server(name=sink)
    return True if answer is None else bool(answer)
