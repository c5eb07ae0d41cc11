"""MLflow's own errors for the tracking-URI schemes: what the real store would have raised, at the call.

mlflow-er's fast checks (:mod:`mlflow_er.validation`) decide *whether* a write is acceptable;
when one refuses, the write is handed to MLflow's own validators (those the SQL store and the
tracking server run: ``mlflow.utils.validation``), so the exception a user sees — class, code
and message — is MLflow's. Param conflicts, which only a store can see, are raised with the
SQL store's own wording. Imported lazily (never during ``import mlflow``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import DeliveryError, FailedRecord, InvalidRecord, MlflowErError

_delivery_cls: type | None = None


def delivery_error(failed: Sequence[FailedRecord] = (), unsent: int = 0, message: str | None = None) -> DeliveryError:
    """A :class:`DeliveryError` that is also an ``MlflowException`` (``except MlflowException`` catches it)."""
    global _delivery_cls
    if _delivery_cls is None:
        from mlflow.exceptions import MlflowException

        class SchemeDeliveryError(DeliveryError, MlflowException):  # type: ignore[misc]
            """Records logged through ``threaded+``/``spool+`` that the store did not take (see ``failed``)."""

            def __init__(self, failed: Sequence[FailedRecord] = (), unsent: int = 0, message: str | None = None):
                DeliveryError.__init__(self, failed, unsent, message)  # MlflowException.__init__ via the MRO

        SchemeDeliveryError.__module__ = "mlflow_er.mlflow_store"
        _delivery_cls = SchemeDeliveryError
    return _delivery_cls(failed, unsent=unsent, message=message)  # type: ignore[no-any-return]


def as_mlflow(exc: MlflowErError) -> Exception:
    """Any other mlflow-er error raised through MLflow's API (``QueueFull``, ``BackendClosed``...)."""
    from mlflow.exceptions import MlflowException

    err = MlflowException(f"mlflow-er: {exc}")
    err.__cause__ = exc
    return err


def raise_mlflows_error(exc: InvalidRecord, run_id: str, metrics: Sequence[Any], params: Sequence[Any],
                        tags: Sequence[Any], single: bool) -> None:
    """Raise what MLflow raises for this write; if MLflow would take it, say why mlflow-er cannot.

    ``single`` is the store's ``log_metric``/``log_param``/``set_tag`` (paths without
    ``metrics[i]``), else ``log_batch``.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.utils import validation as v

    if single:
        for m in metrics:
            v._validate_metric(m.key, m.value, m.timestamp, m.step)
        for p in params:
            v._validate_param(p.key, p.value)
        for t in tags:
            v._validate_tag(t.key, t.value)
    else:
        v._validate_batch_log_data(list(metrics), list(params), list(tags))
    # MLflow takes it (e.g. a float step): only mlflow-er's stricter rule refuses it.
    err = MlflowException(str(exc), INVALID_PARAMETER_VALUE)
    raise err from exc


def check_batch_shape(params: Sequence[Any], metrics: Sequence[Any], tags: Sequence[Any]) -> None:
    """``log_batch``'s own rules: within the batch limits, and no param key twice (even with one value)."""
    from mlflow.utils import validation as v

    if len(metrics) > 1000 or len(params) > 100 or len(tags) > 100 or len(metrics) + len(params) + len(tags) > 1000:
        v._validate_batch_log_limits(metrics, params, tags)
    if len(params) > 1:
        v._validate_param_keys_unique(params)


def fitted(kind: str, key: str, value: str, limit: int) -> str:
    """A value over MLflow's length limit, as MLflow stores it: truncated with its warning, or its error."""
    if len(value) <= limit:
        return value
    from mlflow.utils import validation as v

    out = v._validate_param(key, value) if kind == "param" else v._validate_tag(key, value)
    return str(out.value)


def param_conflict(run_id: str, changes: Sequence[tuple[str, str, str]], single: bool) -> Exception:
    """The SQL store's error for changing logged params (``log_param`` and ``log_batch`` word it differently)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if single:
        key, old, new = changes[0]
        return MlflowException(
            f"Changing param values is not allowed. Param with key='{key}' was already"
            f" logged with value='{old}' for run ID='{run_id}'. Attempted logging new value"
            f" '{new}'.", INVALID_PARAMETER_VALUE)
    listed = [{"key": k, "old_value": old, "new_value": new} for k, old, new in changes]
    return MlflowException("Changing param values is not allowed. Params were already"
                           f" logged='{listed}' for run ID='{run_id}'.", INVALID_PARAMETER_VALUE)


def check_run_id(run_id: str) -> None:
    """MLflow's run-id rule (checked once per run)."""
    from mlflow.utils.validation import _validate_run_id

    _validate_run_id(run_id)
