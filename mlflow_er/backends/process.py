"""The ``process`` backend: delivery runs in another process, so training pays only for the call.

*The spool is the queue.* A log call appends the record to a ``deque`` (as with ``threaded``);
a small appender thread encodes what is queued into CRC-framed records of a private spool
segment (one ``write`` per chunk, group-committed ``fsync``) — a few microseconds of this
process's interpreter per record, never a request, a JSON body or a SQL statement. A spawned
delivery process (:mod:`mlflow_er.backends.follower`, a fresh interpreter, never a fork)
follows the segment, builds the same pipeline from the sinks' names and delivers; it
publishes how far it got and what failed.

* ``flush(timeout)`` waits until the delivery process has passed everything logged before it,
  and raises :class:`~mlflow_er.errors.DeliveryError` for what failed — as ``threaded`` does.
* SIGKILL of the training process: the delivery process delivers what was written, ends the
  runs that never ended as KILLED and exits. Death of the delivery process: it is restarted
  and resumes where it had published. At worst ``mlflow-er sync QUEUE_DIR`` replays the rest.
* ``close`` waits (bounded) for delivery; what is left keeps being delivered by the delivery
  process after this process exits, and the error says where the queue is.
* After ``fork()`` a child that logs gets a queue and a delivery process of its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import BackendClosed, DeliveryError, FailedRecord, MlflowErError, QueueFull
from ..records import MAX_METRICS_PER_BATCH, Artifact, Metric, RunEnd, RunStart, StreamItem
from ..unsent import flush_for_close
from .base import backend_hooks
from .follower import CLOSE, CONFIG, FAILURES, STATUS, read_json, write_json
from .queued import QueuedBackend

log = logging.getLogger(__name__)

NAME = "process"
_LIFECYCLE = (RunStart, RunEnd)


class _Marker:
    __slots__ = ("written", "upto")

    def __init__(self) -> None:
        self.written = threading.Event()
        self.upto = 0  # records appended to the queue when the marker was reached


class ProcessBackend(QueuedBackend):
    """Hand records to a delivery process through an on-disk queue (see the module docstring).

    :param max_queue: records waiting in memory for the appender before a log call waits.
    :param flush_interval: how often the appender writes what is queued (seconds).
    :param retry_deadline: seconds a batch keeps retrying transient failures (in the delivery process).
    :param close_timeout: what the ``atexit`` drain may take.
    :param queue_dir: where the queue lives (default: a new private folder under the staging directory).
    :param max_restarts: restarts of a dead delivery process before flush reports it as failed.
    """

    name = NAME

    def __init__(self, max_queue: int = 100_000, flush_interval: float = 0.05, retry_deadline: float = 300.0,
                 close_timeout: float = 30.0, queue_dir: str | None = None, max_restarts: int = 5,
                 block_timeout: float = 30.0):
        self.queue_dir = queue_dir
        self.max_restarts = max_restarts
        self._specs: list[tuple[str, Any]] = []
        self._tracking_uri: str | None = None
        super().__init__(max_queue=max_queue, flush_interval=flush_interval, retry_deadline=retry_deadline,
                         close_timeout=close_timeout, block_timeout=block_timeout)

    def _init_state(self) -> None:
        super()._init_state()
        self._root: Path | None = None
        self._writer: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._appender: threading.Thread | None = None
        self._appended = 0  # records (not run starts/ends) written to the queue
        self._failures_read = 0  # bytes of failures.jsonl already reported
        self._failed = 0
        self._restarts = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, pipeline: Any) -> None:
        specs = getattr(pipeline, "specs", None)
        if not specs or any(s is None for s in specs):
            raise MlflowErError("backend='process' builds its sinks by name in the delivery process: pass sink "
                                "names (sinks=['mlflow', 'spool']), not Sink instances")
        super().open(pipeline)
        self._specs = [(name, ctx) for name, ctx in specs]
        self._tracking_uri = pipeline.tracking_uri
        # This process never delivers: release what the tracker built here (sockets, spool writers).
        pipeline.close(0)
        self._closing = False

    def _start(self) -> None:
        """Create the queue, its writer and the delivery process (first record, or after a fork)."""
        from ..artifacts import staging_root
        from ..spool.writer import SpoolWriter

        root = Path(self.queue_dir) if self.queue_dir else Path(
            tempfile.mkdtemp(prefix=f"process-{os.getpid()}-", dir=staging_root()))
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(root / CONFIG, {
            "parent_pid": os.getpid(), "retry_deadline": self.retry_deadline, "tracking_uri": self._tracking_uri,
            "specs": [(name, {"tracking_uri": c.tracking_uri, "experiment_id": c.experiment_id,
                              "experiment_name": c.experiment_name, "options": dict(c.options)})
                      for name, c in self._specs]})
        self._writer = SpoolWriter(root, role="process", segment_age=None)
        self._root = root
        self._spawn()
        self._appender = threading.Thread(target=self._appender_main, name="mlflow-er-appender", daemon=True)
        self._appender.start()

    def _spawn(self) -> None:
        assert self._root is not None
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "mlflow_er.backends.follower", str(self._root)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env, start_new_session=True, close_fds=True)

    def _check_follower(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is None or self._closing:
            return
        with self._lock:  # the appender and a flushing thread both look: one restart, one follower
            if self._proc is not proc or self._restarts >= self.max_restarts:
                return
            self._restarts += 1
            log.warning("mlflow-er: the delivery process exited (%s); restarting it (%d of %d)", proc.returncode,
                        self._restarts, self.max_restarts)
            self._spawn()

    # -- the hot path ------------------------------------------------------------------------------
    def submit(self, record: StreamItem) -> None:
        buf = self._buf
        if len(buf) >= self.max_queue:
            self._wait_for_room()
        buf.append(record)
        if self._appender is None:
            with self._lock:
                if self._appender is None:
                    self._start()
        if len(buf) >= MAX_METRICS_PER_BATCH or type(record) is not Metric:
            self._wake.set()

    def _wait_for_room(self) -> None:
        if self._fatal is not None:
            raise BackendClosed(f"the appender thread died: {self._fatal!r}")
        self._wake.set()
        deadline = time.monotonic() + self.block_timeout
        while len(self._buf) >= self.max_queue:
            if time.monotonic() > deadline:
                raise QueueFull(f"{len(self._buf)} records waited {self.block_timeout}s for the disk queue")
            time.sleep(0.001)

    # -- the appender: memory -> queue segment -------------------------------------------------------
    def _appender_main(self) -> None:
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                self._append_queued()
                self._check_follower()
                if self._closing and not self._buf:
                    return
        except BaseException as exc:  # reported by the next flush
            self._fatal = exc
            log.exception("mlflow-er appender thread died")

    def _append_queued(self) -> None:
        from .spill import _to_spool

        buf = self._buf
        while buf:
            out: list[Any] = []
            markers: list[_Marker] = []
            data = 0
            while buf and len(out) < 20 * MAX_METRICS_PER_BATCH:
                item = buf.popleft()
                t = type(item)
                if t is _Marker:
                    markers.append(item)
                    break
                if t is Metric:
                    out.append(item)
                    data += 1
                elif t is RunStart or t is RunEnd:
                    out.append(_to_spool(item))
                elif t is Artifact:
                    out.append(self._queue_artifact(item))
                    data += 1
                else:
                    out.append(item)
                    data += 1
            if out:
                self._writer.append(out)
                self._appended += data
            for m in markers:
                m.upto = self._appended
                m.written.set()

    def _queue_artifact(self, art: Artifact) -> Artifact:
        """Render a payload and move the snapshot into the queue folder (a path relative to it)."""
        from ..staging import materialize

        assert self._root is not None
        if art.payload is not None and art.payload[0] == "image":
            art = materialize(art)
        if art.local_path and art.owned:
            holder = Path(art.local_path).parent
            dest = self._root / "artifacts" / holder.name
            dest.parent.mkdir(exist_ok=True, mode=0o700)
            try:
                os.rename(holder, dest)
            except OSError:
                shutil.copytree(holder, dest)
                shutil.rmtree(holder, ignore_errors=True)
            return art._replace(local_path=str((dest / Path(art.local_path).name).relative_to(self._root)))
        return art

    # -- flush / close ---------------------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        return (read_json(self._root / STATUS) if self._root is not None else None) or {}

    def _take_failures(self) -> list[FailedRecord]:
        if self._root is None:
            return []
        try:
            with open(self._root / FAILURES, "rb") as f:
                f.seek(self._failures_read)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next flush
        self._failures_read += end
        out = [FailedRecord(**json.loads(line)) for line in data[:end].splitlines() if line.strip()]
        self._failed += len(out)
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the delivery process has passed everything logged before the call."""
        if self._appender is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        marker = _Marker()
        self._buf.append(marker)
        self._wake.set()
        target = None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if target is None and marker.written.is_set():
                target = marker.upto
            delivered = int(self._status().get("delivered", 0))
            if target is not None and delivered >= target:
                break
            gone = self._proc is not None and self._proc.poll() is not None and self._restarts >= self.max_restarts
            if (left is not None and left <= 0) or self._fatal is not None or gone:
                failed = self._take_failures()
                unsent = max(0, (target if target is not None else self._appended + len(self._buf)) - delivered)
                why = ("the delivery process keeps dying" if gone else
                       f"the appender died: {self._fatal!r}" if self._fatal else f"timed out after {timeout}s")
                error = DeliveryError(failed, unsent=unsent, message=f"flush {why}; {unsent} record(s) unsent; they "
                                      f"are queued in {self._root} (replay: mlflow-er sync {self._root} "
                                      "--tracking-uri URI)")
                error.kept_in = str(self._root)
                raise error
            self._check_follower()
            time.sleep(0.005 if left is None else max(0.0, min(0.005, left)))
        failed = self._take_failures()
        if failed:
            raise DeliveryError(failed)

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout``, then stop the delivery process; what is unsent stays queued and delivered."""
        if self._appender is None:
            return
        deadline, problem = flush_for_close(self.flush, timeout)
        self._stop_thread(self._appender, 5.0)
        assert self._root is not None
        (self._root / CLOSE).touch()
        left = 5.0 if deadline is None else max(0.5, deadline - time.monotonic())
        finished = False
        if self._proc is not None and problem is None:
            try:
                self._proc.wait(left)
                finished = True
            except subprocess.TimeoutExpired:
                pass
        self._writer.close()
        if finished and problem is None:
            shutil.rmtree(self._root, ignore_errors=True)
        self._appender = None
        self._root = None if finished else self._root
        if problem is not None:
            log.warning("mlflow-er: the delivery process keeps delivering in the background; %s", problem)
            raise problem

    def stats(self) -> dict[str, Any]:
        status = self._status()
        delivered = int(status.get("delivered", 0))
        return {"backend": NAME, "queued": len(self._buf) + max(0, self._appended - delivered),
                "appended": self._appended, "delivered": delivered, "failed": int(status.get("failed", 0)),
                "retries": int(status.get("retries", 0)), "batches": int(status.get("batches", 0)),
                "lanes": status.get("lanes", {}), "dropped": {}, "dropped_total": 0, "restarts": self._restarts,
                "queue_dir": str(self._root) if self._root else None,
                "delivery_pid": self._proc.pid if self._proc is not None else None,
                "oldest_unsent_age": 0.0}


mlflow_er_backend_names, mlflow_er_make_backend = backend_hooks(NAME, ProcessBackend)
