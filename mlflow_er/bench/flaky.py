"""The ``flaky`` workload: a timeline while the tracking server is SIGKILLed and restarted.

The child (:func:`run_flaky`) logs one metric every ~2 ms (value = step = its sequence
number) for ``flaky_seconds`` and at least ``flaky_after_s`` past the server's recovery
(at most ``flaky_max_seconds``), timing every call, then flushes with a bound and counts
what reached the store. The parent (:class:`FlakyDirector`, a thread beside the task)
waits for the child's start file, SIGKILLs the server's process group at
``flaky_kill_at_s``, restarts it on the same port ``flaky_down_s`` later, and polls the
run every 0.25 s for the highest step the store holds — so the delivery curve is measured
outside the child and costs it nothing. Needs a server this bench started (``--start-server``).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from array import array
from pathlib import Path
from typing import Any

from .contenders import Contender, Context, open_session

START_FILE = "flaky-start.json"
HEALTHY_FILE = "flaky-healthy.json"  # written by the director once the restarted server answers
KEY = "flaky"
INTERVAL_S = 0.002
BUCKET_S = 0.25
_ABANDONED: list[Any] = []


def run_flaky(c: Contender, ctx: Context, sizes: Any) -> dict[str, Any]:
    """In the child: log at a steady rate through the outage; flush (bounded); count what arrived."""
    cm = open_session(c, ctx)
    s = cm.__enter__()
    for i in range(20):
        s.metric("warmup", float(i), i)
    s.flush(30.0)
    metric = s.metric
    clock = time.perf_counter_ns
    n_max = int(sizes.flaky_max_seconds / INTERVAL_S) + 1000
    lat = array("q", bytes(8 * n_max))
    at = array("q", bytes(8 * n_max))
    Path(START_FILE).write_text(json.dumps({"run_id": s.run_id, "t0": time.time()}))
    t0 = clock()
    t0_wall = time.time()
    end = t0 + int(sizes.flaky_seconds * 1e9)
    hard_end = t0 + int(sizes.flaky_max_seconds * 1e9)
    n = 0
    while n < n_max:
        c0 = clock()
        if c0 >= end:  # go on until the restarted server has been up flaky_after_s (a slow restart too)
            end = _logging_end(t0, t0_wall, c0, sizes.flaky_after_s)
            if c0 >= end or c0 >= hard_end:
                break
        metric(KEY, float(n), n)
        c1 = clock()
        lat[n], at[n] = c1 - c0, c0 - t0
        n += 1
        time.sleep(INTERVAL_S)
    logged_s = (clock() - t0) / 1e9
    f0 = time.perf_counter()
    flush_error = ""
    try:
        s.flush(sizes.flaky_flush_timeout_s)
    except Exception as exc:  # the timeline shows how far it got; the text says why it stopped
        flush_error = f"{type(exc).__name__}: {exc}"
    flush_s = time.perf_counter() - f0
    stored, duplicates = _count_stored(ctx.uri, s.run_id)
    if flush_error:
        _ABANDONED.append(cm)  # ending the run would wait for the same stuck writer
    else:
        cm.__exit__(None, None, None)
    return {"logged": n, "stored": stored, "duplicates": duplicates, "missing": max(0, n - stored),
            "flush_s": flush_s, "flush_ok": int(not flush_error), "logged_s": logged_s,
            "max_call_us": max(lat[:n]) / 1000.0 if n else 0.0,
            "flush_error": flush_error, "run_id": s.run_id,
            "timeline": {"caller": _buckets(lat[:n], at[:n])}}


def _logging_end(t0: int, t0_wall: float, now: int, after_s: float) -> int:
    """When logging may stop (perf_counter ns): ``after_s`` past the server's recovery, once it is known."""
    try:
        healthy_wall = float(json.loads(Path(HEALTHY_FILE).read_text())["healthy"])
    except (OSError, ValueError, KeyError):
        return now + 100_000_000  # not back yet: look again in 0.1 s
    return t0 + int((healthy_wall - t0_wall + after_s) * 1e9)


def _buckets(lat: Any, at: Any) -> list[dict[str, Any]]:
    """Per ``BUCKET_S`` of logging: start time (s), calls, p50 and max caller latency (µs)."""
    out: list[dict[str, Any]] = []
    bucket: list[int] = []
    edge = BUCKET_S
    for ns, t in zip(lat, at, strict=True):
        while t / 1e9 >= edge:
            if bucket:
                out.append({"t": round(edge - BUCKET_S, 3), "calls": len(bucket),
                            "p50_us": statistics.median(bucket) / 1000.0, "max_us": max(bucket) / 1000.0})
            bucket = []
            edge += BUCKET_S
        bucket.append(ns)
    if bucket:
        out.append({"t": round(edge - BUCKET_S, 3), "calls": len(bucket),
                    "p50_us": statistics.median(bucket) / 1000.0, "max_us": max(bucket) / 1000.0})
    return out


def _count_stored(uri: str, run_id: str) -> tuple[int, int]:
    """``(distinct steps stored, duplicate rows)`` of the metric, read back from the store."""
    from mlflow import MlflowClient

    try:
        history = MlflowClient(uri).get_metric_history(run_id, KEY)
    except Exception:
        return -1, 0
    steps = [m.step for m in history]
    return len(set(steps)), len(steps) - len(set(steps))


class FlakyDirector(threading.Thread):
    """In the parent, beside one flaky task: kill and restart the server, poll delivery."""

    def __init__(self, server: Any, task_dir: str, sizes: Any) -> None:
        super().__init__(daemon=True, name="bench-flaky-director")
        self.server = server
        self.start_file = Path(task_dir) / START_FILE
        self.healthy_file = Path(task_dir) / HEALTHY_FILE
        self.sizes = sizes
        self.stop_event = threading.Event()
        self.events: dict[str, float] = {}
        self.polls: list[dict[str, Any]] = []
        self.error = ""

    def run(self) -> None:
        try:
            self._direct()
        except Exception as exc:  # reported with the result; the bench goes on
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._tell_healthy()  # the child stops logging after_s later (or now, if the restart failed)

    def _tell_healthy(self) -> None:
        if not self.healthy_file.exists():
            tmp = self.healthy_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"healthy": time.time()}))
            tmp.replace(self.healthy_file)

    def _direct(self) -> None:
        deadline = time.monotonic() + 120.0
        while not self.start_file.exists():
            if self.stop_event.wait(0.02) or time.monotonic() > deadline:
                return
        info = json.loads(self.start_file.read_text())
        t0, run_id = float(info["t0"]), str(info["run_id"])
        killed = False
        while not self.stop_event.is_set():
            now = time.time() - t0
            if not killed and now >= self.sizes.flaky_kill_at_s:
                killed = True
                self.server.kill()
                self.events["killed_s"] = time.time() - t0
                self.stop_event.wait(self.sizes.flaky_down_s)
                self.events["restart_s"] = time.time() - t0
                self.server.start()  # same port; returns once /health answers
                self.events["healthy_s"] = time.time() - t0
                self._tell_healthy()
                continue
            self.polls.append({"t": round(now, 3), "stored_upto": self._highest_step(run_id)})
            self.stop_event.wait(BUCKET_S)

    def _highest_step(self, run_id: str) -> int | None:
        """The run's latest ``flaky`` step + 1 (records in order so far), ``None`` when unreachable."""
        query = urllib.parse.urlencode({"run_id": run_id})
        try:
            with urllib.request.urlopen(f"{self.server.uri}/api/2.0/mlflow/runs/get?{query}", timeout=2) as r:
                body = json.loads(r.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        for m in body.get("run", {}).get("data", {}).get("metrics", []):
            if m.get("key") == KEY:
                return int(m.get("step", -1)) + 1
        return 0

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        """Stop polling, make sure the server is back, and return the parent's half of the timeline."""
        self.stop_event.set()
        self.join(timeout)
        if not self.server.alive():
            self.server.start()
        out: dict[str, Any] = {"events": self.events, "stored": self.polls}
        if self.error:
            out["error"] = self.error
        return out
