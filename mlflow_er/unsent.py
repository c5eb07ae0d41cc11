"""What a close does with records it could not deliver in time: nothing is dropped silently.

* :func:`flush_for_close` is the first step of every bounded close (the pipeline's and the
  background backends'): flush within the timeout and hand back the
  :class:`~mlflow_er.errors.DeliveryError` instead of raising it, so the close can still stop
  its threads and say what is unsent; on an interrupt (Ctrl-C, SIGTERM) it runs the caller's
  "keep what is unsent" step before unwinding.
* :class:`Keeper` puts records some sink has not got on disk in spool format — into the
  pipeline's durable sink (the spool) when it has one, else into a new private spool folder —
  and names the ``mlflow-er sync`` command that replays them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .delivery import RetryPolicy
from .errors import DeliveryError, FailedRecord
from .records import StreamItem

if TYPE_CHECKING:
    from .lanes import Lane
    from .staging import ArtifactStage


def flush_for_close(flush: Callable[[float | None], None], timeout: float | None,
                    on_interrupt: Callable[[], None] | None = None) -> tuple[float | None, DeliveryError | None]:
    """Run ``flush(timeout)`` as the first step of a close: ``(deadline, the DeliveryError it raised or None)``.

    ``deadline`` is the ``time.monotonic()`` by which the whole close must be done (``None``:
    no bound). Any other exception — ``KeyboardInterrupt``, :class:`~mlflow_er.errors.Terminated`
    — first runs ``on_interrupt`` (keep what is unsent, stop at once), then propagates.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        flush(timeout)
    except DeliveryError as exc:
        return deadline, exc
    except BaseException:
        if on_interrupt is not None:
            on_interrupt()
        raise
    return deadline, None


class Keeper:
    """Where one pipeline keeps what it could not deliver (see the module docstring).

    :param tracking_uri: shown (password hidden) in the ``mlflow-er sync`` command.
    :param keep_dir: the folder for a new spool folder (default: the private staging directory).
    """

    def __init__(self, tracking_uri: str | None = None, keep_dir: str | os.PathLike[str] | None = None):
        self.tracking_uri = tracking_uri
        self.keep_dir = keep_dir
        # One folder per pipeline, named when it is built: every keep of a close lands together.
        self._name = f"unsent-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def location(self, durable: Lane | None) -> str:
        """Where :meth:`put` puts records: the durable sink's folder, else a new spool folder."""
        if durable is not None:
            return str(getattr(durable.sink, "path", durable.name))
        from . import artifacts

        root = Path(self.keep_dir) if self.keep_dir else artifacts.staging_root()
        return str(root / self._name)

    def put(self, items: Sequence[StreamItem], durable: Lane | None, stage: ArtifactStage,
            report: Callable[[list[FailedRecord]], None]) -> str:
        """Write ``items`` to disk and return where; raises whatever the disk raised.

        The durable sink already holds what was handed to the pipeline: it gets ``items`` (what
        never reached the pipeline) and a flush. Otherwise ``items`` go to a new spool folder.
        """
        if durable is not None:
            if items:
                durable.process(items, inline_artifacts=True)
            durable.sink.flush()
            return str(getattr(durable.sink, "path", "the spool"))
        from .lanes import Lane
        from .sinks.spool import SpoolSink

        path = Path(self.location(None))
        sink = SpoolSink(path, fsync_interval=None, segment_age=None)
        lane = Lane(sink, RetryPolicy(deadline=0), stage, report, threading.Event(), durable=True)
        try:
            lane.process(items, inline_artifacts=True)
        finally:
            sink.close(timeout=0)
        return str(path)

    def shown_uri(self) -> str:
        """The tracking URI with its password hidden (``""`` when there is none)."""
        from .redact import redact

        return redact(self.tracking_uri or "")

    def sync_command(self, path: str) -> str:
        """The command that replays what was kept in ``path``."""
        return f"mlflow-er sync {path} --tracking-uri {self.shown_uri() or 'URI'}"
