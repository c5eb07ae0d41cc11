"""What a rank other than a single process's gets: the inactive stand-ins and the shared-run handle.

Split from :mod:`mlflow_er.ranks` (which decides the roles); the names are re-exported there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .backends.base import Backend
from .errors import MlflowErError
from .records import Metric
from .records import StreamItem as Record  # what a backend is handed: records and run starts/ends
from .run import Run
from .validation import check_key

if TYPE_CHECKING:
    from .ranks import RankPlan


# -- what non-zero ranks get -------------------------------------------------------------------
class InactiveBackend(Backend):
    """The backend of an inactive rank: counts what it is given and keeps none of it."""

    name = "inactive"
    snapshots = False  # nothing is uploaded: don't copy the user's files

    def __init__(self, plan: RankPlan):
        self.plan = plan
        self.discarded = 0

    def submit(self, record: Record) -> None:
        self.discarded += 1

    def submit_many(self, records: Sequence[Record]) -> None:
        self.discarded += len(records)

    def stats(self) -> dict[str, Any]:
        return {**self.plan.info(), "backend": self.name, "queued": 0, "delivered": 0, "failed": 0, "retries": 0,
                "dropped": {}, "dropped_total": 0, "discarded": self.discarded, "oldest_unsent_age": 0.0}


class InactiveClient:
    """Stands in for ``tracker.client`` on an inactive rank: any use raises (it would reach the server)."""

    def __init__(self, plan: RankPlan):
        self._plan = plan

    def __getattr__(self, name: str) -> Any:
        raise MlflowErError(f"tracker.client.{name}: {self._plan.describe()} is inactive (ranks='zero'): "
                            "only rank 0 talks to the tracking server")

    def __repr__(self) -> str:
        return f"<InactiveClient {self._plan.describe()}>"


class _RankRun(Run):
    """A run handle of one rank of a distributed job: a :class:`Run` that knows its rank's ``plan``."""

    def __init__(self, *args: Any, plan: RankPlan, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan = plan


class InactiveRun(_RankRun):
    """A run handle that validates every call and discards the records (``ranks="zero"``, rank > 0)."""

    def _stored(self) -> Any:
        raise MlflowErError(f"{self.plan.describe()} is inactive (ranks='zero'): it has no run; rank 0 logs")

    def __repr__(self) -> str:
        return f"<mlflow_er.Run inactive, {self.plan.describe()}>"


class RankedRun(_RankRun):
    """A handle on the run all ranks share (``ranks="all"``): metric keys suffixed, rank 0 alone logs the rest."""

    def __init__(self, *args: Any, plan: RankPlan, **kwargs: Any):
        super().__init__(*args, plan=plan, **kwargs)
        self._suffix = f"/rank{plan.rank}"
        self._keys: dict[str, str] = {}
        self.discarded = 0
        if plan.rank != 0:
            self._snapshots = False  # its artifacts are discarded: don't copy them first
            self._submit = self._metrics_only
            self._submit_many = self._metrics_only_many

    def metric_key(self, key: str) -> str:
        """``key`` as stored for this rank: ``loss`` → ``loss/rank3``."""
        out = self._keys.get(key)
        if out is None:
            check_key(key, "metric key")  # the key as written first: its errors name what the user wrote
            out = check_key(key + self._suffix, "metric key")
            if len(self._keys) < 100_000:
                self._keys[key] = out
        return out

    def log_metric(self, key: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Log one metric value under ``key/rank{r}``."""
        super().log_metric(self.metric_key(key), value, step, timestamp)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    timestamp: int | None = None) -> None:
        """Log several metrics, each under ``key/rank{r}``; all are validated before any is queued."""
        super().log_metrics({self.metric_key(k): v for k, v in metrics.items()}, step, timestamp)

    def _metrics_only(self, record: Record) -> None:
        if type(record) is Metric:
            self._backend.submit(record)
        else:
            self.discarded += 1

    def _metrics_only_many(self, records: Sequence[Record]) -> None:
        keep = [r for r in records if type(r) is Metric]
        self.discarded += len(records) - len(keep)
        if keep:
            self._backend.submit_many(keep)

    def stats(self) -> dict[str, Any]:
        """The backend's counters and latency, plus the rank and (other ranks) records discarded."""
        return {**super().stats(), **self.plan.info(), "discarded": self.discarded}
