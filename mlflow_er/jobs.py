"""The original helper's ``background_worker`` jobs, made safe.

Thread jobs run as daemon threads. Process jobs never ``fork()`` a process whose other
threads may hold locks (the original helper deadlocked on an import lock inside
``mlflow.log_image`` that way): they start a fresh interpreter and pass the tracking URI
and run id explicitly. Every join is bounded and every failure is reported.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import FailedRecord

log = logging.getLogger(__name__)


def _active_run_for(run_id: str | None, tracking_uri: str) -> Any:
    """The caller's active MLflow run if it is ``run_id`` (read on the caller's thread)."""
    if run_id is None:
        return None
    import mlflow

    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        return current
    from mlflow import MlflowClient
    from mlflow.tracking.fluent import ActiveRun

    return ActiveRun(MlflowClient(tracking_uri).get_run(run_id))


def _thread_run_stack() -> list | None:
    # MLflow keeps the active-run stack per thread (a ThreadLocalVariable since 2.x); a
    # job thread starts with an empty one, so fluent calls would open a stray run.
    from mlflow.tracking import fluent

    stack = getattr(fluent, "_active_run_stack", None)
    getter = getattr(stack, "get", None)
    runs = getter() if callable(getter) else stack
    return runs if isinstance(runs, list) else None


class _ThreadJob:
    def __init__(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, active: Any = None):
        self.name = name
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs, active), daemon=True,
                                       name=f"mlflow-er-job-{name}")

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, active: Any) -> None:
        # Make the tracker's run active in this thread (without owning its lifecycle) so
        # fluent ``mlflow.log_*`` calls in the job land in it, as they did in the seed.
        stack = _thread_run_stack() if active is not None else None
        pushed = stack is not None and not stack
        if pushed:
            stack.append(active)  # type: ignore[union-attr]  # pushed implies a stack
        try:
            fn(*args, **kwargs)
        except BaseException as exc:  # reported at join time, never lost
            self.error = exc
        finally:
            if pushed and stack and stack[-1] is active:
                stack.pop()

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None) -> str | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            return f"still running after {timeout:.1f}s"
        return f"{type(self.error).__name__}: {self.error}" if self.error else None


class _ProcessJob:
    """A job in a fresh interpreter: ``python -m mlflow_er._jobchild`` reading a pickle from stdin.

    Functions defined in the user's ``__main__`` cannot be unpickled by a fresh
    interpreter; for those we use multiprocessing's ``spawn`` context, which re-imports
    the main module (so the script needs the usual ``if __name__ == "__main__"`` guard).
    """

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict, tracking_uri: str,
                 run_id: str | None):
        self.name = name
        payload = (tracking_uri, run_id, fn, args, kwargs)
        self.proc: Any
        self._err = tempfile.TemporaryFile()
        if getattr(fn, "__module__", None) == "__main__":
            from ._jobchild import run_job

            ctx = multiprocessing.get_context("spawn")
            self.proc = ctx.Process(target=run_job, args=payload, daemon=True, name=f"mlflow-er-job-{name}")
            self.proc.start()
            self._mp = True
        else:
            blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc = subprocess.Popen([sys.executable, "-m", "mlflow_er._jobchild"], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=self._err, env=os.environ.copy())
            # Feed stdin from a thread: a big payload would otherwise block the caller
            # until the child has read it.
            threading.Thread(target=self._feed, args=(blob,), daemon=True).start()
            self._mp = False

    def _feed(self, blob: bytes) -> None:
        try:
            self.proc.stdin.write(blob)
            self.proc.stdin.close()
        except OSError:
            pass  # the child died; its exit code tells the story

    def join(self, timeout: float | None) -> str | None:
        if self._mp:
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
                return f"still running after {timeout:.1f}s; terminated"
            code = self.proc.exitcode
        else:
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                return f"still running after {timeout:.1f}s; killed"
        if code == 0:
            return None
        self._err.seek(0)
        tail = self._err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
        return f"process exited with code {code}" + (f": {tail[-1]}" if tail else "")


class JobRunner:
    """Runs named background jobs; a job with the same name waits for its predecessor."""

    def __init__(self) -> None:
        self._jobs: dict[str, _ThreadJob | _ProcessJob] = {}
        self._failures: list[FailedRecord] = []
        self._lock = threading.Lock()

    def submit(self, name: str, fn: Callable[..., Any], use_process: bool, args: tuple, kwargs: dict,
               tracking_uri: str, run_id: str | None, timeout: float | None = None) -> None:
        with self._lock:
            prev = self._jobs.get(name)
            if prev is not None:
                self._record(prev, prev.join(timeout))
            job: _ThreadJob | _ProcessJob
            if use_process:
                job = _ProcessJob(name, fn, args, kwargs, tracking_uri, run_id)
            else:
                job = _ThreadJob(name, fn, args, kwargs, _active_run_for(run_id, tracking_uri))
                job.start()
            self._jobs[name] = job

    def _record(self, job: _ThreadJob | _ProcessJob, problem: str | None) -> None:
        if problem:
            log.warning("background job %r failed: %s", job.name, problem)
            self._failures.append(FailedRecord("job", job.name, problem))

    def join_all(self, timeout: float | None = None) -> list[FailedRecord]:
        """Join every job within ``timeout`` seconds in total; return and forget the failures."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            jobs, self._jobs = self._jobs, {}
            for job in jobs.values():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._record(job, job.join(left))
            failures, self._failures = self._failures, []
        return failures
