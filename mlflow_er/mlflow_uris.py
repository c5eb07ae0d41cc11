"""What a ``threaded+<uri>`` / ``spool+<uri>`` / ``process+<uri>`` tracking URI means to the rest of MLflow.

Artifacts and the model registry follow MLflow's tracking URI: ``mlflow-artifacts:``
repositories insist on an ``http(s)`` one, and the registry URI defaults to it. The
first time one of our stores is built, both are taught to use the *inner* URI. Imported
by MLflow during ``import mlflow`` (through :mod:`mlflow_er.mlflow_store`): no mlflow
import at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Scheme prefixes and what they add: ``threaded`` = mlflow sink; ``spool`` = spool + mlflow sinks;
#: ``process`` = mlflow sink, delivered from a spawned delivery process (the ``process`` backend).
MODES = ("threaded", "spool", "process")
#: The backend each prefix delivers with (by entry-point name).
BACKENDS = {"threaded": "threaded", "spool": "threaded", "process": "process"}


def split_uri(uri: str) -> tuple[str | None, str]:
    """``"threaded+http://h"`` -> ``("threaded", "http://h")``; a URI without our prefix -> ``(None, uri)``."""
    head, sep, rest = uri.partition("+")
    if sep and head in MODES and rest:
        return head, rest
    return None, uri


def inner_uri(uri: str | None) -> str | None:
    """The real store's URI behind one of our schemes (other URIs unchanged)."""
    return None if uri is None else split_uri(uri)[1]


_companions = False


def install_companions(store_builder: Callable[..., Any]) -> None:
    """Artifacts and the registry of our schemes use the inner URI (each time one of our stores is built).

    Idempotent and cheap (MLflow caches the stores it builds): a scheme registered after the first
    store was built (a plugin, a test) gets its registry store too.
    """
    global _companions
    try:
        if not _companions:
            _route_mlflow_artifacts()
            _companions = True
        _route_model_registry(store_builder)
    except Exception as exc:  # a later MLflow may move these internals; tracking still works
        _companions = True
        log.warning("mlflow-er: could not route artifacts/model registry to the inner URI: %s", exc)


def _route_mlflow_artifacts() -> None:
    """``mlflow-artifacts:`` repositories insist on an http(s) tracking URI: hand them the inner one."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry as registry

    original = registry._registry.get("mlflow-artifacts")
    if original is None or getattr(original, "_mlflow_er_original", None) is not None:
        return

    def mlflow_artifacts_repository(artifact_uri: str, tracking_uri: str | None = None,
                                    registry_uri: str | None = None) -> Any:
        from mlflow.tracking._tracking_service.utils import get_tracking_uri

        return original(artifact_uri, tracking_uri=inner_uri(tracking_uri or get_tracking_uri()),
                        registry_uri=inner_uri(registry_uri))

    mlflow_artifacts_repository._mlflow_er_original = original  # type: ignore[attr-defined]
    registry.register("mlflow-artifacts", mlflow_artifacts_repository)


def _route_model_registry(store_builder: Callable[..., Any]) -> None:
    """The registry URI defaults to the tracking URI: serve our schemes with the inner registry store."""
    from mlflow.tracking._model_registry.utils import _get_store_registry
    from mlflow.tracking._tracking_service import utils

    registry = _get_store_registry()
    for scheme, builder in list(utils._tracking_store_registry._registry.items()):
        if builder is store_builder and scheme not in registry._registry:
            registry.register(scheme, build_registry_store)


def build_registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    """The model registry store of the inner URI (registry writes are not run data: not routed)."""
    import inspect

    from mlflow.tracking._model_registry.utils import _get_store_registry

    inner = inner_uri(store_uri)
    builder = _get_store_registry().get_store_builder(inner)
    if "tracking_uri" in inspect.signature(builder).parameters:
        return builder(store_uri=inner, tracking_uri=inner_uri(tracking_uri))
    return builder(store_uri=inner)
