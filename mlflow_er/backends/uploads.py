"""The threaded backend's artifact uploader: a thread of its own so a big file never holds metrics back.

A mixin of :class:`~mlflow_er.backends.threaded.ThreadedBackend` (it shares the backend's
lock, counters and queues); kept apart because it owns a separate concern: rendering
payloads, verifying snapshots, uploading, and releasing flush markers in order.
"""

from __future__ import annotations

import logging

from .. import artifacts
from ..errors import FailedRecord
from ..records import Artifact
from .base import materialize

log = logging.getLogger(__name__)


class ArtifactUploads:
    """Uploader-thread half of the threaded backend (see the module docstring)."""

    def _uploader_main(self) -> None:
        try:
            while True:
                if not self._art_q:
                    if self._closing and not self._buf and (self._writer is None or not self._writer.is_alive()):
                        return
                    self._art_wake.wait(self.flush_interval)
                    self._art_wake.clear()
                    continue
                item = self._art_q.popleft()
                if type(item) is self._marker_type:
                    item.done.set()
                    continue
                size = 0
                if type(item) is tuple:
                    item, size = item
                try:
                    self._upload(item, size)
                finally:
                    with self._lock:
                        self._art_pending -= 1
        except BaseException as exc:
            self._fatal = exc
            log.exception("mlflow-er uploader thread died")

    def _upload(self, art: Artifact, size: int) -> None:
        try:
            ready = materialize(art)
        except Exception as exc:
            fail = FailedRecord("artifact", art.name or "?", f"not uploaded: {exc}", art.run_id)
            with self._lock:
                self._failures.append(fail)
                self._art_stats.failed += 1
            return
        finally:
            if size:  # the in-memory payload is gone once rendered to a file
                with self._lock:
                    self._bytes -= size
                    if self._waiters:
                        self._not_full.notify_all()
        try:
            for d in self._art_deliverers:
                failed = d.deliver_artifact(ready)
                if failed:
                    self._record_failures(failed, self._art_stats)
        finally:
            if ready.owned:
                artifacts.discard(ready.local_path)
