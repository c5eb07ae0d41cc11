"""Every pluggy hook specification of mlflow-er, and the markers.

Hooks *resolve things*: they run when a tracker or run is set up, never once per
record (a pluggy call costs microseconds, a log call must not pay them).

Plugins are found through two entry-point groups, ``mlflow_er.backends`` and
``mlflow_er.sinks``; the entry-point name is the name users type and its value is a
module (or object) implementing some of the hooks below. Built-ins are declared the
same way in mlflow-er's own ``pyproject.toml``.

Evolution rule: a spec may gain new arguments (pluggy passes only those an
implementation names), it is never renamed and no argument is ever removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment

    from .backends.base import Backend
    from .sinks.base import Sink

PROJECT = "mlflow_er"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate plugin functions with this: ``@mlflow_er.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class SinkContext:
    """What a sink factory is told about the tracker that wants the sink."""

    tracking_uri: str
    experiment_id: str | None = None
    experiment_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@hookspec(firstresult=True)
def mlflow_er_resolve_experiment(
    client: MlflowClient,
    experiment_name: str | None,
    experiment_id: str | None,
    artifact_location: str | None,
    create_new: bool,
    tags: dict[str, str],
) -> Experiment | None:
    """Find or create the experiment a tracker logs to.

    Called once, when an ``ExperimentTracker`` is constructed. Receives the tracker's
    own ``MlflowClient`` (``None`` when the tracker is offline: resolve without a server)
    and the constructor's arguments (``tags`` already holds the
    ``git_commit`` tag for a new experiment). Returns an ``mlflow.entities.Experiment``,
    or ``None`` to let the next implementation decide. **First non-None result wins.**
    The built-in (``trylast``) finds by name, then by id, then creates (if allowed).
    """


@hookspec(firstresult=True)
def mlflow_er_resolve_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str | None,
    run_id: str | None,
    description: str | None,
    parent_run_id: str | None,
    tags: dict[str, str],
) -> str | None:
    """Return the id of the run a ``tracker.run(...)`` block logs to, creating it if needed.

    Called once per ``tracker.run()`` block, before it starts. Receives the tracker's
    client (``None`` when offline), the experiment id, the block's arguments and the id of the enclosing run for
    nested runs (else ``None``). Returns a run id (an existing run to resume, or one the
    implementation just created), or ``None`` to defer. **First non-None result wins.**
    The built-in (``trylast``) resumes a run found by name (newest first), then by id,
    else creates one.
    """


@hookspec(firstresult=True)
def mlflow_er_make_backend(name: str, options: dict[str, Any]) -> Backend | None:
    """Build the backend called ``name``.

    Called when a tracker is given a backend by name (``backend="threaded"`` or
    ``MLFLOW_ER_BACKEND``). ``options`` are keyword arguments for the backend's
    constructor (may be empty). Returns a new, unopened :class:`~mlflow_er.backends.base.Backend`
    if this plugin provides ``name``, else ``None``. **First non-None result wins.**
    """


@hookspec(firstresult=True)
def mlflow_er_make_sink(name: str, context: SinkContext) -> Sink | None:
    """Build the sink called ``name``.

    Called once per sink name when a tracker is constructed. ``context`` tells the
    tracking URI, the experiment and sink options. Returns a new
    :class:`~mlflow_er.sinks.base.Sink` if this plugin provides ``name``, else ``None``.
    **First non-None result wins.**
    """


@hookspec(firstresult=True)
def mlflow_er_sink_needs_server(name: str) -> bool | None:
    """Tell whether the sink called ``name`` needs the tracking server.

    Called while a tracker is constructed, before anything is resolved, once per sink
    name. Returns ``False`` for a sink that works without a server (the ``spool``),
    ``True`` if it needs one, ``None`` if this plugin does not provide ``name``.
    **First non-None result wins**; no answer counts as ``True``. When every sink of a
    tracker answers ``False`` the tracker runs *offline*: it never contacts the server,
    and the resolve hooks receive ``client=None``.
    """


@hookspec
def mlflow_er_backend_names() -> list[str]:  # type: ignore[empty-body]  # a spec: never called
    """List the backend names this plugin can build.

    Called when names are listed (``mlflow-er plugins``, an unknown-name error). Returns
    a list of names. **All results are collected** (not firstresult).
    """


@hookspec
def mlflow_er_sink_names() -> list[str]:  # type: ignore[empty-body]  # a spec: never called
    """List the sink names this plugin can build.

    Called when names are listed (``mlflow-er plugins``, an unknown-name error). Returns
    a list of names. **All results are collected** (not firstresult).
    """
