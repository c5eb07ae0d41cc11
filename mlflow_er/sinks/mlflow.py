"""The ``mlflow`` sink: writes batches and artifacts to an MLflow tracking store.

It owns its own ``MlflowClient`` on the tracker's tracking URI. Against an HTTP server it
sends ``log-batch`` requests itself with MLflow's request helper and **no MLflow-level
retries** (MLflow's default is ~4 minutes of urllib3 retries): the backend's retry policy
is the only one, so the two never stack, and the user's global settings are untouched.

Only MLflow's own answer counts as delivered: ``200`` with ``application/json`` and a JSON
object. Redirects are never followed (a login or SSO proxy answers a redirect, then an HTML
page with 200); any reply that is not the store's is a *transient* failure, retried until the
deadline and then raised by ``flush()``/``close()``: the store never judged the records, so
declaring them bad (permanent) would let ``mlflow-er sync`` move past them and lose them.
Every message this sink produces goes through :func:`mlflow_er.redact.redact`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param as MlflowParam
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from ..errors import SinkError
from ..hookspecs import SinkContext, hookimpl
from ..records import MAX_METRICS_PER_BATCH, Artifact, Batch, split_batches
from ..redact import redact, redact_uri
from .base import Sink
from .sql_metrics import SQL_METRICS_PER_WRITE, SqlMetricWriter

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


# Status codes of a reply that is not MLflow's (no JSON error object) and still a verdict on
# the request itself: bisecting the batch into smaller requests is what helps.
_SIZE_HTTP = frozenset({413, 414, 431})
_RUN_GONE = re.compile(r"must be in the 'active' state|\bis not active\b|current state is deleted"
                       r"|lifecycle[_ ]stage[^.]*deleted|\brun\b[^.]*\b(?:is|was|has been) deleted", re.I)


def run_rejected(code: str, message: str) -> bool:
    """True when the store says the run itself no longer accepts writes (deleted, not found, not active)."""
    if code == "INVALID_STATE":
        return True
    if code == "RESOURCE_DOES_NOT_EXIST" and re.search(r"\brun\b", message, re.I):
        return True
    return bool(_RUN_GONE.search(message))


def overloaded(message: str) -> bool:
    """The server's database pool ran dry: MLflow reports it as BAD_REQUEST, but retrying is right.

    (MLflow turns SQLAlchemy's pool ``TimeoutError`` — "QueuePool limit of size N overflow M
    reached, connection timed out" — into ``BAD_REQUEST``; found with 16 writers on PostgreSQL.)
    """
    text = message.lower()
    return "queuepool limit" in text or ("connection timed out" in text and "pool" in text)


def classify_mlflow_exception(exc: MlflowException) -> SinkError:
    """Turn an ``MlflowException`` from a store into a transient or permanent :class:`SinkError`.

    A run that no longer accepts writes gives ``whole_run=True`` (and is never transient).
    """
    code = getattr(exc, "error_code", "") or ""
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else 500
    message = str(exc.message if hasattr(exc, "message") else exc)
    whole_run = run_rejected(code, message)
    transient = not whole_run and (code in TRANSIENT_CODES or (code == "" and status in TRANSIENT_HTTP)
                                   or overloaded(message))
    err = SinkError(redact(f"{code or 'error'}: {message}"), transient=transient, whole_run=whole_run)
    return _caused_by(err, exc)


def _caused_by(err: SinkError, exc: BaseException) -> SinkError:
    """Chain ``exc`` for debugging, unless its text holds a credential (a traceback would print it)."""
    if redact(exc) == str(exc):
        err.__cause__ = exc
    err.__suppress_context__ = True
    return err


def _snippet(content: bytes, limit: int = 160) -> str:
    text = " ".join(content[:2000].decode("utf-8", "replace").split())
    return redact(text[:limit] + ("..." if len(text) > limit else ""))


def check_reply(resp: Any, what: str, *, json_object: bool = True) -> None:
    """Raise :class:`SinkError` unless ``resp`` is MLflow's own success reply to ``what``.

    Success: status 200 and, when ``json_object``, ``application/json`` with a JSON object
    (``{}`` for log-batch) that is not an error. Without ``json_object`` (an artifact PUT, which
    MLflow answers with an empty body) an empty body or a JSON object is accepted, an HTML
    page is not. A JSON error object with ``error_code`` is the store's verdict (transient by
    code/status; a run that no longer accepts writes is ``whole_run``); anything else is not
    MLflow's reply and transient, except a size refusal (413/414/431) that bisection can fix.
    """
    status = int(resp.status_code)
    headers = resp.headers if resp.headers is not None else {}
    retry_after = _retry_after(headers)
    if 300 <= status < 400:
        where = redact(headers.get("Location") or "?")
        raise SinkError(f"{what}: HTTP {status} redirect to {where} is not MLflow's reply (a login or SSO proxy in "
                        "front of the tracking server?); nothing was stored; the records are kept and retried "
                        "until the retry deadline — give the client direct access to the server, or the proxy "
                        "credentials it expects", transient=True, retry_after=retry_after)
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    content: bytes = resp.content or b""
    empty = not content.strip()
    try:
        payload: Any = None if empty else json.loads(content)
    except ValueError:
        payload = ...  # not JSON at all
    is_object = isinstance(payload, dict)
    error_code = str(payload.get("error_code") or "") if is_object else ""
    if json_object and status == 200 and not error_code and ctype == "application/json" and is_object:
        return
    if not json_object and 200 <= status < 300 and not error_code and "html" not in ctype and (
            empty or is_object):
        return
    if status != 200 and is_object and error_code:
        message = str(payload.get("message") or "")
        whole_run = run_rejected(error_code, message)
        transient = not whole_run and (status in TRANSIENT_HTTP or error_code in TRANSIENT_CODES
                                       or overloaded(message))
        raise SinkError(redact(f"HTTP {status} {error_code}: {message}").strip(), transient=transient,
                        retry_after=retry_after, whole_run=whole_run)
    kind = "an HTML page" if "html" in ctype else f"content type {ctype or 'none'}"
    shape = ("empty" if empty else "not JSON" if payload is ... else "JSON null" if payload is None
             else f"JSON {type(payload).__name__}" + (" without error_code" if is_object else ""))
    hint = ""
    if "html" in ctype:
        hint = " (a login page, captive portal or another web server answered, not MLflow)"
    elif status in (401, 403, 407):
        hint = (" (check the credentials: user:password in the URI, or MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)")
    raise SinkError(f"{what}: HTTP {status} with {kind}, body {shape} ({len(content)} bytes: "
                    f"{_snippet(content)!r}) is not MLflow's reply{hint}; nothing counts as stored",
                    transient=status not in _SIZE_HTTP, retry_after=retry_after)


_NO_REPLY = {"refused": "connection refused", "timeout": "timed out", "dns": "host name not resolved",
             "tls": "TLS handshake failed", "error": "connection failed"}


def _request_error(what: str, url: str, exc: Exception) -> SinkError:
    """A request that got no (complete) reply: refused, reset, timed out, cut off. Transient."""
    from mlflow.exceptions import InvalidUrlException

    from ..probe import classify

    chain = [exc]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
        if len(chain) > 10:
            break
    inner = chain[-1]
    text = str(inner)
    kind = "cut off" if "IncompleteRead" in text or "Connection broken" in text else (
        "connection reset" if "reset" in text.lower() else _NO_REPLY[classify(exc)])
    # MLflow's message quotes the URL, credentials included: keep only redacted text, and do
    # not chain the original (a traceback would print it).
    err = SinkError(redact(f"{what}: no reply from {url} ({kind}): {type(inner).__name__}: {text[:300]}"),
                    transient=not isinstance(exc, InvalidUrlException))
    err.__suppress_context__ = True
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
        self._inner_uri = inner_uri(tracking_uri)
        self.client = MlflowClient(self._inner_uri)
        store = self.client._tracking_client.store
        # Only REST stores expose host credentials; they get the retry-free path.
        self._host_creds = store.get_host_creds() if hasattr(store, "get_host_creds") else None
        self._repos: dict[str, Any] = {}  # run id -> its HTTP artifact repository (None: use MLflow's client)
        # MLflow's SQL store: metrics-only batches skip the ORM (see sql_metrics for why and when).
        self._sql = SqlMetricWriter.for_store(store) if self._host_creds is None else None
        #: Metrics one write_batch may carry (the lane joins metrics-only batches up to it): the SQL
        #: fast path takes 10,000 in one transaction; MLflow's log_batch takes 1,000.
        self.max_metrics_per_write = SQL_METRICS_PER_WRITE if self._sql is not None else MAX_METRICS_PER_BATCH

    # -- batches -------------------------------------------------------------------------
    def write_batch(self, batch: Batch) -> None:
        if self._host_creds is not None:
            self._post_batch(batch_json(batch))
            return
        if self._sql is not None and not batch.params and not batch.tags and batch.metrics:
            if self._sql.write(batch.run_id, batch.metrics):
                return
            if len(batch.metrics) > MAX_METRICS_PER_BATCH:  # a joined batch handed back: log_batch's limit
                for part in split_batches(batch.run_id, list(batch.metrics)):
                    self._log_batch(part)
                return
        self._log_batch(batch)

    def _log_batch(self, batch: Batch) -> None:
        """One batch through MLflow's own ``log_batch`` (a local store), errors classified."""
        metrics = [MlflowMetric(m.key, m.value, m.timestamp, m.step) for m in batch.metrics]
        params = [MlflowParam(p.key, p.value) for p in batch.params]
        tags = [RunTag(t.key, t.value) for t in batch.tags]
        try:
            self.client.log_batch(batch.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        except MlflowException as exc:
            err = classify_mlflow_exception(exc)
            # A local store reports a bad row (e.g. an int too large for SQLite) as
            # INTERNAL_ERROR too; only lock contention is worth retrying there.
            err.transient = not err.whole_run and _looks_transient(exc)
            raise err from err.__cause__
        except Exception as exc:  # e.g. sqlite "database is locked" surfacing raw
            err = _caused_by(SinkError(redact(f"{type(exc).__name__}: {exc}"), transient=_looks_transient(exc)), exc)
            raise err from err.__cause__

    def _request(self, what: str, creds: Any, endpoint: str, method: str, **kwargs: Any) -> Any:
        """One HTTP request through MLflow's helper: no retries, no redirects, bounded, errors redacted."""
        from mlflow.utils.rest_utils import http_request

        try:
            return http_request(creds, endpoint, method, max_retries=0, backoff_factor=0,
                                timeout=self.request_timeout, raise_on_status=False, allow_redirects=False,
                                **kwargs)
        except Exception as exc:  # mlflow wraps requests' errors (with the URL) in MlflowException
            raise _request_error(what, creds.host.rstrip("/") + endpoint, exc) from None

    def _post_batch(self, body: bytes) -> None:
        resp = self._request("log-batch", self._host_creds, "/api/2.0/mlflow/runs/log-batch", "POST", data=body,
                             extra_headers={"Content-Type": "application/json"})
        check_reply(resp, "log-batch")

    # -- artifacts -----------------------------------------------------------------------
    def write_artifact(self, artifact: Artifact) -> None:
        assert artifact.local_path is not None, "artifacts reach sinks as local files"
        repo = self._http_artifact_repo(artifact.run_id) if self._host_creds is not None else None
        if repo is not None:
            self._put_artifact(repo, artifact)
            return
        try:
            if artifact.is_dir:
                self.client.log_artifacts(artifact.run_id, artifact.local_path, artifact.artifact_path)
            else:
                self.client.log_artifact(artifact.run_id, artifact.local_path, artifact.artifact_path)
        except MlflowException as exc:
            err = classify_mlflow_exception(exc)
            raise err from err.__cause__
        except Exception as exc:
            err = _caused_by(SinkError(redact(f"{type(exc).__name__}: {exc}"), transient=_looks_transient(exc)), exc)
            raise err from err.__cause__

    def _http_artifact_repo(self, run_id: str) -> Any:
        """The run's artifact repository when uploads go over HTTP to the server (else ``None``)."""
        if run_id in self._repos:
            return self._repos[run_id]
        from mlflow.environment_variables import MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        resp = self._request("runs/get", self._host_creds, "/api/2.0/mlflow/runs/get", "GET",
                             params={"run_id": run_id})
        check_reply(resp, "runs/get")
        try:
            artifact_uri = resp.json()["run"]["info"]["artifact_uri"]
        except (KeyError, TypeError, ValueError):
            raise SinkError(f"runs/get: reply without run.info.artifact_uri ({_snippet(resp.content)!r}) is not "
                            "MLflow's reply", transient=True) from None
        repo: Any = get_artifact_repository(artifact_uri, tracking_uri=self._inner_uri)
        # Multipart uploads (opt-in) talk to presigned URLs: leave those to MLflow's own client.
        if not isinstance(repo, HttpArtifactRepository) or MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD.get():
            repo = None
        if len(self._repos) >= 256:
            self._repos.pop(next(iter(self._repos)))
        self._repos[run_id] = repo
        return repo

    def _put_artifact(self, repo: Any, artifact: Artifact) -> None:
        """Upload a file or a folder's files with one checked, redirect-free PUT each."""
        import posixpath

        from mlflow.store.artifact.artifact_repo import verify_artifact_path
        from mlflow.utils.mime_type_utils import _guess_mime_type

        local, dest = str(artifact.local_path), artifact.artifact_path
        verify_artifact_path(dest)
        files: list[tuple[str, str | None]] = []
        if artifact.is_dir:
            for root, _, names in os.walk(local):
                rel = os.path.relpath(root, local)
                parts = [p for p in (dest, *([] if rel == "." else rel.split(os.sep))) if p]
                files += [(os.path.join(root, n), posixpath.join(*parts) if parts else None) for n in sorted(names)]
        else:
            files.append((local, dest))
        creds = repo._host_creds
        for path, folder in files:
            name = os.path.basename(path)
            endpoint = posixpath.join("/", *((folder, name) if folder else (name,)))
            try:
                with open(path, "rb") as f:
                    resp = self._request("artifact upload", creds, endpoint, "PUT", data=f,
                                         extra_headers={"Content-Type": _guess_mime_type(name)})
            except OSError as exc:
                raise SinkError(f"artifact {name!r}: {type(exc).__name__}: {exc}", transient=False) from None
            check_reply(resp, f"artifact upload of {name!r}", json_object=False)

    def __repr__(self) -> str:
        return f"<MlflowSink {redact(self.tracking_uri)!r}>"


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


#: Kept for callers of the old private name: deterministic URI-only redaction (the sync state key
#: hashes it). For messages use :func:`mlflow_er.redact.redact`.
_redact = redact_uri


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
