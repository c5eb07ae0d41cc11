"""Health export: a live run's own ``stats()`` logged into it as metrics, every N seconds.

Opt-in: ``ExperimentTracker(..., health_interval=30)`` (or ``$MLFLOW_ER_HEALTH_INTERVAL``)
starts one daemon thread per ``tracker.run()`` block that samples ``run.stats()`` and logs

====================================  ==============================================
metric                                from ``stats()``
====================================  ==============================================
``mlflow_er.queue_depth``             ``queued``: records not yet delivered
``mlflow_er.delivered``               ``delivered`` (cumulative)
``mlflow_er.dropped``                 ``dropped_total`` (cumulative, every reason)
``mlflow_er.retries``                 ``retries`` (cumulative)
``mlflow_er.failed``                  ``failed`` (cumulative)
``mlflow_er.oldest_unsent_age_s``     ``oldest_unsent_age``: seconds the oldest record waits
``mlflow_er.latency_p99_us``          ``latency_us["p99"]``: caller-side cost of a log call
====================================  ==============================================

at step 0, 1, 2 ... (one per sample). The records go through the run's own backend, like
any metric, so exporting adds no request of its own: with the ``threaded`` backend they
ride in the batches the writer sends anyway. They are stamped and handed to the backend
directly, not through ``run.log_metrics``, so the export never shows up in the latency it
reports. The thread stops when the block ends, after one last sample taken as the block
ends — before the run's final flush, so it shows what that flush still had to deliver.
Inactive ranks (``ranks="zero"``, rank > 0) export nothing; with ``ranks="all"`` each
rank exports its own, suffixed like its other metrics (``mlflow_er.queue_depth/rank1``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from .errors import BackendClosed
from .validation import check_key

log = logging.getLogger(__name__)

ENV_INTERVAL = "MLFLOW_ER_HEALTH_INTERVAL"
PREFIX = "mlflow_er."


def _latency_p99(s: dict[str, Any]) -> float | None:
    lat = s.get("latency_us")
    return lat.get("p99") if isinstance(lat, dict) else None


def _dropped(s: dict[str, Any]) -> float:
    total = s.get("dropped_total")
    if total is None:  # a third-party backend may only give the per-reason counts
        dropped = s.get("dropped") or {}
        total = sum(dropped.values()) if isinstance(dropped, dict) else dropped
    return total


#: metric name (after the prefix) -> how to read it from ``stats()``; ``None`` skips the sample.
FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "queue_depth": lambda s: s.get("queued"),
    "delivered": lambda s: s.get("delivered"),
    "dropped": _dropped,
    "retries": lambda s: s.get("retries"),
    "failed": lambda s: s.get("failed"),
    "oldest_unsent_age_s": lambda s: s.get("oldest_unsent_age"),
    "latency_p99_us": _latency_p99,
}


def interval(value: float | None) -> float | None:
    """The export interval in seconds: ``value``, else ``$MLFLOW_ER_HEALTH_INTERVAL``, else ``None`` (off)."""
    if value is None:
        raw = os.environ.get(ENV_INTERVAL, "").strip()
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_INTERVAL}={raw!r} is not a number of seconds") from None
    if isinstance(value, bool) or not value > 0:  # also rejects NaN
        raise ValueError(f"health_interval must be a positive number of seconds, got {value!r}")
    return float(value)


class HealthExporter:
    """Samples ``run.stats()`` every ``every`` seconds into the run; :meth:`stop` takes a last sample."""

    def __init__(self, run: Any, every: float, prefix: str = PREFIX):
        self.run = run
        self.every = every
        key_of = getattr(run, "metric_key", None) or check_key  # ranks="all" suffixes by rank
        self.keys = {name: key_of(prefix + name) for name in FIELDS}
        self.samples = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one sample at a time: steps stay in order
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-er-health-{run.run_id[:8]}", daemon=True)

    def start(self) -> HealthExporter:
        self._thread.start()
        return self

    def sample(self) -> dict[str, float]:
        """Take one sample now and hand it to the run's backend; returns what was logged."""
        with self._lock:
            stats = self.run.stats()
            values: dict[str, float] = {}
            for name, read in FIELDS.items():
                v = read(stats)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[self.keys[name]] = float(v)
            if values:
                self.run.log_metrics(values, step=self.samples)
            self.samples += 1
            return values

    def _safe_sample(self) -> bool:
        if getattr(self.run, "ended", None):
            return False  # the run's end is queued: a sample now would be refused
        try:
            self.sample()
        except BackendClosed:
            return False
        except Exception as exc:  # health export must never break training
            if not self._warned:
                self._warned = True
                log.warning("mlflow-er: health export for run %s failed: %s", self.run.run_id, exc)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            if not self._safe_sample():
                return

    def stop(self, final: bool = True, timeout: float = 5.0) -> None:
        """Stop the thread (bounded) and, if ``final``, log one last sample. Never raises."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if final and not self._thread.is_alive():
            self._safe_sample()

    @property
    def alive(self) -> bool:
        """Whether the sampling thread still runs."""
        return self._thread.is_alive()


def start(run: Any, every: float | None) -> HealthExporter | None:
    """Start exporting ``run``'s health every ``every`` seconds (``None``: off, returns ``None``)."""
    return HealthExporter(run, every).start() if every else None
