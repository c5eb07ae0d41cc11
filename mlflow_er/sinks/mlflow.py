"""The ``mlflow`` sink: writes batches and artifacts to an MLflow tracking store.

It owns its own ``MlflowClient`` on the tracker's tracking URI. Against an HTTP server it
sends ``log-batch`` requests itself with MLflow's request helper and **no MLflow-level
retries** (MLflow's default is ~4 minutes of urllib3 retries): the backend's retry policy
is the only one, so the two never stack, and the user's global settings are untouched.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param as MlflowParam
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from ..errors import SinkError
from ..hookspecs import SinkContext, hookimpl
from ..records import Artifact, Batch
from .base import Sink

log = logging.getLogger(__name__)

NAME = "mlflow"
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
# MLflow error codes that mean "try again": the server is alive but could not commit.
TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                             "DEADLINE_EXCEEDED", "ABORTED"})


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        import time
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def classify_mlflow_exception(exc: MlflowException) -> SinkError:
    """Turn an ``MlflowException`` from a store into a transient or permanent :class:`SinkError`."""
    code = getattr(exc, "error_code", "") or ""
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else 500
    transient = code in TRANSIENT_CODES or (code == "" and status in TRANSIENT_HTTP)
    err = SinkError(f"{code or 'error'}: {exc.message if hasattr(exc, 'message') else exc}", transient=transient)
    err.__cause__ = exc
    return err


class MlflowSink(Sink):
    """Writes to MLflow through its own client. ``request_timeout`` bounds one HTTP request."""

    name = NAME

    def __init__(self, tracking_uri: str, request_timeout: float = 30.0):
        from ..mlflow_store import inner_uri

        self.tracking_uri = tracking_uri
        self.request_timeout = request_timeout
        # Under a `threaded+`/`spool+` tracking URI, write to the real store: going through the
        # scheme would queue every record twice and make this sink's "delivered" mean "queued".
        self.client = MlflowClient(inner_uri(tracking_uri))
        store = self.client._tracking_client.store
        # Only REST stores expose host credentials; they get the retry-free path.
        self._host_creds = store.get_host_creds() if hasattr(store, "get_host_creds") else None

    # -- batches -------------------------------------------------------------------------
    def write_batch(self, batch: Batch) -> None:
        if self._host_creds is not None:
            self._post_batch(batch_json(batch))
            return
        metrics = [MlflowMetric(m.key, m.value, m.timestamp, m.step) for m in batch.metrics]
        params = [MlflowParam(p.key, p.value) for p in batch.params]
        tags = [RunTag(t.key, t.value) for t in batch.tags]
        try:
            self.client.log_batch(batch.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        except MlflowException as exc:
            err = classify_mlflow_exception(exc)
            # A local store reports a bad row (e.g. an int too large for SQLite) as
            # INTERNAL_ERROR too; only lock contention is worth retrying there.
            err.transient = _looks_transient(exc)
            raise err from exc
        except Exception as exc:  # e.g. sqlite "database is locked" surfacing raw
            raise SinkError(f"{type(exc).__name__}: {exc}", transient=_looks_transient(exc)) from exc

    def _post_batch(self, body: bytes) -> None:
        import requests
        from mlflow.utils.rest_utils import http_request

        try:
            resp = http_request(self._host_creds, "/api/2.0/mlflow/runs/log-batch", "POST",
                                max_retries=0, backoff_factor=0, timeout=self.request_timeout,
                                raise_on_status=False, data=body,
                                extra_headers={"Content-Type": "application/json"})
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}", transient=True) from exc
        except MlflowException as exc:  # mlflow wraps urllib3's errors in some versions
            raise SinkError(str(exc), transient=True) from exc
        if resp.status_code == 200:
            return
        code, message = "", resp.text[:500]
        try:
            payload = resp.json()
            code, message = payload.get("error_code", ""), payload.get("message", message)
        except ValueError:
            pass
        transient = resp.status_code in TRANSIENT_HTTP or code in TRANSIENT_CODES
        raise SinkError(f"HTTP {resp.status_code} {code}: {message}".strip(), transient=transient,
                        retry_after=_retry_after(resp.headers))

    # -- artifacts -----------------------------------------------------------------------
    def write_artifact(self, artifact: Artifact) -> None:
        assert artifact.local_path is not None, "artifacts reach sinks as local files"
        try:
            if artifact.is_dir:
                self.client.log_artifacts(artifact.run_id, artifact.local_path, artifact.artifact_path)
            else:
                self.client.log_artifact(artifact.run_id, artifact.local_path, artifact.artifact_path)
        except MlflowException as exc:
            raise classify_mlflow_exception(exc) from exc
        except OSError as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}", transient=_looks_transient(exc)) from exc
        except Exception as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}", transient=_looks_transient(exc)) from exc

    def __repr__(self) -> str:
        return f"<MlflowSink {_redact(self.tracking_uri)!r}>"


def _json_number(v: float) -> str:
    # proto3 JSON spells non-finite doubles as strings; the server parses them back.
    if v != v:
        return '"NaN"'
    if v in (math.inf, -math.inf):
        return '"Infinity"' if v > 0 else '"-Infinity"'
    return repr(v)


def batch_json(batch: Batch) -> bytes:
    """The ``log-batch`` request body, written straight from the records.

    Building MLflow entities and protobuf messages first (what ``MlflowClient`` does)
    costs about two thirds of the writer's CPU per batch; the JSON is simple enough to
    write directly.
    """
    dumps = json.dumps
    metrics = ",".join(f'{{"key":{dumps(m.key)},"value":{_json_number(m.value)},"timestamp":{m.timestamp},'
                       f'"step":{m.step}}}' for m in batch.metrics)
    params = ",".join(f'{{"key":{dumps(p.key)},"value":{dumps(p.value)}}}' for p in batch.params)
    tags = ",".join(f'{{"key":{dumps(t.key)},"value":{dumps(t.value)}}}' for t in batch.tags)
    return (f'{{"run_id":{dumps(batch.run_id)},"metrics":[{metrics}],"params":[{params}],'
            f'"tags":[{tags}]}}').encode()


def _looks_transient(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("database is locked", "database is busy", "timed out", "connection refused",
                                   "connection reset", "could not connect", "too many connections"))


def _redact(uri: str) -> str:
    """Hide credentials in a URI before it is printed."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password or parts.username:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"***@{netloc}"))
    return uri


# -- plugin hooks ------------------------------------------------------------------------
@hookimpl
def mlflow_er_sink_names() -> list[str]:
    return [NAME]


@hookimpl
def mlflow_er_make_sink(name: str, context: SinkContext) -> Sink | None:
    if name != NAME:
        return None
    timeout = float(context.options.get("request_timeout", os.environ.get("MLFLOW_ER_REQUEST_TIMEOUT", 30)))
    return MlflowSink(context.tracking_uri, request_timeout=timeout)
