"""The run handle yielded by ``tracker.run(...)``: validate, stamp, hand off.

Every ``log_*`` method runs on the caller's thread and does only three things:
validate with MLflow's rules (cached for keys), stamp the wall-clock timestamp (ms) and a
per-run sequence number, and hand the record to the backend. With the ``threaded``
backend that is an append to a buffer, a few microseconds in total.
"""

from __future__ import annotations

import copy
import itertools
import os
import posixpath
import time
from array import array
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import artifacts
from .errors import InvalidRecord, MlflowErError
from .records import Artifact, Metric, Param, RunEnd, RunStart, Tag
from .validation import (
    _VALID_KEYS,
    INT64_MAX,
    INT64_MIN,
    check_artifact_path,
    check_key,
    check_metric_value,
    check_param_unchanged,
    check_param_value,
    check_step,
    check_tag_value,
    check_timestamp,
    metric_fields,
)

if TYPE_CHECKING:
    from mlflow.entities import RunData, RunInfo

    from .backends.base import Backend

_LAT_SLOTS = 4096  # ring of recent caller latencies (ns); enough for stable p99


class Run:
    """A live MLflow run. Obtain one from :meth:`ExperimentTracker.run`."""

    def __init__(self, run_id: str, backend: Backend, client: Any, params: Mapping[str, str] | None = None,
                 tracker: Any = None):
        # ``tracker`` is accepted for callers of 0.2 and not kept: a run needs only its backend.
        self.run_id = run_id
        self._backend = backend
        self._submit = backend.submit
        self._submit_many = backend.submit_many
        self._client = client
        self.ended: str | None = None  # the status the block ended with, once it has
        self._seq = itertools.count()
        self._params: dict[str, str] = dict(params or {})
        self._lat = array("q", bytes(8 * _LAT_SLOTS))
        self._calls = itertools.count()
        self._snapshots = getattr(backend, "snapshots", True)

    # -- MLflow-like read access ---------------------------------------------------------
    def _stored(self) -> Any:
        if self._client is None:
            from .errors import MlflowErError

            raise MlflowErError("this run is offline (spool-only sinks): it is in MLflow only after `mlflow-er sync`")
        return self._client.get_run(self.run_id)

    @property
    def info(self) -> RunInfo:
        """The run's ``RunInfo`` as the tracking store has it now."""
        return self._stored().info

    @property
    def data(self) -> RunData:
        """The run's ``RunData`` (metrics, params, tags) as the tracking store has it now."""
        return self._stored().data

    # -- metrics ---------------------------------------------------------------------------
    def log_metric(self, key: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Log one metric value (``step`` defaults to 0, ``timestamp`` to now, in ms)."""
        t0 = time.perf_counter_ns()
        # validation.metric_fields, inlined: one call less on the hottest path (~5 % of it)
        if key not in _VALID_KEYS:
            check_key(key, "metric key")
        if type(value) is not float:
            value = check_metric_value(key, value)
        if step is None:
            step = 0
        elif type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
            step = check_step(key, step)
        ts = time.time_ns() // 1_000_000 if timestamp is None else check_timestamp(key, timestamp)
        self._submit(Metric(self.run_id, key, value, ts, step, next(self._seq)))
        self._lat[next(self._calls) % _LAT_SLOTS] = time.perf_counter_ns() - t0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    timestamp: int | None = None) -> None:
        """Log several metrics at one step; all are validated before any is queued."""
        t0 = time.perf_counter_ns()
        if step is None:
            step = 0
        elif type(step) is not int or not INT64_MIN <= step <= INT64_MAX:
            step = check_step("metrics", step)
        ts = time.time_ns() // 1_000_000 if timestamp is None else check_timestamp("metrics", timestamp)
        recs = [(key, metric_fields(key, value, step)[0]) for key, value in metrics.items()]
        rid, seq = self.run_id, self._seq
        self._submit_many([Metric(rid, k, v, ts, step, next(seq)) for k, v in recs])
        self._lat[next(self._calls) % _LAT_SLOTS] = time.perf_counter_ns() - t0

    # -- params ----------------------------------------------------------------------------
    def _param(self, key: str, value: Any) -> Param | None:
        check_key(key, "param key")
        sval = check_param_value(key, value)
        prev = self._params.get(key)
        check_param_unchanged(key, prev, sval)
        if prev is not None:
            return None  # same value again: nothing new to send
        return Param(self.run_id, key, sval, time.time_ns() // 1_000_000, next(self._seq))

    def log_param(self, key: str, value: Any) -> Any:
        """Log one parameter (stored as ``str(value)``); returns ``value`` like MLflow."""
        rec = self._param(key, value)
        if rec is not None:
            self._params[key] = rec.value
            self._submit(rec)
        return value

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log several parameters; all are validated before any is queued."""
        staged: dict[str, Param] = {}
        for key, value in params.items():
            rec = self._param(key, value)
            if rec is not None:
                staged[key] = rec
        for key, rec in staged.items():
            self._params[key] = rec.value
        if staged:
            self._submit_many(list(staged.values()))

    # -- tags ------------------------------------------------------------------------------
    def set_tag(self, key: str, value: Any) -> None:
        """Set one tag; the last value set wins, as written."""
        check_key(key, "tag key")
        self._submit(Tag(self.run_id, key, check_tag_value(key, value), time.time_ns() // 1_000_000,
                         next(self._seq)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several tags; all are validated before any is queued."""
        ts = time.time_ns() // 1_000_000
        staged = []
        for key, value in tags.items():
            check_key(key, "tag key")
            staged.append((key, check_tag_value(key, value)))
        self._submit_many([Tag(self.run_id, k, v, ts, next(self._seq)) for k, v in staged])

    # -- artifacts -------------------------------------------------------------------------
    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file; it is snapshotted now, so the caller may change or delete it at once."""
        dest = check_artifact_path(artifact_path)
        if os.path.isdir(local_path):
            raise InvalidRecord("artifact local_path", f"{str(local_path)!r} is a directory; use log_artifacts")
        # stat only, nothing opened: a FIFO, socket or device is refused before it can block
        st = artifacts.check_source(local_path)
        name = os.path.basename(os.fspath(local_path))
        if not self._snapshots:
            self._submit(Artifact(self.run_id, os.fspath(local_path), dest, time.time_ns() // 1_000_000,
                                  next(self._seq), False, False, None, name, st.st_size))
            return
        snap, _, size, fp = artifacts.snapshot(local_path)
        self._submit(Artifact(self.run_id, snap, dest, time.time_ns() // 1_000_000, next(self._seq), True,
                              False, None, name, size, fp))

    def log_artifacts(self, local_dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload the contents of a directory (snapshotted now)."""
        dest = check_artifact_path(artifact_path)
        if not os.path.isdir(local_dir):
            raise InvalidRecord("artifact local_dir", f"{str(local_dir)!r} is not a directory")
        name = os.path.basename(os.fspath(local_dir))
        if not self._snapshots:
            artifacts.check_source(local_dir, "artifact local_dir")  # no FIFO, socket or device inside
            self._submit(Artifact(self.run_id, os.fspath(local_dir), dest, time.time_ns() // 1_000_000,
                                  next(self._seq), False, True, None, name, 0))
            return
        snap, _, size, fp = artifacts.snapshot(local_dir)
        self._submit(Artifact(self.run_id, snap, dest, time.time_ns() // 1_000_000, next(self._seq), True,
                              True, None, name, size, fp))

    def _payload(self, kind: str, content: Any, artifact_file: str) -> None:
        if not isinstance(artifact_file, str) or not artifact_file or artifact_file.endswith("/"):
            raise InvalidRecord("artifact_file", f"{artifact_file!r} must be a file name, e.g. 'plots/loss.png'")
        folder, name = posixpath.split(artifact_file)
        dest = check_artifact_path(folder)
        if kind == "json":
            # Serialise now: an object that cannot be written fails at the call (InvalidRecord
            # naming the file), not later in the writer, and the text is cheaper to queue.
            kind, content = "text", artifacts.dump_dict(content, artifact_file)
        self._submit(Artifact(self.run_id, None, dest, time.time_ns() // 1_000_000, next(self._seq), True,
                              False, (kind, content), name))

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a numpy array or PIL image as ``artifact_file``; encoded off the caller's thread."""
        self._payload("image", artifacts.copy_image(image), artifact_file)

    def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        """Log a JSON-serialisable object as JSON (or YAML for ``.yaml``/``.yml``)."""
        self._payload("json", copy.deepcopy(dictionary), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log a string as a text file."""
        if not isinstance(text, str):
            raise InvalidRecord("text", f"must be a str, got {type(text).__name__}")
        self._payload("text", text, artifact_file)

    # -- the run's start and end travel in the stream, like its records --------------------
    def _begin(self, run_name: str | None = None, parent_run_id: str | None = None,
               description: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        self._submit(RunStart(self.run_id, time.time_ns() // 1_000_000, next(self._seq), run_name, parent_run_id,
                              description, dict(tags or {})))

    def _end(self, status: str) -> None:
        """Queue the run's end after everything logged so far; any later log call raises at once."""
        self._submit(RunEnd(self.run_id, time.time_ns() // 1_000_000, next(self._seq), status))
        self.ended = status
        self._submit = self._submit_many = self._refuse  # type: ignore[method-assign,assignment]

    def _refuse(self, *_: Any) -> None:
        raise MlflowErError(f"run {self.run_id} has ended ({self.ended}): log inside its `with tracker.run(...)` "
                            "block, or open it again with tracker.run(run_id=...)")

    # -- delivery --------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything logged so far is delivered; raise ``DeliveryError`` for failures."""
        self._backend.flush(timeout)

    def stats(self) -> dict[str, Any]:
        """Backend health plus this run's caller-side latency (µs): p50, p99, max of recent calls."""
        out = dict(self._backend.stats())
        # repr(count) is "count(N)": reading it does not consume a value, unlike next()
        n = min(int(repr(self._calls)[6:-1]), _LAT_SLOTS)
        samples = sorted(self._lat[:n])
        if samples:
            out["latency_us"] = {"p50": samples[n // 2] / 1000, "p99": samples[min(n - 1, n * 99 // 100)] / 1000,
                                 "max": samples[-1] / 1000, "samples": n}
        out["run_id"] = self.run_id
        return out

    def __repr__(self) -> str:
        return f"<mlflow_er.Run {self.run_id}>"
