"""What ``tracker.run(...)`` returns, and how a resumed run is made visible.

``tracker.run()`` is a context manager: :class:`RunBlock` delegates ``with`` to it and, used
without ``with``, turns ``'_GeneratorContextManager' object has no attribute 'log_metric'``
into a ``TypeError`` that shows the ``with`` form. The resume helpers find the run a
``run_name``/``run_id`` would resume (to say so in one line), start a new one when
``resume=False``, and explain a param conflict in a resumed run.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from typing import Any

from .errors import InvalidRecord, MlflowErError


class RunBlock(AbstractContextManager):  # type: ignore[type-arg]
    """The value of ``tracker.run(...)``: use it as ``with tracker.run(...) as run:``."""

    def __init__(self, cm: AbstractContextManager[Any], run_name: str | None):
        self._cm = cm
        self._run_name = run_name

    def __enter__(self) -> Any:
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc)

    def __getattr__(self, attr: str) -> Any:
        # Only called for names this object lacks: log_metric, run_id, flush, stats, ...
        if attr.startswith("__"):
            raise AttributeError(attr)
        name = f"run_name={self._run_name!r}" if self._run_name else "..."
        raise TypeError(f"tracker.run() returns a context manager, not a run: it has no {attr!r}. "
                        f"Use it in a with block:\n    with tracker.run({name}) as run:\n        run.{attr}(...)")


def previous_run(client: Any, experiment_id: str, run_name: str | None, run_id: str | None) -> Any:
    """The stored run that a block with this ``run_name``/``run_id`` resumes, or None (one or two requests)."""
    if client is None or not (run_name or run_id):
        return None
    from .resolve import find_run_id

    _, found = find_run_id(client, experiment_id, run_name, run_id)
    if not found:
        return None
    try:
        return client.get_run(found)
    except Exception:  # the resolver decides; this lookup is only for the message
        return None


def resume_line(run: Any, by_name: bool) -> str:
    """One line saying a run was resumed: its status, how many metrics and params it already has."""
    info, data = run.info, run.data
    metrics = len(data.metrics) if data else 0
    params = len(data.params) if data else 0
    how = f"found by run_name {info.run_name!r}" if by_name else "found by run_id"
    return (f"mlflow-er: resuming run {info.run_name!r} (id {info.run_id}; {how}; status {info.status}, "
            f"{metrics} metric key(s), {params} param(s) already logged) — new values are appended; "
            f"pass resume=False to start a new run")


def new_run(client: Any, experiment_id: str, run_name: str | None, run_id: str | None,
            description: str | None, parent_run_id: str | None, tags: dict[str, str]) -> str:
    """Start a new run even if one with this name exists (``tracker.run(..., resume=False)``)."""
    if run_id:
        raise MlflowErError(f"resume=False with run_id={run_id!r}: a run id names an existing run; "
                            "drop run_id to start a new run, or drop resume=False to resume it")
    if client is None:  # offline: sync creates it
        return uuid.uuid4().hex
    from .resolve import create_run

    return create_run(client, experiment_id, run_name, parent_run_id)


def explain_param_conflicts(handle: Any, run_name: str | None, by_name: bool) -> None:
    """Make a param conflict in a resumed run say that it was resumed and how to start a new run."""
    original = handle._param

    def _param(key: str, value: Any) -> Any:
        try:
            return original(key, value)
        except InvalidRecord as exc:
            if exc.field != f"param {key!r}" or "already logged" not in exc.problem:
                raise
            how = f"tracker.run(run_name={run_name!r}, resume=False)" if run_name else "tracker.run() without run_id"
            found = f"by its name {run_name!r}" if by_name and run_name else "by its id"
            raise InvalidRecord(exc.field, f"{exc.problem}; this run ({handle.run_id}) was resumed, found "
                                f"{found}, and keeps the params it had. To start a new run: {how} "
                                "or another run_name", exc.limit) from None

    handle._param = _param
