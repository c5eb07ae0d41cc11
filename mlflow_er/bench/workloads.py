"""The workloads. Each runs in a fresh child process for one contender and returns its figures.

- ``latency``: caller cost of ``log_metric`` (p50/p99/max, µs) in a tight loop, the writer busy;
- ``throughput``: metrics + params/tags delivered to the store per second (until flushed);
- ``seed``: the original example's loop (compute, metric, image, big file; best model at the end);
- ``memory``: peak RSS growth over many calls with the writer stalled, per backpressure policy;
- ``loop``: wall time a Python-bound training loop loses per metric (see :mod:`.loop`);
- ``flaky``: caller latency and delivery over time while the server is killed and restarted
  (see :mod:`.flaky`; needs ``--start-server``).
"""

from __future__ import annotations

import gc
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .contenders import Contender, Context, RawSession, open_session, remove_run_artifacts

WORKLOADS = ("latency", "throughput", "seed", "memory", "loop", "flaky")
METRIC_KEYS = [f"m{i}" for i in range(10)]
# Sessions entered and never left (latency, memory): referenced here so that garbage
# collection does not close them, which would wait for a backlog or a stalled writer.
_ABANDONED: list[Any] = []


@dataclass(frozen=True)
class Sizes:
    """How big each workload is. :data:`FULL` is the default, :data:`QUICK` the smoke-test mode."""

    latency_calls: int = 20_000
    latency_budget_s: float = 3.0  # caller time cap: slow contenders stop early (p50/p99 stay exact)
    throughput_metrics: int = 50_000
    throughput_params_tags: int = 200  # half params, half tags
    throughput_per_call_metrics: int = 500  # for contenders sending one request per call
    throughput_budget_s: float = 30.0  # caller time cap while logging
    seed_epochs: int = 5
    seed_compute_s: float = 0.2
    seed_file_mb: int = 32
    memory_calls: int = 1_000_000
    memory_mlflow_calls: int = 30_000  # MLflow async costs ~100 µs per call; growth is also given per call
    memory_max_queue: int | None = None  # None: the backend's default bounds
    block_timeout_s: float = 1.0
    loop_steps: int = 6_000  # per window: 1.2 s of ~200 µs steps, 30,000 metrics
    loop_pairs: int = 1  # logged/bare window pairs per child (L B, then B L, ...)
    loop_bare_first: bool = False  # set on odd repetitions, so the order alternates across children too
    loop_budget_s: float = 2.5  # a slow contender's logged window stops near this (fewer steps)
    loop_drain_timeout_s: float = 60.0
    flaky_seconds: float = 12.0  # logging at a steady rate while the server is killed and restarted
    flaky_kill_at_s: float = 4.0
    flaky_down_s: float = 3.0  # how long the server stays dead before the restart begins
    flaky_after_s: float = 6.0  # logging goes on this long after the restarted server answers
    flaky_max_seconds: float = 120.0  # ... but never longer than this
    flaky_flush_timeout_s: float = 40.0
    task_timeout_s: float = 600.0


FULL = Sizes()
QUICK = Sizes(latency_calls=1_000, latency_budget_s=0.1, throughput_metrics=1_000, throughput_params_tags=20,
              throughput_per_call_metrics=10, throughput_budget_s=2.0, seed_epochs=2, seed_compute_s=0.02,
              seed_file_mb=1, memory_calls=10_000, memory_mlflow_calls=1_000, memory_max_queue=2_000,
              block_timeout_s=0.2, loop_steps=400, loop_pairs=1, loop_budget_s=0.15, loop_drain_timeout_s=10.0,
              flaky_seconds=8.0, flaky_kill_at_s=2.0, flaky_down_s=1.0, flaky_after_s=3.0, flaky_max_seconds=60.0,
              flaky_flush_timeout_s=20.0,
              task_timeout_s=120.0)


def applies(workload: str, c: Contender) -> bool:
    """Whether ``workload`` is meaningful for contender ``c``."""
    if c.kind == "raw":
        return workload == "throughput"
    if c.kind == "peer":
        return workload == "loop"
    if workload == "flaky":  # background delivery to the server: MLflow async and mlflow-er's to the mlflow sink
        if c.kind == "er":
            return c.policy is None and not c.per_call and c.sink == "mlflow"
        return c.kind == "mlflow" and not c.synchronous and not c.env and not c.scheme
    if workload == "memory":
        return c.policy is not None or (c.kind == "mlflow" and not c.synchronous)
    return c.policy is None


def rss() -> int:
    """Resident set size of this process, in bytes."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _percentile(sorted_ns: list[int], q: float) -> float:
    n = len(sorted_ns)
    return sorted_ns[min(n - 1, int(n * q))] / 1000.0


# -- latency ---------------------------------------------------------------------------------
def latency(c: Contender, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """Time every ``log_metric`` call of a tight loop (the writer drains meanwhile)."""
    cm = open_session(c, ctx)
    s = cm.__enter__()  # never left: the child exits without waiting for the backlog to drain
    _ABANDONED.append(cm)
    metric = s.metric
    for i in range(20):  # warm-up: key caches, first-call imports
        metric("warmup", float(i), i)
    n = sizes.latency_calls
    lat = array("q", bytes(8 * n))
    clock = time.perf_counter_ns
    deadline = clock() + int(sizes.latency_budget_s * 1e9)
    done = n
    for i in range(n):
        t0 = clock()
        metric("lat", float(i), i)
        t1 = clock()
        lat[i] = t1 - t0
        if t1 > deadline:  # every call: a slow contender stops right at the budget
            done = i + 1
            break
    samples = sorted(lat[:done])
    return {"p50_us": _percentile(samples, 0.5), "p99_us": _percentile(samples, 0.99),
            "max_us": samples[-1] / 1000.0, "calls": done}


# -- throughput ------------------------------------------------------------------------------
def throughput(c: Contender, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """Deliver metrics plus params/tags; report records per second until everything is flushed."""
    n = sizes.throughput_per_call_metrics if c.per_call else sizes.throughput_metrics
    # keep the mix of the full workload: 200 params/tags per 50 k metrics
    extra = max(2, round(sizes.throughput_params_tags * n / sizes.throughput_metrics))
    n_params, n_tags = extra // 2, extra - extra // 2
    with open_session(c, ctx) as s:
        t0 = time.perf_counter()
        if isinstance(s, RawSession):
            sent = s.log_all(n, METRIC_KEYS, n_params, n_tags)
            logged = time.perf_counter()
        else:
            sent = _log_mix(s.metric, s.param, s.tag, n, n_params, n_tags, t0 + sizes.throughput_budget_s)
            logged = time.perf_counter()
            s.flush(sizes.task_timeout_s)
        t1 = time.perf_counter()
        stats = s.stats()
    out = {"records": sent, "seconds": t1 - t0, "records_per_s": sent / (t1 - t0), "log_seconds": logged - t0}
    if stats:
        out["failed"] = stats.get("failed", 0)
    return out


def _log_mix(metric: Callable[..., Any], param: Callable[..., Any], tag: Callable[..., Any], n: int,
             n_params: int, n_tags: int, deadline: float) -> int:
    """Log ``n`` metrics over 10 keys with params and tags spread evenly; stop at ``deadline``."""
    every = max(1, n // max(1, max(n_params, n_tags)))
    nk = len(METRIC_KEYS)
    p = t = 0
    for i in range(n):
        metric(METRIC_KEYS[i % nk], float(i), i // nk)
        if i % every == 0:
            if p < n_params:
                param(f"p{p}", p)
                p += 1
            if t < n_tags:
                tag(f"t{t}", t)
                t += 1
        if not i & 63 and time.perf_counter() > deadline:
            return i + 1 + p + t
    return n + p + t


# -- seed ------------------------------------------------------------------------------------
def seed(c: Contender, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """The original example: per epoch compute, a metric, a 480×640 image and a big file; then the model."""
    import numpy as np

    rng = np.random.default_rng(0)
    work = Path.cwd() / "seed"  # the task's own folder
    work.mkdir(parents=True, exist_ok=True)
    big = work / "huge_file.bin"
    with open(big, "wb") as f:
        chunk = bytes(1024 * 1024)
        for _ in range(sizes.seed_file_mb):
            f.write(chunk)
    model = work / "best_model.npz"
    np.savez_compressed(model, weights=rng.random((100, 100, 100)).astype(np.float16))
    blocked = 0.0
    with open_session(c, ctx) as s:
        start = time.perf_counter()
        for epoch in range(sizes.seed_epochs):
            time.sleep(sizes.seed_compute_s)  # "GPU time"
            loss = float(rng.random())
            image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
            t0 = time.perf_counter()
            s.metric("cool_loss", loss, epoch)
            s.image(image, "cool_image.png")
            s.artifact(str(big))
            blocked += time.perf_counter() - t0
        t0 = time.perf_counter()
        s.artifact(str(model))
        blocked += time.perf_counter() - t0
        loop_end = time.perf_counter()
        run_id = s.run_id
    end = time.perf_counter()  # the session is closed: everything is in the store
    remove_run_artifacts(ctx, run_id)
    return {"blocked_s": blocked, "wall_s": end - start, "compute_s": loop_end - start - blocked,
            "end_s": end - loop_end}


# -- memory ----------------------------------------------------------------------------------
def memory(c: Contender, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """Peak RSS growth while logging with a writer that never delivers."""
    from ..errors import QueueFull

    opts: dict[str, Any] = {}
    calls = sizes.memory_calls
    if c.kind == "er":
        opts = {"on_full": c.policy, "block_timeout": sizes.block_timeout_s}
        if sizes.memory_max_queue is not None:
            opts["max_queue"] = sizes.memory_max_queue
    else:
        calls = sizes.memory_mlflow_calls
    cm = open_session(c, ctx, backend_options=opts)
    s = cm.__enter__()  # never left: the writer is stalled, the child just exits
    _ABANDONED.append(cm)
    s.stall()
    metric = s.metric
    gc.collect()
    base = peak = rss()
    queue_full = 0
    done = i = 0
    t0 = time.perf_counter()
    try:
        for start in range(0, calls, 10_000):
            stop = min(calls, start + 10_000)
            for i in range(start, stop):
                metric("mem", float(i), i)
            done = stop
            peak = max(peak, rss())
    except QueueFull:
        queue_full = 1
        done = i
    seconds = time.perf_counter() - t0
    peak = max(peak, rss())
    stats = s.stats()
    growth = peak - base
    out = {"calls": done, "rss_growth_mb": growth / 2**20, "queue_full": queue_full,
           "dropped": stats.get("dropped_total", 0), "seconds": seconds}
    if c.kind == "mlflow":  # unbounded: growth is linear in calls, so extrapolating is fair
        out["bytes_per_call"] = growth / max(1, done)
        out["projected_1m_mb"] = growth / max(1, done) * 1_000_000 / 2**20
    return out


# -- loop --------------------------------------------------------------------------------------
def loop(c: Contender, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """Wall time lost per metric by a Python-bound loop; the run is ended after the windows (untimed)."""
    from .loop import run_loop

    cm = open_session(c, ctx)
    s = cm.__enter__()
    out = run_loop(s, sizes.loop_steps, sizes.loop_pairs, sizes.loop_budget_s, sizes.loop_drain_timeout_s,
                   sizes.loop_bare_first)
    if "drain_error" in out:  # a writer that cannot drain would hold the run's end too
        _ABANDONED.append(cm)
        return out
    t0 = time.perf_counter()
    cm.__exit__(None, None, None)
    out["end_s"] = time.perf_counter() - t0
    return out


def flaky(c: Contender, ctx: Context, sizes: Sizes) -> dict[str, Any]:
    """See :func:`mlflow_er.bench.flaky.run_flaky`."""
    from .flaky import run_flaky

    return run_flaky(c, ctx, sizes)


RUNNERS: dict[str, Callable[[Contender, Context, Sizes], dict[str, Any]]] = {
    "latency": latency, "throughput": throughput, "seed": seed, "memory": memory, "loop": loop, "flaky": flaky}


def sizes_for(quick: bool, **overrides: Any) -> Sizes:
    """The sizes for a run: quick or full, with command-line overrides (``None`` values ignored)."""
    base = QUICK if quick else FULL
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
