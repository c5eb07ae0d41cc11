"""Hide credentials before anything is printed, logged or raised.

:func:`redact` takes a URI or any text (an exception message that quotes a URL, a log
line, a repr) and replaces:

* the user-info part of every ``scheme://user:password@host`` with ``***@``;
* ``Authorization: Basic …``/``Bearer …`` values and ``password=``/``token=``-style query or
  key-value pairs;
* every literal secret seen so far: a password found in a URI passed here once, and the values
  of ``MLFLOW_TRACKING_PASSWORD``/``MLFLOW_TRACKING_TOKEN``. MLflow's own messages sometimes
  quote a URL after ``urllib.parse`` has re-encoded or split it; remembering the literal catches
  those too.

:class:`RedactFilter` applies the same to every record of a :mod:`logging` logger or handler.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact", "redact_uri", "remember_secret", "RedactFilter"]

MASK = "***"

# scheme://userinfo@ — userinfo stops at the first '/', '?', '#' or whitespace; greedy up to the
# last '@' of the authority, as urllib.parse splits it (a password may contain a raw '@').
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s@'\"<>]*(?:@[^/?#\s@'\"<>]*)*)@")
_AUTH_HEADER = re.compile(r"(?i)(?P<key>\bauthorization['\"]?\s*[:=]\s*['\"]?(?:(?:basic|bearer|token|digest)\s+)?)"
                          r"(?P<value>[^\s'\",}]+)")
_BEARER = re.compile(r"\b(?P<key>Bearer\s+)(?P<value>[A-Za-z0-9+/=._~\-]{8,})")
_KV_SECRET = re.compile(r"(?i)(?P<key>\b(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key)"
                        r"['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s&'\",;}]+)")

# Secrets below this length are not replaced as literals: masking every "admin" or "pw" in a text
# would garble it; such a password is still hidden inside any URI it appears in.
_MIN_LITERAL = 6
_MAX_LITERALS = 64
_lock = threading.Lock()
_literals: set[str] = set()
_ENV_SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN")


def remember_secret(secret: str | None) -> None:
    """Mask ``secret`` (and its URL-decoded form) wherever it appears in text passed to :func:`redact`."""
    if not secret:
        return
    with _lock:
        for s in {secret, unquote(secret)}:
            if len(s) >= _MIN_LITERAL and len(_literals) < _MAX_LITERALS:
                _literals.add(s)


def redact_uri(uri: str) -> str:
    """``scheme://***@host:port/path`` for a URI with credentials, else ``uri`` unchanged.

    Deterministic (no remembered secrets, no text rules): ``mlflow-er sync`` keys its state by a
    hash of this string, so it must be the same in every process. Use :func:`redact` for text.
    """
    parts = urlsplit(uri)
    if parts.password or parts.username:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{MASK}@{netloc}"))
    return uri


def _uri_redact(uri: str) -> str:
    # A lone URI keeps the shape earlier versions printed ("scheme://***@host:port/path").
    remember_secret(urlsplit(uri).password)
    return redact_uri(uri)


def _userinfo(match: re.Match[str]) -> str:
    info = match.group("userinfo")
    if ":" in info:
        remember_secret(info.split(":", 1)[1])
    return f"{match.group('scheme')}{MASK}@"


def redact(text: Any) -> str:
    """``text`` (a URI, or any text, or an object's ``str``) with every credential replaced by ``***``."""
    s = text if isinstance(text, str) else str(text)
    for name in _ENV_SECRETS:
        remember_secret(os.environ.get(name))
    if "://" in s and not any(c.isspace() for c in s) and s.count("://") == 1 and "'" not in s and '"' not in s:
        try:
            s = _uri_redact(s)
        except ValueError:  # e.g. an invalid port: fall back to the text rules
            pass
    if "@" in s:
        s = _URI_USERINFO.sub(_userinfo, s)
    s = _AUTH_HEADER.sub(lambda m: f"{m.group('key')}{MASK}", s)
    s = _BEARER.sub(lambda m: f"{m.group('key')}{MASK}", s)
    s = _KV_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", s)
    with _lock:
        literals = sorted(_literals, key=len, reverse=True)
    for secret in literals:
        if secret in s:
            s = s.replace(secret, MASK)
    return s


class RedactFilter(logging.Filter):
    """A logging filter that redacts each record's message (arguments merged) and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging to report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record.exc_info = None
        return True
