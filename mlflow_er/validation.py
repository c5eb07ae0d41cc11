"""Caller-side validation with MLflow's own rules.

A record is checked before it is queued so that one bad value never poisons a merged
``log_batch`` later, far from the line that logged it. Keys that passed once are cached:
in steady state a key costs one set lookup.
"""

from __future__ import annotations

import decimal
import math
import numbers
import posixpath
import re

from .errors import InvalidRecord

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_KEY_RE = re.compile(r"^[/\w.\- :]*$")

# Keys that passed validation. Bounded so a program inventing keys forever cannot grow
# it without limit; past the bound we simply validate again (correct, a bit slower).
_VALID_KEYS: set[str] = set()
_VALID_KEYS_MAX = 100_000


def check_key(key: object, field: str = "metric key") -> str:
    """Validate a metric/param/tag key; return it. Raises :class:`InvalidRecord`."""
    if key in _VALID_KEYS:  # the hot path: one lookup
        return key  # type: ignore[return-value]
    if not isinstance(key, str):
        raise InvalidRecord(field, f"must be a str, got {type(key).__name__} {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRecord(field, f"{key[:40]!r}... is {len(key)} characters long", f"{MAX_KEY_LENGTH}")
    if not _KEY_RE.fullmatch(key):  # fullmatch: "$" alone would let a trailing "\n" through
        raise InvalidRecord(
            field,
            f"{key!r} contains characters MLflow rejects",
            "alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), colon(:) and slashes (/)",
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        raise InvalidRecord(field, f"{key!r} is not a normalized relative path", "e.g. no '//', '..', leading '/'")
    if len(_VALID_KEYS) < _VALID_KEYS_MAX:
        _VALID_KEYS.add(key)
    return key


def check_metric_value(key: str, value: object) -> float:
    """Return ``value`` as a float. NaN and ±inf are kept (MLflow stores ±inf as ±max float).

    Accepted: real numbers (not bool), ``decimal.Decimal`` (MLflow takes any number it can
    turn into a float), and objects whose ``.item()`` gives one (numpy scalars, 0-d arrays,
    one-element tensors). An ``.item()`` that raises is reported as :class:`InvalidRecord`.
    """
    if isinstance(value, decimal.Decimal):
        try:
            return float(value)
        except (ValueError, OverflowError) as exc:  # a signalling NaN
            raise InvalidRecord(f"metric value for {key!r}", f"{value!r:.60} is not a float64 value") from exc
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # numpy scalars and 0-d arrays expose .item(); accept them if they hold a real number
        item = getattr(value, "item", None)
        if item is not None and not isinstance(value, bool):
            try:
                inner = item()
            except (ValueError, TypeError):
                inner = None
            except Exception as exc:  # e.g. a tensor on a failed device: name the key, keep the cause
                raise InvalidRecord(f"metric value for {key!r}",
                                    f"{type(value).__name__}.item() raised {type(exc).__name__}: {exc}"[:300]
                                    ) from exc
            if isinstance(inner, numbers.Real) and not isinstance(inner, bool):
                return float(inner)
            if isinstance(inner, decimal.Decimal):
                return check_metric_value(key, inner)
        raise InvalidRecord(
            f"metric value for {key!r}",
            f"must be a real number (int or float, not bool), got {type(value).__name__} {value!r:.60}",
        )
    try:
        return float(value)
    except (OverflowError, ValueError) as exc:
        raise InvalidRecord(f"metric value for {key!r}", f"{value!r:.60} does not fit a float64") from exc


def check_step(key: str, step: object) -> int:
    """Return the step as an int within int64."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise InvalidRecord(f"step for {key!r}", f"must be an int, got {type(step).__name__} {step!r:.60}")
    step = int(step)
    if not INT64_MIN <= step <= INT64_MAX:
        raise InvalidRecord(f"step for {key!r}", f"{step} is out of range", "int64")
    return step


def check_timestamp(key: str, timestamp: object) -> int:
    """Return the timestamp (ms since the epoch) as a non-negative int64."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real) or (
        isinstance(timestamp, float) and not math.isfinite(timestamp)
    ):
        raise InvalidRecord(f"timestamp for {key!r}", f"must be an int (ms), got {timestamp!r:.60}")
    ts = int(timestamp)  # type: ignore[call-overload]  # a numbers.Real: int() works on every one
    if not 0 <= ts <= INT64_MAX:
        raise InvalidRecord(f"timestamp for {key!r}", f"{ts} is out of range", "0 <= timestamp (ms) <= int64 max")
    return ts


def metric_fields(key: object, value: object, step: object) -> tuple[float, int]:
    """Validate one metric; return ``(value, step)`` as stored (``step=None`` means 0).

    The common case (a cached key, a float, an int step) costs three type checks and no
    call; anything else goes through the full checks above.
    """
    if key not in _VALID_KEYS:
        check_key(key, "metric key")
    if type(value) is not float:
        value = check_metric_value(key, value)  # type: ignore[arg-type]
    if step is None:
        step = 0
    elif type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
        step = check_step(key, step)  # type: ignore[arg-type]
    return value, step  # type: ignore[return-value]


def check_param_unchanged(key: str, previous: str | None, value: str) -> None:
    """MLflow params are immutable within a run: a different value for a logged key is refused."""
    if previous is not None and previous != value:
        raise InvalidRecord(f"param {key!r}", f"already logged as {previous!r}, cannot change to {value!r:.80}",
                            "MLflow params are immutable within a run")


def _bounded_str(kind: str, key: str, value: object, limit: int) -> str:
    s = value if type(value) is str else str(value)
    if len(s) > limit:
        raise InvalidRecord(f"{kind} value for {key!r}",
                            f"is {len(s)} characters long; MLflow would truncate it, mlflow-er refuses to lose data",
                            f"{limit} characters")
    return s


def check_param_value(key: str, value: object) -> str:
    """Return the param value as MLflow stores it (``str(value)``), refusing to truncate."""
    return _bounded_str("param", key, value, MAX_PARAM_VALUE_LENGTH)


def check_tag_value(key: str, value: object) -> str:
    """Return the tag value as a str, refusing values MLflow would truncate."""
    return _bounded_str("tag", key, value, MAX_TAG_VALUE_LENGTH)


def check_artifact_path(artifact_path: str | None) -> str | None:
    """An artifact destination folder must be a relative path inside the run."""
    if artifact_path is None or artifact_path == "":
        return None
    if not isinstance(artifact_path, str):
        raise InvalidRecord("artifact_path", f"must be a str, got {type(artifact_path).__name__}")
    norm = posixpath.normpath(artifact_path)
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise InvalidRecord("artifact_path", f"{artifact_path!r} escapes the run's artifact root")
    return norm
