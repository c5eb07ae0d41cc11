"""How a run block ends, bounded: deliver its records, then store its status in MLflow.

The tracker's ``_finish`` drives the order (jobs, end record, delivery, recap, status); the
steps that talk to the backend and to MLflow live here, each bounded by what is left of the
run's ``close_timeout``:

* :func:`deliver` — the last open run closes the shared backend (others only flush); a run
  that ends KILLED/FAILED first says, within a second, what it is still waiting for;
* :func:`end_mlflow_run` — take the run off MLflow's active-run stack wherever it is (blocks
  may end in any order) and :func:`set_status` on a thread of its own, waited for at most the
  budget (MLflow's own ``end_run`` waits as long as its HTTP retries take);
* :func:`run_error` — one :class:`~mlflow_er.errors.DeliveryError` for the job failures and the
  delivery problem of a run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from .errors import DeliveryError, FailedRecord

log = logging.getLogger(__name__)


def deliver(backend: Any, last: bool, deadline: float | None, status: str, shown_uri: str,
            keep_location: Callable[[], str]) -> DeliveryError | None:
    """Flush (``last``: close) ``backend`` by ``deadline``; return what could not be delivered, or None.

    ``shown_uri`` (password hidden) and ``keep_location()`` are named in the warning an
    interrupted run logs before it waits.
    """
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        if not last:
            backend.flush(left)
            return None
        first: DeliveryError | None = None
        if status != "FINISHED" and (left is None or left > 1.0):
            # Interrupted with records still queued: say what we are waiting for before waiting.
            try:
                backend.flush(1.0)
            except DeliveryError as exc:
                first = exc
                if exc.unsent:
                    log.warning("mlflow-er: sending %d record(s) to %s for up to %.0f s — Ctrl-C again to "
                                "stop now; unsent records will be kept in %s", exc.unsent, shown_uri,
                                max(0.0, (left or 0) - 1.0), keep_location())
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            backend.close(left)
        except DeliveryError as exc:
            if first is None:
                return exc
            merged = DeliveryError([*first.failed, *exc.failed], unsent=exc.unsent, message=str(exc))
            merged.kept_in = exc.kept_in
            return merged
        if first is not None and first.failed:
            return DeliveryError(first.failed)
    except DeliveryError as exc:
        return exc
    return None


def run_error(failures: Sequence[FailedRecord], problem: DeliveryError | None) -> DeliveryError | None:
    """The error a run's end raises for its background jobs' ``failures`` and the delivery ``problem``."""
    if not failures and not problem:
        return None
    error = DeliveryError([*failures, *(problem.failed if problem else [])],
                          unsent=problem.unsent if problem else 0,
                          message=str(problem) if problem and not failures else None)
    error.kept_in = problem.kept_in if problem else None
    return error


def end_mlflow_run(client: Any, uri: str, run_id: str, status: str, budget: float) -> None:
    """Take the run off MLflow's active-run stack (wherever it is) and store its status, bounded.

    MLflow's own ``end_run`` only ends the run on top of the stack and waits as long as its
    HTTP retries take; blocks may end in any order and a server may never answer.
    """
    import mlflow
    import mlflow.tracking.fluent as fluent

    stack_var = getattr(fluent, "_active_run_stack", None)
    stack = stack_var.get() if stack_var is not None else None
    if stack is None:  # an MLflow without the private stack: its own end_run, unbounded
        current = mlflow.active_run()
        if current is not None and current.info.run_id == run_id:
            mlflow.end_run(status)
        return
    mine = [i for i, r in enumerate(stack) if r.info.run_id == run_id]
    if not mine:
        return
    stack.pop(mine[-1])
    from mlflow.environment_variables import MLFLOW_RUN_ID

    MLFLOW_RUN_ID.unset()
    last = getattr(fluent, "_last_active_run_id", None)
    if last is not None and hasattr(last, "set"):
        last.set(run_id)
    monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)
    if monitor is not None:
        monitor.finish()
    set_status(client, uri, run_id, status, budget)


def set_status(client: Any, uri: str, run_id: str, status: str, budget: float) -> None:
    """``client.set_terminated`` on a thread of its own, waited for at most ``budget`` seconds."""
    errors: list[BaseException] = []
    secret = bool(urlsplit(uri).password)

    def terminate() -> None:
        # MLflow prints "View run ... at <tracking URI>" from set_terminated: never with a password.
        before = os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
        if secret:
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        try:
            client.set_terminated(run_id, status)
        except BaseException as exc:
            errors.append(exc)
        finally:
            if secret:
                if before is None:
                    os.environ.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)
                else:
                    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = before

    t = threading.Thread(target=terminate, name="mlflow-er-end-run", daemon=True)
    t.start()
    try:
        t.join(budget)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) while this status is in flight: let that request finish,
        # bounded, so a status the caller sends next (KILLED) cannot be overtaken by it.
        t.join(min(budget, 5.0))
        raise
    if t.is_alive():
        log.error("mlflow-er: the tracking server did not confirm run %s as %s within %.0f s; it may show "
                  "RUNNING until the server answers", run_id, status, budget)
    elif errors:
        log.error("mlflow-er: could not mark run %s as %s: %s", run_id, status, errors[0])
