"""What the two background backends (``threaded``, ``process``) share: an in-memory queue drained by one thread.

A log call appends to a ``collections.deque`` (atomic under the GIL: no lock on the hot
path); one daemon thread of the backend takes from it and moves the records on — to the
pipeline (``threaded``) or into an on-disk queue for a delivery process (``process``). This
base holds the options both take, the queue and the thread's signals, fork and exit
handling (:mod:`~mlflow_er.backends.lifecycle`), and the stop of the thread at close.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from . import lifecycle
from .base import Backend


class QueuedBackend(Backend):
    """Base of a backend whose records wait in a deque for one background thread.

    :param max_queue: records held in memory before a log call waits (or ``on_full`` applies).
    :param flush_interval: longest a record waits in memory before the thread moves it.
    :param retry_deadline: seconds a batch keeps retrying transient failures.
    :param close_timeout: what the ``atexit`` drain may take.
    :param block_timeout: longest a log call waits for room before :class:`~mlflow_er.errors.QueueFull`.

    A subclass sets its own attributes first, then calls this ``__init__``, which builds the
    state (:meth:`_init_state`, extended by the subclass) and registers the backend for fork,
    exit and SIGTERM handling.
    """

    def __init__(self, *, max_queue: int, flush_interval: float, retry_deadline: float, close_timeout: float,
                 block_timeout: float):
        self.max_queue = max_queue
        self.flush_interval = flush_interval
        self.retry_deadline = retry_deadline
        self.close_timeout = close_timeout
        self.block_timeout = block_timeout
        self._init_state()
        lifecycle.track(self)

    def _init_state(self) -> None:
        """Fresh queue, lock and signals (at construction and in a forked child, whose locks may be held)."""
        self._buf: deque[Any] = deque()
        self._wake = threading.Event()  # set: the thread should look at the queue now
        self._lock = threading.Lock()
        self._closing = False  # set by a close: the thread empties the queue, then returns
        self._fatal: BaseException | None = None  # what killed the thread, reported by the next flush

    def after_fork_in_child(self) -> None:
        """The child starts empty: the parent's records are the parent's to deliver."""
        self._init_state()

    def _stop_thread(self, thread: threading.Thread | None, wait: float) -> None:
        """Tell the background thread to empty the queue and return; wait for it up to ``wait`` seconds."""
        self._closing = True
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)
