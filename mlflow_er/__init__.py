"""mlflow-er: log ML experiments to MLflow without slowing training down.

>>> from mlflow_er import ExperimentTracker
>>> tracker = ExperimentTracker("exp", backend="threaded")          # doctest: +SKIP
>>> with tracker.run(run_name="r") as run:                           # doctest: +SKIP
...     run.log_metric("loss", 0.1, step=3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.base import Backend
from .errors import (
    BackendClosed,
    DeliveryError,
    ExperimentNotFound,
    FailedRecord,
    InvalidRecord,
    MlflowErError,
    QueueFull,
    RankTimeout,
    SinkError,
    TrackingUnavailable,
    UnknownPlugin,
)
from .hookspecs import SinkContext, hookimpl
from .records import Artifact, Batch, Metric, Param, Tag
from .run import Run
from .sinks.base import Sink

if TYPE_CHECKING:
    from .tracker import ExperimentTracker

__version__ = "0.2.0"

__all__ = [
    "Artifact", "Backend", "BackendClosed", "Batch", "DeliveryError", "ExperimentNotFound", "ExperimentTracker",
    "FailedRecord", "InvalidRecord", "Metric", "MlflowErError", "Param", "QueueFull", "RankTimeout", "Run", "Sink",
    "SinkContext", "SinkError", "Tag", "TrackingUnavailable", "UnknownPlugin", "hookimpl",
]


def __getattr__(name: str) -> Any:
    # ExperimentTracker imports mlflow at module level. MLflow itself imports this package
    # while `import mlflow` is still running (its `mlflow.tracking_store` entry points name
    # mlflow_er.mlflow_store), so nothing imported eagerly here may need mlflow yet.
    if name == "ExperimentTracker":
        from .tracker import ExperimentTracker

        return ExperimentTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "ExperimentTracker"])
