"""Process-level events for background backends: fork, interpreter exit, SIGTERM.

- After ``fork()`` every live backend in the child gets fresh, empty state (its locks may
  have been held by the parent's writer at the moment of the fork).
- At interpreter exit an ``atexit`` hook drains every backend within its
  ``close_timeout`` and logs what it could not send.
- SIGTERM (when nobody else handles it) becomes :class:`~mlflow_er.errors.Terminated`
  in the main thread, so ``with tracker.run()`` blocks unwind, flush within their bound,
  mark the run KILLED, and the process still exits with status 143.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from typing import Any

from ..errors import DeliveryError, Terminated

log = logging.getLogger(__name__)

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_installed = False
_install_lock = threading.Lock()


def track(backend: Any) -> None:
    """Register a backend for fork, exit and SIGTERM handling."""
    _install()
    _live.add(backend)


def _release_orphaned_import_locks() -> None:
    """Forget per-module import locks inherited from the parent.

    Only the forking thread survives a ``fork()``. If another thread (our writer, inside
    MLflow's request code, which attempts an import on every call) held a module's import
    lock at that instant, the child would block forever on its first import of that module
    — the deadlock that hung the original helper's process jobs. The surviving thread is
    inside ``os.fork()``, not inside an import, so every lock in the table belongs to a
    thread that no longer exists; new locks are made on demand.
    """
    try:
        from importlib import _bootstrap

        locks = getattr(_bootstrap, "_module_locks", None)
        if isinstance(locks, dict):
            locks.clear()
    except Exception:  # a Python without this private table: nothing to release
        pass


def _after_fork_in_child() -> None:
    backends = list(_live)
    if backends:
        _release_orphaned_import_locks()
    for backend in backends:
        backend.after_fork_in_child()


def drain_all() -> int:
    """Close every live backend within its ``close_timeout``; return how many records were left unsent."""
    unsent = 0
    for backend in list(_live):
        try:
            backend.close(getattr(backend, "close_timeout", 30.0))
        except DeliveryError as exc:
            unsent += exc.unsent
            log.error("mlflow-er: at exit, %s", exc)
        except Exception:  # never turn an exit into a crash
            log.exception("mlflow-er: error while draining %r at exit", backend)
    return unsent


def _on_sigterm(signum: int, frame: Any) -> None:
    # Restore the default first: a second SIGTERM kills at once, as users expect.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated(128 + signum)


def _install() -> None:
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        _installed = True
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(drain_all)
        if os.environ.get("MLFLOW_ER_HANDLE_SIGTERM", "1") != "0":
            try:
                if threading.current_thread() is threading.main_thread() and \
                        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _on_sigterm)
            except (ValueError, OSError):  # not the main thread of the main interpreter
                pass
