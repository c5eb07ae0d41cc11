"""Every exception mlflow-er raises, in one place.

All derive from :class:`MlflowErError` so ``except mlflow_er.MlflowErError`` catches
anything the library itself decided to raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class MlflowErError(Exception):
    """Root of every mlflow-er error."""


class InvalidRecord(MlflowErError, ValueError):
    """A log call was rejected in the caller, before anything was queued.

    ``field`` names what was wrong (``"metric key"``, ``"param value"``...),
    ``limit`` the rule it broke. Nothing logged before is affected.
    """

    def __init__(self, field: str, problem: str, limit: str | None = None):
        self.field = field
        self.problem = problem
        self.limit = limit
        msg = f"invalid {field}: {problem}"
        if limit:
            msg += f" (limit: {limit})"
        super().__init__(msg)


class QueueFull(MlflowErError):
    """The backend's buffer stayed full past ``block_timeout`` (``on_full="block"``)."""


class UnknownPlugin(MlflowErError, LookupError):
    """A backend or sink name that no installed plugin provides."""

    def __init__(self, kind: str, name: str, available: Sequence[str]):
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown {kind} {name!r}; available {kind}s: {listed}")


class TrackingUnavailable(MlflowErError, ConnectionError):
    """The tracking URI cannot be used: a missing local path or a server that does not answer."""

    #: What went wrong (set by :mod:`mlflow_er.probe`): ``"refused"``, ``"timeout"``, ``"dns"``,
    #: ``"tls"``, ``"scheme"``, ``"missing"`` or ``"error"``.
    kind: str = "error"


class ExperimentNotFound(MlflowErError, LookupError):
    """No experiment matched and creating one was not allowed (``create_new=False``)."""


@dataclass(frozen=True)
class FailedRecord:
    """One record that could not be delivered, and why."""

    kind: str  # "metric", "param", "tag", "artifact", "job"
    key: str
    reason: str
    run_id: str | None = None
    permanent: bool = True

    def __str__(self) -> str:
        run = f" run={self.run_id}" if self.run_id else ""
        return f"{self.kind} {self.key!r}{run}: {self.reason}"


def summarize(failed: Sequence[FailedRecord], limit: int = 20) -> str:
    """One line per distinct (kind, key, run, reason), with a count: 500 equal failures read as one."""
    groups: dict[tuple[str, str, str | None, str], int] = {}
    for f in failed:
        k = (f.kind, f.key, f.run_id, f.reason)
        groups[k] = groups.get(k, 0) + 1
    lines = []
    for (kind, key, run_id, reason), n in list(groups.items())[:limit]:
        run = f" run={run_id}" if run_id else ""
        lines.append(f"{kind} {key!r}{run}{f' x{n}' if n > 1 else ''}: {reason}")
    more = f" (+{len(groups) - limit} more kinds of failure)" if len(groups) > limit else ""
    return "; ".join(lines) + more


class DeliveryError(MlflowErError):
    """Raised by ``flush()``/``close()`` (or at once by the sync backend) for records not delivered.

    ``failed`` lists each failed record; ``unsent`` counts records still queued when a
    timeout ran out; ``kept_in`` names the folder they were kept in at a close (replay it with
    ``mlflow-er sync``), or is ``None``.
    """

    kept_in: str | None = None

    def __init__(self, failed: Sequence[FailedRecord] = (), unsent: int = 0, message: str | None = None):
        self.failed = list(failed)
        self.unsent = unsent
        if message is None:
            parts = []
            if self.failed:
                parts.append(f"{len(self.failed)} record(s) failed: {summarize(self.failed)}")
            if unsent:
                parts.append(f"{unsent} record(s) still unsent")
            message = "; ".join(parts) or "delivery failed"
        super().__init__(message)


class SinkError(MlflowErError):
    """A sink could not write. ``transient`` tells a backend whether retrying may help.

    ``whole_run``: the store no longer accepts writes to the batch's run (deleted, not found, not
    active), so every later record of that run would fail the same way: fail them in bulk instead
    of bisecting and retrying each.
    """

    def __init__(self, message: str, transient: bool = False, retry_after: float | None = None,
                 whole_run: bool = False):
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
        self.whole_run = whole_run


class BackendClosed(MlflowErError):
    """A record was submitted to a backend that has been closed for good."""


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM so runs unwind, flush (bounded) and end as KILLED."""


class RankTimeout(MlflowErError, TimeoutError):
    """With ``ranks="all"``, rank 0 did not share the experiment or run id in time (see :mod:`mlflow_er.ranks`)."""
