"""The ``loop`` workload: what a Python-bound training loop loses to logging, per metric.

One step is ~200 µs of pure-Python work (it holds the interpreter lock, like a data
pipeline or a small model's Python overhead) followed by 5 metrics. In one child process,
windows *with* logging and *without* alternate (L B B L …, so a drift of the machine
cancels); both make the same function call per step, one that logs and one that does
nothing, and read the clock the same way. The loss is ``(wall L − wall B) / metrics``:
it includes the call and everything the contender's background threads take from the
interpreter lock *while the window runs* (a writer building batches, JSON, HTTP, SQL).

What is not counted: delivery still outstanding when a window ends. Each logged window
is long compared with the writers' flush intervals (0.25 s for mlflow-er's threaded
backend), so delivery runs during it; ``delivered_pct`` says how much of the window's
records were delivered by its end, and the drain after it (``drain_s``, untimed for the
loss) empties the queue so the next bare window is clean.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

KEYS = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s")
PER_STEP = len(KEYS)
STEP_TARGET_US = 200.0


def _work(n: int) -> int:
    """Pure-Python arithmetic that holds the interpreter lock for ~``n`` × 40 ns."""
    x = 0
    for j in range(n):
        x += j * j & 1023
    return x


def _nolog(i: int, v: float) -> None:
    """The bare window's stand-in for the logger: same call, no work."""


def calibrate(target_us: float = STEP_TARGET_US) -> int:
    """The ``_work`` size that takes ``target_us`` here and now (median of a few tries)."""
    n = 4000
    for _ in range(2):
        times = []
        for _ in range(7):
            t0 = time.perf_counter_ns()
            for _ in range(10):
                _work(n)
            times.append((time.perf_counter_ns() - t0) / 10_000)
        n = max(100, int(n * target_us / statistics.median(times)))
    return n


def window(steps: int, n: int, log: Callable[[int, float], None], start: int = 0) -> tuple[int, int]:
    """Run ``steps`` steps; return ``(wall ns, ns spent inside log calls)``."""
    clock = time.perf_counter_ns
    inside = 0
    t0 = clock()
    for i in range(start, start + steps):
        v = float(_work(n))
        c0 = clock()
        log(i, v)
        inside += clock() - c0
    return clock() - t0, inside


def run_loop(s: Any, steps: int, pairs: int, budget_s: float, drain_timeout_s: float,
             bare_first: bool = False) -> dict[str, Any]:
    """Measure an open session ``s`` (it has ``step_logger``, ``flush``, ``delivered``, ``pending``).

    Pair ``p`` runs L then B, or B then L when ``p + bare_first`` is odd.
    """
    n = calibrate()
    log = s.step_logger(KEYS)
    # Warm-up: first-call imports, key caches, the writer's first batch; then a clean queue.
    t0 = time.perf_counter()
    warm = 0
    while warm < 200 and (warm < 2 or time.perf_counter() - t0 < 0.03):
        window(1, n, log, warm)
        warm += 1
    per_step_s = (time.perf_counter() - t0) / warm
    _drain(s, drain_timeout_s)
    # A contender slower than the budget allows gets fewer steps (both windows alike).
    steps = max(3, min(steps, int(budget_s / max(per_step_s, 1e-9))))
    step_no = warm
    lost, pct, call, bare_step, delivered_pct, drains = [], [], [], [], [], []
    drain_errors: list[str] = []
    for p in range(pairs):
        walls: dict[str, int] = {}
        insides: dict[str, int] = {}
        for kind in (("L", "B") if (p + bare_first) % 2 == 0 else ("B", "L")):
            if kind == "B":
                walls["B"], insides["B"] = window(steps, n, _nolog, step_no)
                continue
            before = s.delivered()
            walls["L"], insides["L"] = window(steps, n, log, step_no)
            after, pending = s.delivered(), s.pending()  # as the window ends, before the drain
            logged = steps * PER_STEP
            if before is not None and after is not None:
                delivered_pct.append(100.0 * min(logged, after - before) / logged)
            elif pending is not None:
                delivered_pct.append(100.0 * max(0, logged - pending) / logged)
            d0 = time.perf_counter()
            err = _drain(s, drain_timeout_s)
            drains.append(time.perf_counter() - d0)
            if err:
                drain_errors.append(err)
            step_no += steps
        metrics = steps * PER_STEP
        diff = walls["L"] - walls["B"]
        lost.append(diff / metrics / 1000.0)
        pct.append(100.0 * diff / walls["B"])
        call.append((insides["L"] - insides["B"]) / metrics / 1000.0)
        bare_step.append(walls["B"] / steps / 1000.0)
    out: dict[str, Any] = {
        "lost_us_per_metric": statistics.median(lost), "lost_pct": statistics.median(pct),
        "call_us_per_metric": statistics.median(call), "step_us": statistics.median(bare_step),
        "metrics_per_window": steps * PER_STEP, "windows": pairs, "drain_s": statistics.median(drains),
        "work_n": n,
    }
    if delivered_pct:
        out["delivered_pct"] = statistics.median(delivered_pct)
    if drain_errors:
        out["drain_error"] = drain_errors[0]
    return out


def _drain(s: Any, timeout: float) -> str:
    """Flush ``s`` within ``timeout``; the error text if it could not."""
    try:
        s.flush(timeout)
    except Exception as exc:  # reported in the result, the measurement goes on
        return f"{type(exc).__name__}: {exc}"
    return ""
