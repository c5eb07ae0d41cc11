"""Fluent ``mlflow.log_*`` calls on the fast path while a ``threaded+``/``spool+`` URI is in use.

MLflow's fluent functions build an ``MlflowClient`` per call (resolving the tracking and
registry URIs, probing for a Spark session twice): ~110 µs, where handing a record to the
scheme's queue costs a few. When one of our stores is first built, ``log_metric``,
``log_metrics``, ``log_param``, ``log_params``, ``set_tag`` and ``set_tags`` in
``mlflow.tracking.fluent`` (and their ``mlflow.*`` aliases) are replaced by wrappers that take
a shortcut only for a *plain* call and call MLflow's own function for anything else.

A call is plain when all of these hold; each is a check MLflow's own code makes, read from the
same place:

* the tracking URI (``mlflow.tracking._tracking_service.utils.get_tracking_uri()``) is one
  our store was built for, and its route exists (it does once a run was created through it);
* the calling thread has an active run (``mlflow.tracking.fluent._active_run_stack``, which is
  thread-local) and no explicit ``run_id`` (MLflow would read that run first) — ``log_params``
  takes an explicit ``run_id`` as MLflow does, without a read;
* no ``model_id``/``dataset`` argument, no active model (``fluent.get_active_model_id()``) and
  no model outputs on the active run (MLflow would link metrics to a LoggedModel);
* ``fluent.MlflowClient`` and the client method MLflow would call are MLflow's own (a test's
  mock, or another library's patch, takes the ordinary path);
* mlflow-er's caller-side checks accept every value (anything they refuse goes to MLflow's
  function, so the error raised is MLflow's), a param's run has its params cached (fetched
  from the store by the ordinary path) and the value does not change a logged one.

The shortcut does what the ordinary path ends up doing — the same record queued on the same
route, ``synchronous`` resolved as MLflow resolves it (``MLFLOW_ENABLE_ASYNC_LOGGING``) and the
same return value (the param value, ``None``, or a finished ``RunOperations``) — minus MLflow's
per-call client and its usage-telemetry event. Autolog, nested and thread-local runs,
``start_run``/``end_run`` are untouched. ``MLFLOW_ER_FLUENT_FAST_PATH=0`` turns it off.
Depends on these MLflow 3.x internals: the six functions' signatures, ``_active_run_stack``,
``get_active_model_id``, ``MlflowClient`` as a module global of ``fluent``, and
``get_tracking_uri``; if any is missing the wrappers are not installed (a warning says so).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from .errors import InvalidRecord
from .records import Metric, Param, Tag
from .validation import INT64_MAX, MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, check_key, metric_fields

log = logging.getLogger(__name__)

ENV_SWITCH = "MLFLOW_ER_FLUENT_FAST_PATH"
NAMES = ("log_metric", "log_metrics", "log_param", "log_params", "set_tag", "set_tags")

_keys: dict[str, tuple[str, str]] = {}  # tracking URI as MLflow resolves it -> route key
_installed = False


def register(store_uri: str, key: tuple[str, str]) -> None:
    """``store_uri`` (as MLflow passed it to our store builder) belongs to route ``key``."""
    _keys[store_uri] = key


def install() -> None:
    """Once per process, at the first store built for one of our schemes."""
    global _installed
    if _installed:
        return
    _installed = True
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    try:
        _patch()
    except Exception as exc:  # a later MLflow may move these internals: the ordinary path still works
        log.warning("mlflow-er: fluent fast path not installed (%s); mlflow.log_* take MLflow's own path", exc)


def _patch() -> None:
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ASYNC_LOGGING
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service.utils import get_tracking_uri

    from . import scheme_route as ms

    originals = {name: getattr(fluent, name) for name in NAMES}
    if any(getattr(f, "_mlflow_er_fast", False) for f in originals.values()):
        return
    client_cls = fluent.MlflowClient
    client_methods = {name: getattr(client_cls, name) for name in ("log_metric", "log_param", "set_tag", "log_batch")}
    stack_var = fluent._active_run_stack
    active_model_id = fluent.get_active_model_id
    routes = ms._routes
    now_ms = ms._now_ms

    def route_for(client_method: str) -> Any:
        key = _keys.get(get_tracking_uri())
        if key is None:
            return None
        route = routes.get(key)
        if (route is None or fluent.MlflowClient is not client_cls
                or getattr(client_cls, client_method) is not client_methods[client_method]):
            return None
        return route

    def active_run() -> Any:
        stack = stack_var.get()
        if not stack or active_model_id() is not None:
            return None
        return stack[-1]

    def plain_run(client_method: str, metrics: bool = False) -> tuple[Any, Any]:
        route = route_for(client_method)
        if route is None:
            return None, None
        run = active_run()
        if run is None:
            return None, None
        if metrics:
            outputs = run.outputs
            if outputs is not None and outputs.model_outputs:
                return None, None  # MLflow links these metrics to the run's logged models
        return route, run.info.run_id

    def result(synchronous: bool | None, value: Any) -> Any:
        if synchronous is None:
            synchronous = not MLFLOW_ENABLE_ASYNC_LOGGING.get()
        return value if synchronous else ms._done()

    def metric_recs(route: Any, run_id: str, items: Any, step: Any, timestamp: Any) -> list[Metric] | None:
        seq = route.seqs.get(run_id) or route.seq(run_id)
        ts = timestamp or now_ms()
        if type(ts) is not int or not 0 <= ts <= INT64_MAX:
            return None
        out = []
        for key, value in items:
            try:
                v, s = metric_fields(key, value, step or 0)
            except InvalidRecord:
                return None
            out.append(Metric(run_id, key, v, ts, s, next(seq)))
        return route.unrepeat(run_id, out, not timestamp)

    def log_metric(key: str, value: float, step: int | None = None, synchronous: bool | None = None,
                   timestamp: int | None = None, run_id: str | None = None, model_id: str | None = None,
                   dataset: Any = None) -> Any:
        if run_id is None and model_id is None and dataset is None:
            route, rid = plain_run("log_metric", metrics=True)
            if route is not None:
                recs = metric_recs(route, rid, ((key, value),), step, timestamp)
                if recs is not None:
                    route.submit(rid, recs)
                    return result(synchronous, None)
        return originals["log_metric"](key, value, step, synchronous, timestamp, run_id, model_id, dataset)

    def log_metrics(metrics: dict[str, float], step: int | None = None, synchronous: bool | None = None,
                    run_id: str | None = None, timestamp: int | None = None, model_id: str | None = None,
                    dataset: Any = None) -> Any:
        if run_id is None and model_id is None and dataset is None and metrics:
            route, rid = plain_run("log_batch", metrics=True)
            if route is not None:
                recs = metric_recs(route, rid, metrics.items(), step, timestamp)
                if recs is not None:
                    route.submit(rid, recs)
                    return result(synchronous, None)
        return originals["log_metrics"](metrics, step, synchronous, run_id, timestamp, model_id, dataset)

    def params_fast(route: Any, rid: str, items: Any) -> list[Param] | None:
        known = route.params.get(rid)
        if known is None:
            return None  # not fetched from the store yet: the ordinary path does that
        staged = {}
        for key, value in items:
            pval = value if type(value) is str else str(value)
            if len(pval) > MAX_PARAM_VALUE_LENGTH or not _key_ok(key):
                return None
            prev = known.get(key)
            if prev is None:
                staged[key] = pval
            elif prev != pval:
                return None  # MLflow's own path raises its conflict error
        if not staged:
            return []
        with route.lock:
            if any(known.setdefault(k, v) != v for k, v in staged.items()):
                return None  # another thread logged one of these meanwhile: let the store path decide
        seq = route.seqs.get(rid) or route.seq(rid)
        now = now_ms()
        return [Param(rid, k, v, now, next(seq)) for k, v in staged.items()]

    def log_param(key: str, value: Any, synchronous: bool | None = None) -> Any:
        route, rid = plain_run("log_param")
        if route is not None:
            recs = params_fast(route, rid, ((key, value),))
            if recs is not None:
                if recs:
                    route.submit(rid, recs)
                return result(synchronous, value)
        return originals["log_param"](key, value, synchronous)

    def log_params(params: dict[str, Any], synchronous: bool | None = None, run_id: str | None = None) -> Any:
        route = route_for("log_batch") if params else None
        rid = run_id
        if route is not None and rid is None:
            run = active_run()
            rid = run.info.run_id if run is not None else None
        if route is not None and rid is not None:
            recs = params_fast(route, rid, params.items())
            if recs is not None:
                if recs:
                    route.submit(rid, recs)
                return result(synchronous, None)
        return originals["log_params"](params, synchronous, run_id)

    def tags_fast(route: Any, rid: str, items: Any) -> list[Tag] | None:
        seq = route.seqs.get(rid) or route.seq(rid)
        now = now_ms()
        out = []
        for key, value in items:
            tval = value if type(value) is str else str(value)
            if len(tval) > MAX_TAG_VALUE_LENGTH or not _key_ok(key):
                return None
            out.append(Tag(rid, key, tval, now, next(seq)))
        return out

    def set_tag(key: str, value: Any, synchronous: bool | None = None) -> Any:
        route, rid = plain_run("set_tag")
        if route is not None:
            recs = tags_fast(route, rid, ((key, value),))
            if recs is not None:
                route.submit(rid, recs)
                return result(synchronous, None)
        return originals["set_tag"](key, value, synchronous)

    def set_tags(tags: dict[str, Any], synchronous: bool | None = None) -> Any:
        route, rid = plain_run("log_batch") if tags else (None, None)
        if route is not None and rid is not None:
            recs = tags_fast(route, rid, tags.items())
            if recs is not None:
                route.submit(rid, recs)
                return result(synchronous, None)
        return originals["set_tags"](tags, synchronous)

    fast: dict[str, Callable[..., Any]] = {"log_metric": log_metric, "log_metrics": log_metrics,
                                           "log_param": log_param, "log_params": log_params,
                                           "set_tag": set_tag, "set_tags": set_tags}
    for name, fn in fast.items():
        orig = originals[name]
        wrapped = functools.wraps(orig)(fn)
        wrapped._mlflow_er_fast = True  # type: ignore[attr-defined]
        setattr(fluent, name, wrapped)
        if getattr(mlflow, name, None) is orig:
            setattr(mlflow, name, wrapped)


def _key_ok(key: object) -> bool:
    try:
        check_key(key)
    except InvalidRecord:
        return False
    return True
