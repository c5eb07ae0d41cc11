"""MLflow tracking-store plugin: unchanged ``mlflow.log_*`` code on mlflow-er's fast path.

mlflow-er registers URI schemes through MLflow's ``mlflow.tracking_store`` entry point.
``mlflow.set_tracking_uri("threaded+http://host:5000")`` (or ``MLFLOW_TRACKING_URI``)
makes MLflow build the ordinary store of ``http://host:5000`` — with MLflow's own
builder, so it *is* a ``RestStore`` (or ``SqlAlchemyStore``) — whose run-data writes
(``log_batch``, ``log_metric``, ``log_param``, ``set_tag`` and their ``*_async`` twins,
hence ``mlflow.log_*`` and ``mlflow.autolog()``) are validated and stamped in the caller
and handed to one per-process mlflow-er ``threaded`` backend per inner URI. Everything
else (create/get/search runs and experiments, artifacts, logged models, traces, the
"View run" link) is the real store's own code on the inner URI.

``spool+<uri>`` adds the ``spool`` sink in front of the ``mlflow`` sink: each batch is
fsynced to ``$MLFLOW_ER_SPOOL_DIR`` (default ``./mlflow-er-spool``) before it is sent, so
``mlflow-er sync`` can replay what the server never got. ``process+<uri>`` is ``threaded+<uri>``
delivered by the ``process`` backend: a spawned delivery process does the store writes.

A run that ends (``mlflow.end_run()``, leaving ``with mlflow.start_run()``) first waits for
its records; :class:`~mlflow_er.errors.DeliveryError` is raised from ``end_run`` for
whatever failed, after the run's status was stored (never when the run ends FAILED or
KILLED: then the problem is logged so the block's own exception is not masked).

Under the scheme, MLflow's API behaves as MLflow's: a read of a run (``get_run``,
``search_runs``, metric history) first waits for that run's queued writes (a dict lookup when
nothing is queued); invalid writes raise MLflow's own exception, class, code and message
(:mod:`mlflow_er.scheme_checks`); a param is checked against what the store holds (fetched once
for a run not created here); everything raised is an ``MlflowException``; writes after a run's
end are delivered and their failures reported at the next run end, flush or exit.

This module is imported by MLflow while ``import mlflow`` is still running: nothing at
module level may import mlflow. The delivery path is :mod:`mlflow_er.scheme_route`, the fluent
fast path :mod:`mlflow_er.scheme_fluent`, ``spool+``'s sync markers :mod:`mlflow_er.scheme_sync`,
URI parsing and the artifact/registry side :mod:`mlflow_er.mlflow_uris`.
"""

from __future__ import annotations

import logging
from typing import Any

from . import scheme_checks as checks
from .errors import DeliveryError
from .mlflow_uris import MODES, install_companions, split_uri
from .mlflow_uris import inner_uri as inner_uri  # re-exported: the mlflow sink strips prefixes with it
from .scheme_route import (  # re-exported: the public helpers and what the fast path shares
    DEFAULT_FLUSH_TIMEOUT as DEFAULT_FLUSH_TIMEOUT,
)
from .scheme_route import ENV_FLUSH_TIMEOUT as ENV_FLUSH_TIMEOUT
from .scheme_route import _done, _route, _routes, flush, flush_timeout, stats

__all__ = ["RoutedWrites", "build_store", "flush", "flush_timeout", "inner_uri", "stats"]

log = logging.getLogger(__name__)


# -- the store ----------------------------------------------------------------------------------
class RoutedWrites:
    """Mixed in before the real store class: run-data writes go to the route, the rest is the store's own."""

    _er_key: tuple[str, str]

    # -- the hot path --------------------------------------------------------------------------
    def _er_write(self, run_id: str, metrics: Any, params: Any, tags: Any, single: bool) -> None:
        route = _routes.get(self._er_key) or _route(self._er_key)
        linked = route.write(self, run_id, metrics, params, tags, single)
        if linked:
            # Straight to the store, after everything before it: MLflow links these to a model.
            route.flush(flush_timeout())
            route.dirty.pop(run_id, None)
            if single:
                super().log_metric(run_id, linked[0])  # type: ignore[misc]
            else:
                super().log_batch(run_id, metrics=linked, params=[], tags=[])  # type: ignore[misc]

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()) -> None:
        self._er_write(run_id, metrics, params, tags, False)

    def log_metric(self, run_id: str, metric: Any) -> None:
        self._er_write(run_id, (metric,), (), (), True)

    def log_param(self, run_id: str, param: Any) -> None:
        self._er_write(run_id, (), (param,), (), True)

    def set_tag(self, run_id: str, tag: Any) -> None:
        self._er_write(run_id, (), (), (tag,), True)

    # MLflow's async API, as MLflow's stores implement it: every call is a log_batch; what the
    # batch refuses comes back from RunOperations.wait() (MLflow's own wrapping), not the call.
    # Our path never blocks, so an accepted operation is already done; delivery errors surface
    # where the run ends, as for the synchronous calls.
    def log_batch_async(self, run_id: str, metrics: Any, params: Any, tags: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            self.log_batch(run_id, metrics, params, tags)
        except MlflowException as exc:
            return _done(exc)
        return _done()

    def log_metric_async(self, run_id: str, metric: Any) -> Any:
        return self.log_batch_async(run_id, [metric], [], [])

    def log_param_async(self, run_id: str, param: Any) -> Any:
        return self.log_batch_async(run_id, [], [param], [])

    def set_tag_async(self, run_id: str, tag: Any) -> Any:
        return self.log_batch_async(run_id, [], [], [tag])

    # -- reads see the writes before them ------------------------------------------------------
    def _er_wait(self, run_id: str | None) -> None:
        route = _routes.get(self._er_key)
        if route is not None and route.dirty:
            route.wait_for(run_id)

    def _er_get_run(self, run_id: str) -> Any:
        return super().get_run(run_id)  # type: ignore[misc]

    def get_run(self, run_id: str) -> Any:
        self._er_wait(run_id)
        return super().get_run(run_id)  # type: ignore[misc]

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        self._er_wait(None)  # any run may match
        return super().search_runs(*args, **kwargs)  # type: ignore[misc]

    def get_metric_history(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        self._er_wait(run_id)
        return super().get_metric_history(run_id, *args, **kwargs)  # type: ignore[misc]

    def get_metric_history_bulk_interval_from_steps(self, run_id: str, *args: Any, **kwargs: Any) -> Any:
        self._er_wait(run_id)
        return super().get_metric_history_bulk_interval_from_steps(run_id, *args, **kwargs)  # type: ignore[misc]

    # -- writes that must come after what is queued ----------------------------------------------
    def _er_in_order(self) -> None:
        route = _routes.get(self._er_key)
        if route is not None:
            route.flush(flush_timeout())

    def delete_tag(self, run_id: str, key: str) -> None:
        self._er_in_order()  # a queued set_tag of this key must land before the delete
        super().delete_tag(run_id, key)  # type: ignore[misc]

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        self._er_in_order()
        super().log_inputs(run_id, datasets=datasets, models=models)  # type: ignore[misc]

    def log_outputs(self, run_id: str, models: Any) -> None:
        self._er_in_order()
        super().log_outputs(run_id, models)  # type: ignore[misc]

    def record_logged_model(self, run_id: str, mlflow_model: Any) -> None:
        self._er_in_order()
        super().record_logged_model(run_id, mlflow_model)  # type: ignore[misc]

    def delete_run(self, run_id: str) -> None:
        self._er_in_order()  # records for a deleted run would be rejected
        super().delete_run(run_id)  # type: ignore[misc]

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        run = super().create_run(*args, **kwargs)  # type: ignore[misc]
        _route(self._er_key).start_run(run)
        return run

    def update_run_info(self, run_id: str, run_status: Any, end_time: Any, run_name: Any) -> Any:
        """Flush, store the update, and — when the run ends — raise what failed to be delivered."""
        from mlflow.entities import RunStatus

        route = _routes.get(self._er_key)
        if route is None or route.closed:
            return super().update_run_info(run_id, run_status, end_time, run_name)  # type: ignore[misc]
        ending = run_status is not None and RunStatus.is_terminated(run_status)
        if ending:
            route.end_run(run_id, RunStatus.to_string(run_status))
        elif run_status == RunStatus.RUNNING:
            route.resume(run_id)  # mlflow.start_run(run_id=...): live here until it ends again
        late: DeliveryError | None = None
        try:
            route.flush(flush_timeout(), final=ending)
            route.dirty.pop(run_id, None)
        except DeliveryError as exc:
            if not ending:
                raise
            late = exc  # the run still ends; the shortfall is reported below
        info = super().update_run_info(run_id, run_status, end_time, run_name)  # type: ignore[misc]
        if ending:
            failed = route.forget(run_id)
            if failed or late:
                error = checks.delivery_error(failed, unsent=late.unsent if late else 0)
                if run_status != RunStatus.FINISHED:
                    # The run failed or was killed: its own exception is what the user must see.
                    log.error("mlflow-er: run %s ended %s; %s", run_id, RunStatus.to_string(run_status), error)
                else:
                    raise error
        return info

    def flush_async_logging(self) -> None:
        """``mlflow.flush_async_logging()``: wait for this URI's records; raise what failed so far."""
        route = _routes.get(self._er_key)
        if route is not None:
            route.flush(flush_timeout())
            route.dirty.clear()
            failed = route.take()
            if failed:
                raise checks.delivery_error(failed)
        super().flush_async_logging()  # type: ignore[misc]


_classes: dict[type, type] = {}


def _routed_class(base: type) -> type:
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type(f"MlflowEr{base.__name__}", (RoutedWrites, base), {"__module__": __name__})
    return cls


def build_store(store_uri: str, artifact_uri: str | None = None, **_: Any) -> Any:
    """The ``mlflow.tracking_store`` entry point for ``threaded+<uri>``, ``spool+<uri>`` and ``process+<uri>``.

    MLflow calls this with its store-building lock held, so it builds the inner store
    with the inner scheme's builder directly (``get_store`` would wait on that lock
    forever) and creates no client: the route is made when a run is first created or written.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service import utils

    mode, inner = split_uri(store_uri)
    if mode is None:
        raise MlflowException(f"mlflow-er: {store_uri!r} has none of the prefixes {', '.join(p + '+' for p in MODES)}")
    builder = utils._tracking_store_registry.get_store_builder(inner)
    if builder is build_store:
        raise MlflowException(f"mlflow-er: {store_uri!r} stacks two mlflow-er prefixes; use one")
    store = builder(store_uri=inner, artifact_uri=artifact_uri)
    # The store MLflow's builder just made (nobody else holds it) becomes an instance of a
    # subclass that only adds the routed writes: isinstance checks (RestStore for the run
    # link, SqlAlchemyStore for the gateway) and every other method stay MLflow's own.
    store.__class__ = _routed_class(type(store))
    store._er_key = (mode, inner)
    install_companions(build_store)
    from . import scheme_fluent

    scheme_fluent.register(store_uri, (mode, inner))
    scheme_fluent.install()
    return store
