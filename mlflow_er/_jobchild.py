"""Entry point of a process job: ``python -m mlflow_er._jobchild`` with a pickle on stdin."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any


def run_job(tracking_uri: str, run_id: str | None, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Make ``run_id`` the active run (without owning its lifecycle) and call ``fn``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if run_id is None:
        fn(*args, **kwargs)
        return
    mlflow.start_run(run_id=run_id, log_system_metrics=False)
    try:
        fn(*args, **kwargs)
    finally:
        # The parent owns the run: leave it RUNNING. Pop it from the fluent stack without
        # ending it so MLflow's atexit hook does not mark it FINISHED under the parent.
        from mlflow.tracking import fluent

        stack = getattr(fluent, "_active_run_stack", None)
        getter = getattr(stack, "get", None)
        runs = getter() if callable(getter) else stack
        if isinstance(runs, list):
            runs.clear()


def main() -> None:
    payload = pickle.load(sys.stdin.buffer)
    run_job(*payload)


if __name__ == "__main__":
    main()
