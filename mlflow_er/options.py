"""Check ``backend_options`` / ``sink_options`` keys before anything is built, so a typo names the valid keys.

A backend's or sink's valid keys are its class's
``options`` (a ``frozenset[str]``) when it declares one; for mlflow-er's own backends and sinks, else their
constructor's keyword parameters minus those the tracker fills from the
:class:`~mlflow_er.hookspecs.SinkContext`. A third-party plugin that declares no ``options`` is not
checked (its factory may use the options dict as a whole), nor is a class taking ``**kwargs``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import MlflowErError

#: Filled by the tracker from the SinkContext, never by the user.
_CONTEXT_PARAMS = frozenset({"self", "tracking_uri", "experiment_id", "experiment_name", "context"})


class UnknownOption(MlflowErError, TypeError):
    """An option key that the chosen backend or sink does not take (also a ``TypeError``, as before)."""


def _plugin_class(kind: str, name: str) -> tuple[type | None, bool]:
    """The class a plugin module provides for ``name`` (its ``name`` attribute), and whether it is built in."""
    from . import plugins
    from .backends.base import Backend
    from .sinks.base import Sink

    base: type = Backend if kind == "backend" else Sink
    for info in plugins.list_plugins():
        if info.kind != kind or info.name != name:
            continue
        module = plugins.get_plugin_manager().get_plugin(info.plugin)
        if module is None:
            continue
        if isinstance(module, str):
            module = importlib.import_module(module)
        own = info.distribution == plugins.OWN_DISTRIBUTION
        for obj in vars(module).values() if hasattr(module, "__dict__") else ():
            if (inspect.isclass(obj) and issubclass(obj, base) and obj is not base
                    and getattr(obj, "name", None) == name):
                return obj, own
    return None, False


def accepted(cls: type, declared: bool = True) -> frozenset[str] | None:
    """The keyword options ``cls`` takes, or None when it takes any (``**kwargs``)."""
    if declared:
        opts = getattr(cls, "options", None)
        if isinstance(opts, (frozenset, set, tuple, list)):
            return frozenset(opts)
    try:
        sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return frozenset(names - _CONTEXT_PARAMS)


def _complain(what: str, name: str, unknown: Iterable[str], valid: Iterable[str], arg: str) -> UnknownOption:
    valid = sorted(valid)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return UnknownOption(f"{arg}: {what} {name!r} takes no option {', '.join(parts)}; "
                         f"valid options: {', '.join(valid) or 'none'}")


def _check(kind: str, name: str, options: Mapping[str, Any], arg: str) -> None:
    """Raise :class:`UnknownOption` for a key of ``options`` the ``kind`` (backend/sink) ``name`` does not take.

    Only mlflow-er's own classes and those declaring ``options`` are checked: a third-party
    factory may use its options in its own way.
    """
    cls, own = _plugin_class(kind, name)
    if cls is None or not (own or isinstance(getattr(cls, "options", None), (frozenset, set, tuple, list))):
        return
    valid = accepted(cls)
    if valid is None:
        return
    unknown = set(options) - valid
    if unknown:
        raise _complain(kind, name, unknown, valid, arg)


def check_backend(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`UnknownOption` for a ``backend_options`` key the backend ``name`` does not take."""
    if options:
        _check("backend", name, options, "backend_options")


def check_sinks(sink_names: Iterable[str], sink_options: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise :class:`UnknownOption` for options of a sink that is not used, or keys it does not take."""
    if not sink_options:
        return
    names = list(sink_names)
    for sink, opts in sink_options.items():
        if sink not in names:
            close = difflib.get_close_matches(str(sink), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownOption(f"sink_options: {sink!r} is not one of this tracker's sinks {names}{hint}; "
                                f"options apply to a sink chosen by name in sinks=[...]")
        if not isinstance(opts, Mapping):
            raise UnknownOption(f"sink_options[{sink!r}] must be a dict of options, got {type(opts).__name__}")
        _check("sink", sink, opts, "sink_options")
