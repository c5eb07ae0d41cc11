"""The contenders: MLflow's own modes, raw ``log_batch``, and every mlflow-er backend × sink.

A :class:`Contender` is plain data (it crosses into the child process). In the child,
:func:`open_session` turns it into a :class:`Session` — one live run with the same small
logging surface for every contender, so a workload is written once.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MLFLOW_SYNC = "mlflow-sync"
MLFLOW_ASYNC = "mlflow-async"
MLFLOW_ASYNC_BUF = "mlflow-async-buf1s"
RAW = "raw-log-batch"
#: Unchanged fluent ``mlflow.log_*`` code through the ``threaded+`` tracking-URI scheme.
MLFLOW_SCHEME = "mlflow-scheme-threaded"
MLFLOW_SCHEME_PROCESS = "mlflow-scheme-process"
#: The reference contenders ratios are computed against.
BASELINES = (MLFLOW_SYNC, MLFLOW_ASYNC, MLFLOW_ASYNC_BUF)
BUFFERING_ENV = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"
#: Backpressure policies (``on_full``) the memory workload tries on every backend.
POLICIES = ("block", "drop", "spill")


@dataclass
class Contender:
    """One way of getting records into MLflow.

    ``kind`` is ``"mlflow"`` (fluent API), ``"raw"`` (``MlflowClient.log_batch``), ``"er"``
    (an mlflow-er backend and sink) or ``"peer"`` (another library: W&B, tensorboardX).
    ``per_call`` marks contenders that send one request per log call, so the throughput
    workload gives them fewer records (it reports a rate).
    ``policy`` is the backpressure policy (``on_full``) for the memory workload.
    """

    name: str
    kind: str
    synchronous: bool = True
    env: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    sink: str | None = None
    per_call: bool = False
    policy: str | None = None
    scheme: str | None = None  # fluent MLflow on "<scheme>+<uri>" (kind "mlflow")

    def with_policy(self, policy: str) -> Contender:
        """This contender with backpressure policy ``policy`` (named ``NAME[policy]``)."""
        return Contender(f"{self.name}[{policy}]", self.kind, self.synchronous, dict(self.env), self.backend,
                         self.sink, self.per_call, policy, self.scheme)


def mlflow_contenders() -> list[Contender]:
    """MLflow sync, async, async with 1 s buffering, and raw ``log_batch``."""
    return [
        Contender(MLFLOW_SYNC, "mlflow", True, per_call=True),
        Contender(MLFLOW_ASYNC, "mlflow", False, per_call=True),
        # MLflow reads the variable in its logging loop on every iteration (not only when
        # the queue is created); each contender runs in its own process, so set it there.
        Contender(MLFLOW_ASYNC_BUF, "mlflow", False, env={BUFFERING_ENV: "1"}),
        Contender(RAW, "raw"),
        # MLflow's own per-call work (~100 µs and more) stays on the caller here, so it is
        # measured per call like the synchronous modes.
        Contender(MLFLOW_SCHEME, "mlflow", True, per_call=True, scheme="threaded"),
        Contender(MLFLOW_SCHEME_PROCESS, "mlflow", True, per_call=True, scheme="process"),
    ]


def er_contender(backend: str, sink: str) -> Contender:
    """The contender for an mlflow-er ``backend`` delivering to ``sink``."""
    return Contender(f"er-{backend}/{sink}", "er", backend=backend, sink=sink, per_call=backend == "sync")


#: ``er-threaded/mlflow`` with the SQL fast path off: metrics through MLflow's own ORM
#: ``log_batch``, as before issue 12 — the "before" of the same run (SQL stores only).
THREADED_ORM = "er-threaded/mlflow-orm"


def orm_contender() -> Contender:
    """``threaded`` → ``mlflow`` with ``MLFLOW_ER_SQL_FAST_PATH=0`` (each child sets its own environment)."""
    return Contender(THREADED_ORM, "er", env={"MLFLOW_ER_SQL_FAST_PATH": "0"}, backend="threaded", sink="mlflow")


@dataclass
class Context:
    """What a child needs to know about the store and the options given on the command line."""

    uri: str
    experiment_id: str
    workdir: str
    artifact_root: str | None = None
    sink_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    close_timeout: float = 300.0


def _stall(*_args: Any, **_kwargs: Any) -> None:
    """A store call that never returns: the writer behind it is stalled for good."""
    threading.Event().wait()


def scalar_step_logger(log_scalar: Callable[[str, float, int], Any],
                       keys: tuple[str, ...]) -> Callable[[int, float], None]:
    """The ``loop`` workload's step for a one-value-per-call API: ``log(step, value)`` calls
    ``log_scalar(key, value', step)`` once for each of the five ``keys``.

    Unrolled, with the keys bound once: the loop times this call, so it must cost only the
    calls it makes.
    """
    k0, k1, k2, k3, k4 = keys

    def step(i: int, v: float) -> None:
        log_scalar(k0, v, i)
        log_scalar(k1, v * 0.5, i)
        log_scalar(k2, v * 0.25, i)
        log_scalar(k3, v + 1.0, i)
        log_scalar(k4, v - 1.0, i)
    return step


class Session:
    """One live run. ``metric(key, value, step)`` is the hot call, bound once for speed."""

    metric: Callable[[str, float, int], Any]

    def param(self, key: str, value: Any) -> None:
        """Log a parameter."""
        raise NotImplementedError

    def tag(self, key: str, value: Any) -> None:
        """Set a tag."""
        raise NotImplementedError

    def image(self, image: Any, artifact_file: str) -> None:
        """Log an image (numpy array) as ``artifact_file``."""
        raise NotImplementedError

    def artifact(self, path: str) -> None:
        """Log a file artifact."""
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything logged is in the store."""

    def stall(self) -> None:
        """Make the writer behind this session stop delivering (for the memory workload)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be stalled")

    def stats(self) -> dict[str, Any]:
        """Counters the contender exposes (mlflow-er's ``stats()``), else empty."""
        return {}

    def delivered(self) -> int | None:
        """Records delivered so far, when the contender counts them (mlflow-er does), else ``None``."""
        value = self.stats().get("delivered")
        return int(value) if isinstance(value, (int, float)) else None

    def pending(self) -> int | None:
        """Records logged and not yet handed to the store, when that can be seen, else ``None``."""
        return None

    def step_logger(self, keys: tuple[str, ...]) -> Callable[[int, float], None]:
        """A function ``log(step, value)`` logging one metric per key (the ``loop`` workload's step)."""
        return scalar_step_logger(self.metric, keys)

    run_id: str = ""


class MlflowSession(Session):
    """MLflow's fluent API, synchronous or not."""

    def __init__(self, run_id: str, synchronous: bool, scheme: str | None = None):
        import mlflow

        self.run_id = run_id
        self.sync = synchronous
        self.scheme = scheme
        log_metric = mlflow.log_metric
        self.metric = lambda k, v, s: log_metric(k, v, s, synchronous)

    def param(self, key: str, value: Any) -> None:
        import mlflow

        mlflow.log_param(key, value, synchronous=self.sync)

    def tag(self, key: str, value: Any) -> None:
        import mlflow

        mlflow.set_tag(key, value, synchronous=self.sync)

    def image(self, image: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_image(image, artifact_file=artifact_file)

    def artifact(self, path: str) -> None:
        import mlflow

        mlflow.log_artifact(path)

    def flush(self, timeout: float | None = None) -> None:
        import mlflow

        if self.scheme:
            from .. import mlflow_store

            mlflow_store.flush(timeout)
        elif not self.sync:
            _bounded(mlflow.flush_async_logging, timeout)

    def pending(self) -> int | None:
        if self.scheme:
            queued = self.stats().get("queued")
            return int(queued) if isinstance(queued, (int, float)) else None
        if self.sync:
            return 0
        queue = _async_queue()
        if queue is None:
            return None
        try:  # the batches still waiting (one being sent is not counted: slightly optimistic)
            return sum(len(b.metrics) + len(b.params) + len(b.tags) for b in list(queue._queue.queue))
        except AttributeError:
            return None

    def stats(self) -> dict[str, Any]:
        if not self.scheme:
            return {}
        from .. import mlflow_store

        return next(iter(mlflow_store.stats().values()), {})

    def stall(self) -> None:
        queue = _async_queue()
        if queue is None or not hasattr(queue, "_logging_func"):
            raise NotImplementedError("this MLflow version has no AsyncLoggingQueue._logging_func to stall")
        queue._logging_func = _stall  # the queue's worker threads now hang in "log_batch"


def _async_queue() -> Any:
    """MLflow's async logging queue for the current tracking store, if it has one."""
    from mlflow.tracking._tracking_service.utils import _get_store

    return getattr(_get_store(), "_async_logging_queue", None)


def _bounded(fn: Callable[[], Any], timeout: float | None) -> None:
    """Call ``fn`` in a daemon thread; raise ``TimeoutError`` if it has not returned within ``timeout``."""
    box: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller
            box.append(exc)
    t = threading.Thread(target=target, daemon=True, name="bench-bounded")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout}s")
    if box:
        raise box[0]


class RawSession(Session):
    """``MlflowClient.log_batch`` with entities built by the caller: the store's own limit."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_all(self, n_metrics: int, keys: list[str], params: int, tags: int) -> int:
        """Send ``n_metrics`` metrics (1000 per call) and the params/tags (100 per call); return records sent."""
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        nk = len(keys)
        for start in range(0, n_metrics, 1000):
            batch = [Metric(keys[i % nk], float(i), ts, i // nk) for i in range(start, min(n_metrics, start + 1000))]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        for start in range(0, max(params, tags), 100):
            ps = [Param(f"p{i}", str(i)) for i in range(start, min(params, start + 100))]
            ts_ = [RunTag(f"t{i}", str(i)) for i in range(start, min(tags, start + 100))]
            self.client.log_batch(self.run_id, params=ps, tags=ts_, synchronous=True)
        return n_metrics + params + tags


class ErSession(Session):
    """An mlflow-er run (``tracker.run()``) on one backend and one sink."""

    def __init__(self, run: Any, tracker: Any):
        self.run = run
        self.tracker = tracker
        self.run_id = run.run_id
        self.metric = run.log_metric

    def param(self, key: str, value: Any) -> None:
        self.run.log_param(key, value)

    def tag(self, key: str, value: Any) -> None:
        self.run.set_tag(key, value)

    def image(self, image: Any, artifact_file: str) -> None:
        self.run.log_image(image, artifact_file)

    def artifact(self, path: str) -> None:
        self.run.log_artifact(path)

    def flush(self, timeout: float | None = None) -> None:
        self.run.flush(timeout)

    def pending(self) -> int | None:
        queued = self.stats().get("queued")
        return int(queued) if isinstance(queued, (int, float)) else None

    def stall(self) -> None:
        for sink in self.tracker.sinks:
            sink.write_batch = _stall
            sink.write_artifact = _stall

    def stats(self) -> dict[str, Any]:
        return self.run.stats()


@contextmanager
def open_session(c: Contender, ctx: Context, backend_options: dict[str, Any] | None = None,
                 run_name: str | None = None) -> Iterator[Session]:
    """Start a run for contender ``c`` and yield its :class:`Session`; leaving ends the run.

    ``backend_options`` are added to the command line's options for an mlflow-er backend.
    """
    name = run_name or f"bench-{c.name}-{os.getpid()}"
    for k, v in c.env.items():
        os.environ[k] = v
    if c.kind == "mlflow":
        import mlflow

        mlflow.set_tracking_uri(f"{c.scheme}+{ctx.uri}" if c.scheme else ctx.uri)
        with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=name) as active:
            yield MlflowSession(active.info.run_id, c.synchronous, c.scheme)
    elif c.kind == "raw":
        from mlflow import MlflowClient

        client = MlflowClient(ctx.uri)
        run = client.create_run(ctx.experiment_id, run_name=name)
        try:
            yield RawSession(client, run.info.run_id)
        finally:
            client.set_terminated(run.info.run_id)
    elif c.kind == "peer":
        from .peers import open_peer

        with open_peer(c.name, os.getcwd()) as peer:
            yield peer  # type: ignore[misc]  # a PeerSession offers what the loop workload uses
    elif c.kind == "er":
        from .. import plugins
        from ..tracker import ExperimentTracker

        assert c.backend is not None and c.sink is not None
        opts = {**ctx.backend_options.get(c.backend, {}), **(backend_options or {})}
        backend = plugins.make_backend(c.backend, **opts)
        tracker = ExperimentTracker(experiment_id=ctx.experiment_id, tracking_uri=ctx.uri, backend=backend,
                                    sinks=[c.sink], sink_options={c.sink: ctx.sink_options.get(c.sink, {})},
                                    close_timeout=ctx.close_timeout)
        with tracker.run(run_name=name) as er_run:
            yield ErSession(er_run, tracker)
    else:
        raise ValueError(f"unknown contender kind {c.kind!r}")


def remove_run_artifacts(ctx: Context, run_id: str) -> None:
    """Delete a finished run's artifacts from a local artifact root (they can be large)."""
    if not ctx.artifact_root or not run_id:
        return
    root = Path(ctx.artifact_root)
    for candidate in (root / run_id, root / ctx.experiment_id / run_id):
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)


def _let_go(backend: Any) -> None:
    """Close a backend built only to see that it can be (it may hold a thread or a process)."""
    close = getattr(backend, "close", None)
    if callable(close):
        try:
            close(timeout=5.0)
        except Exception:  # never opened: nothing to release, whatever it says
            pass


def probe(ctx: Context) -> dict[str, Any]:
    """In a child: list every backend and sink and try to build each with the options we have.

    Returns ``{"backends": [...], "sinks": [...], "policies": {backend: [on_full, ...]},
    "broken": {"backend:NAME": error, "policy:NAME[p]": error, ...}}``.
    """
    from .. import plugins
    from ..hookspecs import SinkContext

    infos = plugins.list_plugins()
    backends = sorted({p.name for p in infos if p.kind == "backend"})
    sinks = sorted({p.name for p in infos if p.kind == "sink"})
    broken: dict[str, str] = {}
    policies: dict[str, list[str]] = {}
    for name in backends:
        try:
            _let_go(plugins.make_backend(name, **ctx.backend_options.get(name, {})))
        except Exception as exc:
            broken[f"backend:{name}"] = f"{type(exc).__name__}: {exc}"
            continue
        for policy in POLICIES:  # backpressure policies this backend accepts (memory workload)
            try:
                _let_go(plugins.make_backend(name, **{**ctx.backend_options.get(name, {}), "on_full": policy}))
            except Exception as exc:
                broken[f"policy:{name}[{policy}]"] = f"{type(exc).__name__}: {exc}"
            else:
                policies.setdefault(name, []).append(policy)
    for name in sinks:
        try:
            sink = plugins.make_sink(name, SinkContext(ctx.uri, ctx.experiment_id, None,
                                                       dict(ctx.sink_options.get(name, {}))))
            sink.close()
        except Exception as exc:
            broken[f"sink:{name}"] = f"{type(exc).__name__}: {exc}"
    from .peers import installed_peers

    peers, peers_skipped, peer_versions = installed_peers()
    return {"backends": backends, "sinks": sinks, "broken": broken, "policies": policies,
            "peers": peers, "peers_skipped": peers_skipped, "peer_versions": peer_versions,
            "plugins": [{"kind": p.kind, "name": p.name, "distribution": p.distribution} for p in infos]}
