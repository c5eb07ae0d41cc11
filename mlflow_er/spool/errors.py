"""Errors of the spool: what the writer, uploader and replay raise.

They derive from :class:`~mlflow_er.errors.SinkError` (so from ``MlflowErError``) because
the spool is a sink: a backend that delivers to it sees the same kind of error as from any
other sink, and ``transient`` tells it whether retrying may help.
"""

from __future__ import annotations

import errno as _errno

from ..errors import MlflowErError, SinkError


class SpoolError(SinkError):
    """Root of the spool's own errors."""


class SpoolWriteError(SpoolError):
    """Appending to or syncing a segment failed; nothing half-written was left behind.

    ``errno`` is the operating system's error number (``EIO``, ``EROFS``...) and
    ``path`` the segment concerned. After an ``fsync`` failure the writer is closed for
    good (the kernel may have dropped the unsynced pages: retrying would lie).
    """

    def __init__(self, message: str, errno: int | None = None, path: str | None = None,
                 transient: bool = False):
        super().__init__(message, transient=transient)
        self.errno = errno
        self.path = path


class SpoolDiskFull(SpoolWriteError):
    """The spool's filesystem is full (``ENOSPC``) or over quota (``EDQUOT``)."""


class SpoolUploadError(SpoolError):
    """A segment or artifact could not be uploaded (or verified) at the destination."""


class SpoolPermissionError(SpoolError):
    """A spool folder that is another user's, or open to other users: refused, never written into."""


class SyncError(MlflowErError):
    """``mlflow-er sync`` stopped before the end; progress so far is saved and resumes next time."""


class NotASpool(SyncError):
    """The path given to ``mlflow-er sync``/``status`` does not exist or is not a spool (nothing was created)."""


class UnsupportedSpool(SyncError):
    """A segment was written by a newer format version than this mlflow-er reads; nothing was synced."""


DISK_FULL_ERRNOS = frozenset(e for e in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None)) if e is not None)


def write_error(exc: OSError, path: str, action: str) -> SpoolWriteError:
    """Wrap an ``OSError`` from a segment write as the specific spool error."""
    cls = SpoolDiskFull if exc.errno in DISK_FULL_ERRNOS else SpoolWriteError
    err = cls(f"spool {action} failed on {path}: {exc.strerror or exc}", errno=exc.errno, path=path)
    err.__cause__ = exc
    return err
