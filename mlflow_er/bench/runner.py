"""Run each (workload, contender) in a fresh child process, interleaved over repetitions.

Children are forked by :mod:`~mlflow_er.bench.zygote`, a helper that imported MLflow
once, so every task starts in a clean process (its own MLflow state, async queue,
environment and RSS) in milliseconds instead of the ~1.5 s an interpreter needs to
import MLflow. A child's stdout/stderr go to a log file so MLflow's chatter never mixes
with the report.
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .contenders import Contender, Context, probe
from .workloads import RUNNERS, Sizes
from .zygote import read_msg, write_msg

EXPERIMENT = "mlflow-er-bench"


@dataclass
class Task:
    """One job for a child: ``"setup"`` or a workload name, for one contender."""

    job: str
    ctx: Context
    sizes: Sizes
    log_path: str
    contender: Contender | None = None
    experiment_artifact_location: str | None = None
    cwd: str | None = None  # the child's working folder (a sink may write relative paths there)


def _template_path() -> Path:
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlflow-er"
    return cache / f"bench-empty-sqlite-mlflow-{mlflow.__version__}.db"


def _fresh_sqlite(uri: str) -> None:
    """Give a new SQLite store its tables from a cached empty one (creating them takes ~6 s).

    The first run creates the tables with MLflow's migrations and keeps a copy (this user's
    cache folder, 0700/0600, one per MLflow version); later runs copy it.
    """
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    if db.exists():
        return
    template = _template_path()
    if template.is_file():
        shutil.copyfile(template, db)
        return
    MlflowClient(uri).search_experiments()  # runs the migrations
    try:
        template.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        shutil.copyfile(db, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, template)
    except OSError:  # no cache folder: every run migrates, slower but correct
        pass


def _setup(task: Task) -> dict[str, Any]:
    """Create (or find) the benchmark's experiment, then probe every backend and sink."""
    from mlflow import MlflowClient
    from mlflow.entities import LifecycleStage

    _fresh_sqlite(task.ctx.uri)
    client = MlflowClient(task.ctx.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None and exp.lifecycle_stage == LifecycleStage.ACTIVE:
        exp_id = exp.experiment_id
    else:
        name = EXPERIMENT if exp is None else f"{EXPERIMENT}-{int(time.time())}"
        exp_id = client.create_experiment(name, artifact_location=task.experiment_artifact_location)
    task.ctx.experiment_id = exp_id
    out = probe(task.ctx)
    out["experiment_id"] = exp_id
    return out


def execute(task: Task) -> dict[str, Any]:
    """Run ``task`` in this process (a fresh child) and return its result."""
    if task.job == "setup":
        return _setup(task)
    assert task.contender is not None
    return RUNNERS[task.job](task.contender, task.ctx, task.sizes)


def _tail(path: str, n_bytes: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
    return env


class Zygote:
    """The parent's handle on the helper process that forks the task children."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.fork = hasattr(os, "fork")

    def start(self) -> Zygote:
        """Start the helper (it imports MLflow in the background while the parent goes on)."""
        if self.fork and (self.proc is None or self.proc.poll() is not None):
            with open(os.path.join(self.log_dir, "zygote.log"), "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "mlflow_er.bench.zygote"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                             cwd=self.log_dir, env=_child_env())
        return self

    def run(self, task: Task, timeout: float) -> tuple[bool, Any]:
        """Run ``task`` in a fresh child: ``(True, result)`` or ``(False, error text)``; never past ``timeout``."""
        result_path = task.log_path + ".result"
        try:
            os.remove(result_path)
        except FileNotFoundError:
            pass
        error = self._run_forked(task, result_path, timeout) if self.fork else \
            self._run_spawned(task, result_path, timeout)
        if error:
            return False, f"{error}\n{_tail(task.log_path)}".rstrip()
        try:
            with open(result_path, "rb") as f:
                status, payload = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            return False, f"no result from the child ({exc}):\n{_tail(task.log_path)}"
        return status == "ok", payload

    def _run_forked(self, task: Task, result_path: str, timeout: float) -> str | None:
        self.start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            write_msg(self.proc.stdin, (task, result_path))  # type: ignore[arg-type]  # IO[bytes] is binary
            msg = read_msg(fd, 120.0)  # the first request also waits for the helper's imports
        except (OSError, TimeoutError) as exc:
            self.close()
            return f"the fork helper did not answer ({type(exc).__name__})"
        if msg is None:
            self.close()
            return f"the fork helper exited; see {os.path.join(self.log_dir, 'zygote.log')}"
        pid = msg[1]
        try:
            msg = read_msg(fd, timeout)
        except TimeoutError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                read_msg(fd, 30.0)
            except TimeoutError:
                self.close()
            return f"timed out after {timeout:.0f}s (child killed)"
        if msg is None:
            self.close()
            return "the fork helper exited while the task ran"
        return None if msg[1] == 0 else f"child exited with code {msg[1]}"

    def _run_spawned(self, task: Task, result_path: str, timeout: float) -> str | None:
        task_path = task.log_path + ".task"
        with open(task_path, "wb") as f:
            pickle.dump(task, f)
        try:
            code = subprocess.run([sys.executable, "-m", "mlflow_er.bench.zygote", "--once", task_path, result_path],
                                  timeout=timeout, env=_child_env(), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f}s (child killed)"
        return None if code == 0 else f"child exited with code {code}"

    def close(self) -> None:
        """Stop the helper (closing its stdin ends it; killed if it does not go)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


@dataclass
class Plan:
    """What to run: workloads in order, the contenders of each, and how many repetitions."""

    workloads: list[str]
    contenders: dict[str, list[Contender]]
    repeat: int
    sizes: Sizes


@dataclass
class Outcome:
    """Raw per-repetition results and the failures."""

    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: the flaky workload's timeline per contender (one repetition: it is a picture, not a statistic)
    timelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def run_plan(plan: Plan, ctx: Context, zygote: Zygote, log_dir: str, progress: Callable[[str], None],
             keep: bool = False, server: Any = None, helpers: list[Zygote] | None = None) -> Outcome:
    """Run every workload × contender, interleaved (A B A B …) over ``plan.repeat`` repetitions.

    Each task runs in its own fresh folder (removed afterwards unless ``keep``), so files a
    sink writes relative to the working directory (a spool, say) never pile up. The
    ``flaky`` workload runs once per contender (first repetition), alone, with a
    :class:`~mlflow_er.bench.flaky.FlakyDirector` killing and restarting ``server``.
    With ``helpers`` (more fork helpers) a repetition's other tasks run that many more at a
    time (``--quick``: figures not judged); repetitions still follow one another, so the
    per-repetition pairing of ratios holds.
    """
    out = Outcome({w: {c.name: [] for c in plan.contenders[w]} for w in plan.workloads})
    started = time.perf_counter()
    lock = threading.Lock()
    pool: queue.Queue[Zygote] = queue.Queue()
    for z in [zygote, *(helpers or [])]:
        pool.put(z)
    n = 0
    for rep in range(plan.repeat):
        batch: list[tuple[str, Contender, int]] = []
        for workload in plan.workloads:
            if workload == "flaky" and (rep > 0 or server is None):
                continue
            for c in plan.contenders[workload]:
                n += 1
                batch.append((workload, c, n))
        alone = [b for b in batch if b[0] == "flaky"]
        together = [b for b in batch if b[0] != "flaky"]

        def one(item: tuple[str, Contender, int], rep: int = rep) -> None:
            z = pool.get()
            try:
                _run_one(item, rep, plan, ctx, z, log_dir, progress, keep, server, out, lock)
            finally:
                pool.put(z)
        if pool.qsize() > 1 and len(together) > 1:
            with ThreadPoolExecutor(pool.qsize(), thread_name_prefix="bench-task") as ex:
                list(ex.map(one, together))
        else:
            for item in together:
                one(item)
        for item in alone:
            one(item)
    out.seconds = time.perf_counter() - started
    return out


def _run_one(item: tuple[str, Contender, int], rep: int, plan: Plan, ctx: Context, zygote: Zygote, log_dir: str,
             progress: Callable[[str], None], keep: bool, server: Any, out: Outcome, lock: threading.Lock) -> None:
    """Run one task in a fresh child and record its result (or its failure) in ``out``."""
    from .flaky import FlakyDirector

    workload, c, n = item
    label = f"{workload}-{c.name.replace('/', '_')}-{rep}"
    cwd = os.path.join(ctx.workdir, "tasks", f"{n:03d}-{label}")
    os.makedirs(cwd)
    sizes = replace(plan.sizes, loop_bare_first=bool(rep % 2)) if workload == "loop" else plan.sizes
    task = Task(workload, ctx, sizes, os.path.join(log_dir, label + ".log"), c, cwd=cwd)
    t0 = time.perf_counter()
    director = FlakyDirector(server, cwd, plan.sizes) if workload == "flaky" else None
    if director is not None:
        director.start()
    ok, payload = zygote.run(task, plan.sizes.task_timeout_s)
    took = time.perf_counter() - t0
    if not keep:
        shutil.rmtree(cwd, ignore_errors=True)
    with lock:
        if director is not None:
            parent_half = director.finish()
            if ok:
                timeline = payload.pop("timeline", {})
                timeline.update(parent_half)
                timeline.update({k: payload[k] for k in ("logged", "missing", "duplicates", "flush_s",
                                                          "flush_error") if k in payload})
                timeline["stored_count"] = payload.get("stored")  # "stored" holds the polls
                out.timelines[c.name] = timeline
        if ok:  # texts (a drain that timed out, say) become notes; the figures stay numbers
            out.notes.extend(f"{workload}: {c.name}: {k}: {v}" for k, v in payload.items()
                             if isinstance(v, str) and v and k != "run_id")
            payload = {k: v for k, v in payload.items() if not isinstance(v, (str, dict, list))}
            out.results[workload][c.name].append(payload)
            progress(f"[{rep + 1}/{plan.repeat}] {workload:<10} {c.name:<28} {took:6.1f}s")
        else:
            out.errors.append({"workload": workload, "contender": c.name, "repetition": rep,
                               "error": str(payload)})
            first = str(payload).strip().splitlines()[-1] if str(payload).strip() else "?"
            progress(f"[{rep + 1}/{plan.repeat}] {workload:<10} {c.name:<28} FAILED: {first}")
