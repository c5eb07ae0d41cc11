"""The plugin manager: built lazily, loads strategies by entry point.

Entry-point groups ``mlflow_er.backends`` and ``mlflow_er.sinks`` hold one entry per
strategy name; mlflow-er's own built-ins are declared there too, so there is exactly one
door. ``MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD=1`` loads only mlflow-er's own entries.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import UnknownPlugin

log = logging.getLogger(__name__)

GROUPS = {"backend": "mlflow_er.backends", "sink": "mlflow_er.sinks"}
OWN_DISTRIBUTION = "mlflow-er"
#: mlflow-er's own strategies, ``(kind, name, module)``: the same as its entry points in
#: pyproject.toml (a test checks the two agree). Registered from here only when mlflow-er runs
#: from a source tree that was never installed, so its entry points are not visible.
BUILTIN_PLUGINS: tuple[tuple[str, str, str], ...] = (
    ("backend", "sync", "mlflow_er.backends.sync"),
    ("backend", "threaded", "mlflow_er.backends.threaded"),
    ("backend", "process", "mlflow_er.backends.process"),
    ("sink", "mlflow", "mlflow_er.sinks.mlflow"),
    ("sink", "spool", "mlflow_er.sinks.spool"),
)
_RESOLVER = "mlflow_er.resolve"


@dataclass(frozen=True)
class PluginInfo:
    """One strategy name and where it comes from."""

    kind: str
    name: str
    distribution: str
    plugin: str


_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_dists: dict[str, str] = {}  # pluggy plugin name -> distribution name


def autoload_disabled() -> bool:
    """True when ``MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD`` asks for built-ins only."""
    return os.environ.get("MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() in {"1", "true", "yes", "on"}


def _ep_dist(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown"


def _register(pm: pluggy.PluginManager, plugin: object, name: str, dist: str) -> None:
    if pm.is_registered(plugin):
        return  # one module may serve several entry points
    pm.register(plugin, name=name)
    _dists[name] = dist


def _load(pm: pluggy.PluginManager) -> None:
    builtins_only = autoload_disabled()
    seen_own = {"backend": False, "sink": False}
    for kind, group in GROUPS.items():
        for ep in entry_points(group=group):
            dist = _ep_dist(ep)
            own = dist.lower().replace("_", "-") == OWN_DISTRIBUTION
            seen_own[kind] |= own
            if builtins_only and not own:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the rest
                warnings.warn(
                    f"mlflow-er: could not load {kind} plugin {ep.name!r} (entry point {ep.value!r}) "
                    f"from distribution {dist!r}: {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            _register(pm, plugin, f"{group}:{ep.name}", dist)
    for kind, name, modname in BUILTIN_PLUGINS:
        if not seen_own[kind]:
            _register(pm, importlib.import_module(modname), f"{GROUPS[kind]}:{name}", OWN_DISTRIBUTION)
    _register(pm, importlib.import_module(_RESOLVER), _RESOLVER, OWN_DISTRIBUTION)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built (and plugins loaded) on first use."""
    global _pm
    if _pm is None:
        with _lock:
            if _pm is None:
                pm = pluggy.PluginManager(hookspecs.PROJECT)
                pm.add_hookspecs(hookspecs)
                _load(pm)
                pm.check_pending()
                _pm = pm
    return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager so the next use reloads entry points (for tests and notebooks)."""
    global _pm
    with _lock:
        _pm = None
        _dists.clear()


def list_plugins() -> list[PluginInfo]:
    """Every backend and sink name, with the distribution that provides it."""
    pm = get_plugin_manager()
    out: list[PluginInfo] = []
    for kind, hook in (("backend", pm.hook.mlflow_er_backend_names), ("sink", pm.hook.mlflow_er_sink_names)):
        for impl in hook.get_hookimpls():
            names: list[str] = impl.function() or []  # type: ignore[assignment]
            for name in names:
                out.append(PluginInfo(kind, name, _dists.get(impl.plugin_name, "(registered at runtime)"),
                                      impl.plugin_name))
    return sorted(out, key=lambda p: (p.kind, p.name))


def available_names(kind: str) -> list[str]:
    """Names of every ``kind`` (``"backend"`` or ``"sink"``) the installed plugins provide."""
    return sorted({p.name for p in list_plugins() if p.kind == kind})


def make_backend(name: str, **options: Any):
    """Build a backend by name, or raise :class:`UnknownPlugin` listing the names there are."""
    backend = get_plugin_manager().hook.mlflow_er_make_backend(name=name, options=options)
    if backend is None:
        raise UnknownPlugin("backend", name, available_names("backend"))
    return backend


def make_sink(name: str, context: hookspecs.SinkContext):
    """Build a sink by name, or raise :class:`UnknownPlugin` listing the names there are."""
    sink = get_plugin_manager().hook.mlflow_er_make_sink(name=name, context=context)
    if sink is None:
        raise UnknownPlugin("sink", name, available_names("sink"))
    return sink
