"""Check a tracking URI before anything is logged, and say what to do when it cannot be used.

:func:`probe_server` connects the way MLflow's own client does — MLflow's ``http_request`` with
the host credentials MLflow would use (``user:password@`` in the URI, ``MLFLOW_TRACKING_USERNAME``/
``MLFLOW_TRACKING_PASSWORD``, a token, ``~/.mlflow/credentials``, TLS settings) — with no retries
and a hard bound on the total time, DNS included. A failure raises
:class:`~mlflow_er.errors.TrackingUnavailable` whose ``kind`` tells the cases apart
(``"refused"``, ``"timeout"``, ``"dns"``, ``"tls"``, ``"error"``) and whose message names the URL
(credentials hidden) and the next step.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import TrackingUnavailable
from .mlflow_uris import MODES
from .redact import redact

__all__ = ["PROBE_TIMEOUT", "check_scheme", "normalize_tracking_uri", "probe_server"]

PROBE_TIMEOUT = 5.0

_OFFLINE_HINT = 'or log offline now with `sinks=["spool"]` and replay later with `mlflow-er sync`'


def normalize_tracking_uri(uri: str | os.PathLike[str] | None, probe: bool = True,
                           timeout: float = PROBE_TIMEOUT) -> str | None:
    """Check a tracking URI early so a typo fails in seconds, not after minutes of retries.

    Local paths and ``file:`` URIs must exist (returned as an absolute ``file://`` URI); a
    ``sqlite:`` store's folder must exist; an ``http(s)`` server must answer (when ``probe``).
    """
    if uri is None:
        return None
    uri = os.fspath(uri)
    parts = urlsplit(uri)
    if parts.scheme in ("", "file") or (len(parts.scheme) == 1 and os.name == "nt"):
        path = Path(parts.path if parts.scheme == "file" else uri).expanduser()
        if not path.exists():
            raise _unavailable("missing", f"tracking path {str(path)!r} does not exist: create the folder, or "
                                          "pass the URI of a tracking server (e.g. http://127.0.0.1:5000)")
        return path.resolve().as_uri()
    if parts.scheme == "sqlite":
        db = parts.path[1:]  # sqlite:///rel.db -> "rel.db", sqlite:////abs.db -> "/abs.db"
        if db and db != ":memory:" and not Path(db).expanduser().parent.exists():
            raise _unavailable("missing", f"folder of the SQLite tracking store {db!r} does not exist: "
                                          "create it first")
        return uri
    check_scheme(uri)
    if parts.scheme in ("http", "https") and probe:
        probe_server(uri, timeout)
    return uri


def _known_schemes() -> set[str]:
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):  # a private registry: without it, let MLflow decide
        return set()


def check_scheme(uri: str) -> None:
    """Raise :class:`TrackingUnavailable` (one line, with a suggestion) for a scheme no tracking store has.

    ``htp://host`` would otherwise surface as MLflow's multi-line traceback about the model registry.
    A ``threaded+``/``spool+``/``process+`` prefix is looked through; a driver suffix (``postgresql+psycopg2``) is fine.
    """
    scheme = urlsplit(uri).scheme.lower()
    known = _known_schemes()
    if not scheme or not known or scheme in known or (len(scheme) == 1 and os.name == "nt"):
        return
    parts = scheme.split("+")
    if parts[0] in MODES and len(parts) > 1:
        parts = parts[1:]
    if parts[0] in known:
        return
    import difflib

    plain = sorted(k for k in known if k and "+" not in k)
    close = difflib.get_close_matches(parts[0], plain, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}://? " if close else ""
    raise _unavailable("scheme", f"tracking URI {uri}: unknown scheme {parts[0]!r}; {hint}MLflow's tracking stores "
                                 f"take {', '.join(plain)} (or a local path), each also with a "
                                 f"{', '.join(m + '+' for m in MODES)} prefix")


def _unavailable(kind: str, message: str) -> TrackingUnavailable:
    exc = TrackingUnavailable(redact(message))
    exc.kind = kind
    return exc


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise :class:`TrackingUnavailable` unless something answers HTTP at ``uri`` within ``timeout`` s.

    Any HTTP answer counts as reachable (a 401/403/404 or a redirect too: what it means for
    logging is the mlflow sink's business). Never waits much longer than ``timeout``.
    """
    box: dict[str, Any] = {}

    def attempt() -> None:
        try:
            box["status"] = _get_health(uri, timeout)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    # A thread, because requests' timeout does not cover name resolution (getaddrinfo can
    # block for the resolver's own 5 s x attempts); a daemon so a stuck lookup never holds up exit.
    t = threading.Thread(target=attempt, name="mlflow-er-probe", daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if t.is_alive():
        raise _explain(uri, timeout, TimeoutError(f"no answer within {timeout:g}s"))
    if "error" in box:
        raise _explain(uri, timeout, box["error"]) from None


def _get_health(uri: str, timeout: float) -> int:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    resp = http_request(creds, "/health", "GET", max_retries=0, backoff_factor=0, timeout=timeout,
                        raise_on_status=False, allow_redirects=False)
    return int(resp.status_code)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen) or len(seen) > 20:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)],
                 getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), BaseException) else None]
    return seen


def classify(exc: BaseException) -> str:
    """``"dns"``, ``"tls"``, ``"refused"``, ``"timeout"`` or ``"error"`` for a failed connection attempt."""
    import socket
    import ssl

    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolutionError" in names or (
            "name or service not known" in text or "failed to resolve" in text
            or "temporary failure in name resolution" in text or "nodename nor servname" in text):
        return "dns"
    if any(isinstance(e, ssl.SSLError) for e in chain) or "SSLError" in names or "certificate verify failed" in text:
        return "tls"
    if any(isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED
           for e in chain) or "connection refused" in text:
        return "refused"
    if any(isinstance(e, (TimeoutError, socket.timeout)) for e in chain) or names & {
            "Timeout", "ConnectTimeout", "ReadTimeout", "ConnectTimeoutError", "ReadTimeoutError"} or (
            "timed out" in text):
        return "timeout"
    return "error"


def _explain(uri: str, timeout: float, exc: BaseException) -> TrackingUnavailable:
    parts = urlsplit(uri)
    url = redact(uri)
    host = parts.hostname or "?"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    kind = classify(exc)
    if kind == "refused":
        msg = (f"tracking server {url}: connection refused — nothing listens on {host}:{port}. Start one with "
               f"`mlflow server --host {host} --port {port}`, check the port, {_OFFLINE_HINT}")
    elif kind == "timeout":
        msg = (f"tracking server {url}: no answer within {timeout:g}s (timed out). The host may be down, a "
               f"firewall may drop the traffic, or the server is overloaded: check that `curl {url}/health` "
               f"answers, raise the timeout, {_OFFLINE_HINT}")
    elif kind == "dns":
        msg = (f"tracking server {url}: the host name {host!r} cannot be resolved (DNS). Check the host name for "
               f"a typo (use an IP address such as 127.0.0.1 for this machine), {_OFFLINE_HINT}")
    elif kind == "tls":
        other = "http" if parts.scheme == "https" else "https"
        msg = (f"tracking server {url}: the TLS handshake failed ({_reason(exc)}). If the server speaks plain "
               f"HTTP, use {other}:// ; if its certificate is self-signed, point MLFLOW_TRACKING_SERVER_CERT_PATH "
               f"at its CA bundle (or set MLFLOW_TRACKING_INSECURE_TLS=true); {_OFFLINE_HINT}")
    else:
        msg = f"tracking server {url} cannot be reached: {_reason(exc)}; check the URI, {_OFFLINE_HINT}"
    return _unavailable(kind, msg)


def _reason(exc: BaseException) -> str:
    # The innermost exception says what happened; MLflow's wrapper repeats the URL around it.
    inner = _chain(exc)[-1]
    return redact(f"{type(inner).__name__}: {inner}")[:300]
