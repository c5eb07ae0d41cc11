"""The per-process delivery path behind ``threaded+`` / ``spool+`` / ``process+<uri>``: one route per (mode, inner URI).

A :class:`Route` owns the backend and pipeline every store MLflow builds for that URI shares,
the per-run sequence numbers, the params the store holds (so a conflict raises at the call),
which runs are live here, the delivery failures kept for the end of their run, and the
read-your-writes flags the store's reads wait on. Imported by MLflow during ``import mlflow``
(through :mod:`mlflow_er.mlflow_store`): no mlflow import at module level.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from typing import Any

from . import scheme_checks as checks
from .errors import DeliveryError, FailedRecord, InvalidRecord, MlflowErError
from .mlflow_uris import BACKENDS
from .records import Metric, Param, RunEnd, RunStart, Tag
from .validation import (
    INT64_MAX,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    check_key,
    check_param_value,
    check_tag_value,
    check_timestamp,
    metric_fields,
)

log = logging.getLogger(__name__)

ENV_FLUSH_TIMEOUT = "MLFLOW_ER_FLUSH_TIMEOUT"
#: A repeated metric point counts as "logged just now" (and is kept apart) within this many ms of now.
REPEAT_WINDOW_MS = 1000
DEFAULT_FLUSH_TIMEOUT = 300.0


def flush_timeout() -> float:
    """Seconds a run's end (or an order-keeping flush) may wait: ``$MLFLOW_ER_FLUSH_TIMEOUT``, else 300."""
    try:
        return float(os.environ.get(ENV_FLUSH_TIMEOUT) or DEFAULT_FLUSH_TIMEOUT)
    except ValueError:
        return DEFAULT_FLUSH_TIMEOUT


# -- the per-process delivery path ---------------------------------------------------------------
class Route:
    """One backend and its sinks for one (mode, inner URI), shared by every store MLflow builds for it."""

    def __init__(self, mode: str, inner: str):
        from . import pipeline, plugins
        from .hookspecs import SinkContext
        from .redact import redact_uri

        # Shown in stats() keys and messages: never with a password in it.
        self.uri = redact_uri(f"{mode}+{inner}")
        # Built the way a tracker builds its own: the spool (durable) lane is written first.
        specs = ["spool", "mlflow"] if mode == "spool" else ["mlflow"]
        self.pipeline = pipeline.build(specs, lambda name: SinkContext(inner), tracking_uri=inner)
        # process+: the same route and sinks, delivered by a spawned delivery process instead of a thread.
        self.backend = plugins.make_backend(BACKENDS[mode])
        self.backend.open(self.pipeline)
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.seqs: dict[str, itertools.count] = {}
        # Params of a run as the store holds them (a run created here starts empty; any other
        # run is fetched once, at its first param write), so a conflict raises at the call.
        self.params: dict[str, dict[str, str]] = {}
        self.live: set[str] = set()  # runs started or resumed here and not ended since
        # Per run and key, the last metric point queued: (timestamp as given, as stamped, step, value).
        self.last_points: dict[str, dict[str, tuple[int, int, int, float]]] = {}
        self.failures: list[FailedRecord] = []  # kept until their run ends (or an explicit flush)
        # Read your writes: a run with records submitted since the last flush. Set after the
        # submit and popped before the flush, so a write racing a read is never missed.
        self.dirty: dict[str, bool] = {}
        self.submits = itertools.count()  # next() after every submit (LiveSync compares it)
        self.closed = False  # set at exit, after the backend is closed: run ends then bypass the route
        self.live_sync: Any = None
        spool = next((lane.sink for lane in self.pipeline.lanes if lane.durable and hasattr(lane.sink, "writer")),
                     None)
        if mode == "spool" and spool is not None:
            from .scheme_sync import LiveSync

            self.live_sync = LiveSync(spool, inner, self.submits)
        atexit.register(self._at_exit)

    def seq(self, run_id: str) -> itertools.count:
        seq = self.seqs.get(run_id)
        if seq is None:
            checks.check_run_id(run_id)  # MLflow's rule, once per run
            with self.lock:
                seq = self.seqs.setdefault(run_id, itertools.count())
        return seq

    def submit(self, run_id: str, out: list[Any], dirty: bool = True) -> None:
        try:
            if len(out) == 1:
                self.backend.submit(out[0])
            else:
                self.backend.submit_many(out)
        except MlflowErError as exc:  # QueueFull, BackendClosed: through MLflow's API, as MLflow's kind
            raise checks.as_mlflow(exc) from exc
        if dirty:
            self.dirty[run_id] = True
        next(self.submits)

    def unrepeat(self, run_id: str, recs: list[Metric], stamped: bool) -> list[Metric]:
        """Move an exact repeat of a point logged just now 1 ms after the last one, so it is not merged.

        A point of the same key logged after a moved one (another value) is not stamped before it.

        MLflow stores one row per (key, timestamp ms, step, value): plain MLflow, whose calls take
        milliseconds, keeps a point logged twice in a row (transformers' ``Trainer`` logs its last
        ``epoch`` so); through the scheme both would get the same millisecond and one row. Only a
        point equal to the last one of its key, stamped within :data:`REPEAT_WINDOW_MS` of now
        (``stamped``: by us, now), moves; a deliberate re-log of an older point stays a no-op, as in
        MLflow. A dict lookup per metric; repeats inside one ``log_batch`` are left to MLflow's dedupe.
        """
        last = self.last_points.get(run_id)
        if last is None:
            last = self.last_points.setdefault(run_id, {})
        if len(recs) == 1:  # the common call: a new key, a later millisecond, or another point in the same one
            m = recs[0]
            ts = m.timestamp
            prev = last.get(m.key)
            if prev is None or not prev[0] <= ts <= prev[1] or (
                    ts == prev[1] and (prev[2] != m.step or prev[3] != m.value)):
                last[m.key] = (ts, ts, m.step, m.value)
                return recs
        now = 0
        updates = {}
        for i, m in enumerate(recs):
            prev = last.get(m.key)
            ts = m.timestamp
            if prev is not None and prev[0] <= ts <= prev[1]:
                repeat = prev[2] == m.step and prev[3] == m.value
                if repeat or ts < prev[1]:
                    if not stamped and not now:
                        now = _now_ms()
                    if stamped or ts >= now - REPEAT_WINDOW_MS:
                        # A repeat goes 1 ms after the last point; another point not before it (in order).
                        moved = prev[1] + 1 if repeat else prev[1]
                        recs[i] = m._replace(timestamp=moved)
                        updates[m.key] = (prev[0], moved, m.step, m.value)
                        continue
            updates[m.key] = (ts, ts, m.step, m.value)
        last.update(updates)
        return recs

    def wait_for(self, run_id: str | None = None) -> None:
        """Before a read of ``run_id`` (``None``: any run): deliver what was logged to it first.

        Costs one dict lookup when nothing is queued; bounded by :func:`flush_timeout`.
        """
        if run_id is None:
            if not self.dirty:
                return
            waiting = dict(self.dirty)
            self.dirty.clear()
        elif self.dirty.pop(run_id, None) is None:
            return
        else:
            waiting = {run_id: True}
        try:
            self.flush(flush_timeout())
        except DeliveryError:
            self.dirty.update(waiting)
            raise

    def flush(self, timeout: float | None, final: bool = False) -> None:
        """Wait for delivery, keeping what failed for the end of its run; raise only if time ran out.

        ``final`` (a run's end): ``spool+`` records the live position now, not at its next interval.
        """
        token = self.live_sync.begin() if self.live_sync is not None else 0
        clean = True
        try:
            self.backend.flush(timeout)
        except DeliveryError as exc:
            with self.lock:
                self.failures.extend(exc.failed)
            if self.live_sync is not None and any(not f.permanent for f in exc.failed):
                self.live_sync.freeze(f"{sum(not f.permanent for f in exc.failed)} record(s) not delivered live")
            if exc.unsent:
                raise checks.delivery_error(unsent=exc.unsent, message=f"{self.uri}: {exc}") from None
            clean = not any(not f.permanent for f in exc.failed)
        if self.live_sync is not None:
            self.live_sync.flushed(token, clean, final)

    def take(self, run_id: str | None = None) -> list[FailedRecord]:
        """Failures of ``run_id`` and of runs not live here (all of them for ``None``).

        A write to a run that is not live (ended, or never started here) is reported by the next
        run end, flush or exit, whichever comes first.
        """
        mine: list[FailedRecord] = []
        kept: list[FailedRecord] = []
        with self.lock:
            for f in self.failures:
                (mine if run_id is None or f.run_id == run_id or f.run_id not in self.live else kept).append(f)
            self.failures = kept
        return mine

    def params_of(self, store: Any, run_id: str) -> dict[str, str]:
        """The run's params as the store holds them (fetched once for a run not created here)."""
        known = self.params.get(run_id)
        if known is None:
            self.wait_for(run_id)
            held = dict(store._er_get_run(run_id).data.params)  # MLflow's own "run not found" if it is not there
            with self.lock:
                known = self.params.setdefault(run_id, held)
        return known

    def write(self, store: Any, run_id: str, metrics: Any, params: Any, tags: Any, single: bool) -> list[Any]:
        """Validate (MLflow's errors), check params against the store, queue; return metrics linked to models."""
        seq = self.seq(run_id)
        recs: list[Any] = []
        linked = []
        try:
            for m in metrics:
                if m.model_id or m.dataset_name or m.dataset_digest:
                    linked.append(m)  # a record cannot carry the LoggedModel/dataset link
                    continue
                key, ts = m.key, m.timestamp
                value, step = metric_fields(key, m.value, m.step)
                if type(ts) is not int or not 0 <= ts <= INT64_MAX:
                    ts = check_timestamp(key, ts)
                recs.append((key, value, ts, step))
            pvals = []
            for p in params:
                key = check_key(p.key, "param key")
                pvals.append((key, check_param_value(key, checks.fitted("param", key, str(p.value),
                                                                        MAX_PARAM_VALUE_LENGTH))))
            tag_recs = [(check_key(t.key, "tag key"),
                         check_tag_value(t.key, checks.fitted("tag", t.key, str(t.value), MAX_TAG_VALUE_LENGTH)))
                        for t in tags]
        except InvalidRecord as exc:
            checks.raise_mlflows_error(exc, run_id, metrics, params, tags, single)
            raise  # not reached: the line above always raises
        if not single:
            checks.check_batch_shape(params, metrics, tags)
        staged: dict[str, str] = {}
        if pvals:
            known = self.params_of(store, run_id)
            changes = []
            for key, pval in pvals:
                prev = known.get(key)
                if prev is None:
                    staged[key] = pval
                elif prev != pval:
                    changes.append((key, prev, pval))
            if changes:
                raise checks.param_conflict(run_id, changes, single)
        # Everything validated: only now is anything queued (a log_batch is all or nothing).
        out: list[Any] = self.unrepeat(run_id, [Metric(run_id, k, v, ts, s, next(seq)) for k, v, ts, s in recs],
                                       False) if recs else []
        if staged or tag_recs:
            now = _now_ms()
            if staged:
                with self.lock:
                    known.update(staged)
                out += [Param(run_id, k, v, now, next(seq)) for k, v in staged.items()]
            out += [Tag(run_id, k, v, now, next(seq)) for k, v in tag_recs]
        if out:
            self.submit(run_id, out)
        return linked

    def start_run(self, run: Any) -> None:
        """The run's start goes into the stream (the spool records it, for `mlflow-er sync`)."""
        run_id = run.info.run_id
        seq = self.seq(run_id)
        tags = dict(run.data.tags) if run.data else {}
        with self.lock:
            self.live.add(run_id)
            self.params[run_id] = dict(run.data.params) if run.data else {}
        # The store already has the run: its start is for the spool, and no read needs to wait for it.
        self.submit(run_id, [RunStart(run_id, _now_ms(), next(seq), run.info.run_name,
                                      tags.get("mlflow.parentRunId"), tags.get("mlflow.note.content"), tags)],
                    dirty=False)

    def resume(self, run_id: str) -> None:
        with self.lock:
            self.live.add(run_id)

    def end_run(self, run_id: str, status: str) -> None:
        """Queue the run's end after its records; the caller flushes, then takes the failures."""
        self.submit(run_id, [RunEnd(run_id, _now_ms(), next(self.seq(run_id)), status)])

    def forget(self, run_id: str) -> list[FailedRecord]:
        with self.lock:
            self.live.discard(run_id)
            self.params.pop(run_id, None)  # a later write (resumed, or after the end) fetches them again
            self.last_points.pop(run_id, None)
        return self.take(run_id)

    def _end_open_runs(self) -> None:
        """End the active run MLflow would end at exit, while its end can still be delivered.

        MLflow's own exit hook (``fluent._safe_end_run``, registered at ``import mlflow``) runs
        after ours (atexit is LIFO): it would end the run through a closed backend, which the
        ``process`` backend would restart and wait on. Ending it first is what MLflow does, earlier.
        """
        try:
            from mlflow.tracking import fluent

            for _ in range(100):  # nested runs: innermost first; bounded whatever end_run does
                run = fluent.active_run()
                if run is None or run.info.run_id not in self.live:
                    return
                try:
                    fluent.end_run()
                except DeliveryError as exc:
                    log.error("mlflow-er %s: at exit, run %s: %s", self.uri, run.info.run_id, exc)
                    if fluent.active_run() is run:
                        return
        except Exception:
            log.exception("mlflow-er %s: ending the active run at exit failed", self.uri)

    def _at_exit(self) -> None:
        # Before the backends' own drain (atexit is LIFO): what failed must be logged, not kept.
        if self.pid != os.getpid():
            return
        self._end_open_runs()
        self.closed = True
        clean = False
        try:
            self.backend.close(getattr(self.backend, "close_timeout", 30.0))
            clean = True
        except DeliveryError as exc:
            self.failures.extend(exc.failed)
            clean = not exc.unsent and all(f.permanent for f in exc.failed)
            if exc.unsent:
                log.error("mlflow-er %s: at exit, %d record(s) unsent", self.uri, exc.unsent)
        except Exception:
            log.exception("mlflow-er %s: closing at exit failed", self.uri)
        if clean and self.live_sync is not None:
            self.live_sync.closed()
        left = self.take()
        if left:
            log.error("mlflow-er %s: at exit, %s", self.uri, DeliveryError(left))


_routes: dict[tuple[str, str], Route] = {}
_routes_lock = threading.Lock()


def _route(key: tuple[str, str]) -> Route:
    route = _routes.get(key)
    if route is None:
        with _routes_lock:
            route = _routes.get(key)
            if route is None:
                route = _routes[key] = Route(*key)
    return route


if hasattr(os, "register_at_fork"):
    # A forked child builds its own route: the parent's records are the parent's to deliver.
    os.register_at_fork(after_in_child=_routes.clear)


def flush(timeout: float | None = None) -> None:
    """Wait until every record logged through the schemes in this process is delivered.

    Raises :class:`DeliveryError` (also an ``MlflowException``) for everything that failed so
    far (any run) or is still unsent after ``timeout``. ``mlflow.flush_async_logging()`` does
    the same for the current tracking URI.
    """
    failed: list[FailedRecord] = []
    unsent = 0
    for route in list(_routes.values()):
        try:
            route.flush(timeout)
        except DeliveryError as exc:
            unsent += exc.unsent
        failed += route.take()
    if failed or unsent:
        raise checks.delivery_error(failed, unsent=unsent)


def stats() -> dict[str, dict[str, Any]]:
    """Backend counters (queued, delivered, failed, dropped, ...) per scheme URI used in this process."""
    return {route.uri: route.backend.stats() for route in list(_routes.values())}


def _now_ms() -> int:
    """Milliseconds since the epoch, computed as MLflow's ``get_current_time_millis`` computes them.

    ``time.time`` is looked up at each call, so code that mocks it (tests of training code do) gets the
    timestamps it would get from plain MLflow.
    """
    return int(time.time() * 1000)


def _done(error: BaseException | None = None) -> Any:
    """A finished ``RunOperations`` (failed with ``error``, raised by its ``wait()`` as MLflow does)."""
    from concurrent.futures import Future

    from mlflow.utils.async_logging.run_operations import RunOperations

    fut: Future[None] = Future()
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
    return RunOperations([fut])
