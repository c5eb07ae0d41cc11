"""The append-only segment writer: group commit, rotation, no half-written record.

One :class:`SpoolWriter` owns one segment file at a time (``segments/<id>-<n>.open``,
created ``0600`` with ``O_EXCL | O_APPEND`` and held under an exclusive ``flock`` so
other processes can tell a live writer from a dead one). :meth:`SpoolWriter.append`
encodes a whole batch and hands it to the kernel in one ``write``; a committer thread
``fsync``\\ s every ``fsync_interval`` seconds (group commit: one fsync covers every
append since the last) and only then counts those records as acknowledged. A failed
write is cut back (``ftruncate``) to the last complete frame before the error reaches
the caller, so the file never holds half a record the writer did not warn about.

Sealing (by size, by age, on :meth:`rotate` or :meth:`close`) fsyncs the segment, renames
it to ``.seg`` and fsyncs the folder: a sealed segment is complete and immutable, which is
what the uploader ships. :func:`~mlflow_er.spool.files.recover_segments` seals the
segments of writers that died (their lock is free), cutting a torn tail first.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from .context import run_context
from .errors import SpoolError, SpoolWriteError, write_error
from .files import O_CLOEXEC, TMP_PREFIX, fsync_dir, make_spool_dir, recover_segments, try_lock
from .format import (
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    Encoder,
    Framing,
    SpoolRecord,
    encode_header,
    end_frame,
    new_salt,
    segment_name,
)

log = logging.getLogger(__name__)

DEFAULT_FSYNC_INTERVAL = 0.005
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_SEGMENT_AGE = 300.0


_live_writers: weakref.WeakSet[SpoolWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's segment file (and its lock): appending from both would
    # interleave writes and double-count acknowledgements. Disable the copies in the child.
    for w in list(_live_writers):
        w._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def new_writer_id() -> str:
    """A writer id that sorts by creation time (ms) and is unique across hosts."""
    return f"{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:12]}"


class SpoolWriter:
    """Appends records to segment files under ``path``; thread-safe.

    ``fsync_interval``: seconds between group commits (``0`` = fsync inside every
    :meth:`append`; ``None`` = only on :meth:`flush`, rotation and close).
    ``segment_bytes``/``segment_age``: seal the segment once it is this big / this old.
    ``on_seal(path)`` is called (outside any lock) with each sealed segment.
    ``experiment_id``/``experiment_name``/``role`` go into every segment header.
    ``recover``: first seal segments left ``.open`` by dead writers in the same folder.
    """

    def __init__(self, path: str | os.PathLike[str], *, experiment_id: str | None = None,
                 experiment_name: str | None = None, role: str = "spool",
                 fsync_interval: float | None = DEFAULT_FSYNC_INTERVAL,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, segment_age: float | None = DEFAULT_SEGMENT_AGE,
                 on_seal: Callable[[Path], None] | None = None, recover: bool = True):
        self.root = Path(path)
        self._seg_dir = make_spool_dir(self.root)
        self.writer_id = new_writer_id()
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.segment_age = segment_age
        self.on_seal = on_seal
        self._meta = {"writer_id": self.writer_id, "role": role, "experiment_id": experiment_id,
                      "experiment_name": experiment_name, "host": socket.gethostname(), "pid": os.getpid(),
                      "context": run_context()}
        self._encoder = Encoder()
        self._salt = new_salt()
        self._framing = Framing(2, self._salt)
        self._frame_index = 0  # of the next frame in the current segment
        self._lock = threading.Lock()  # fd, offsets, counters
        self._sync_lock = threading.Lock()  # one fsync at a time
        self._fd: int | None = None
        self._path: Path | None = None
        self._index = 0
        self._offset = self._data_start = 0
        self._opened_at = 0.0
        self._appended = self._acked = 0
        self._bytes = 0
        self._sealed: list[Path] = []
        self._error: SpoolWriteError | None = None
        self._closed = False
        self.recovered = recover_segments(self.root) if recover else []
        _live_writers.add(self)
        self._dirty = threading.Event()
        self._thread: threading.Thread | None = None
        if fsync_interval or segment_age:
            self._thread = threading.Thread(target=self._committer, name=f"mlflow-er-spool-{self.writer_id[-6:]}",
                                            daemon=True)
            self._thread.start()

    # -- counters --------------------------------------------------------------------------
    @property
    def appended(self) -> int:
        """Records handed to the kernel so far (readable, not yet necessarily durable)."""
        return self._appended

    @property
    def acknowledged(self) -> int:
        """Records known durable: written and covered by a completed ``fsync``."""
        return self._acked

    @property
    def sealed(self) -> list[Path]:
        """Segments this writer has sealed, oldest first."""
        return list(self._sealed)

    @property
    def current_segment(self) -> Path | None:
        """The segment being appended to, if any."""
        return self._path

    def stats(self) -> dict[str, int]:
        """``appended``, ``acknowledged``, ``segments_sealed``, ``bytes_written``."""
        return {"appended": self._appended, "acknowledged": self._acked, "segments_sealed": len(self._sealed),
                "bytes_written": self._bytes}

    # -- writing ---------------------------------------------------------------------------
    def append(self, records: Sequence[SpoolRecord]) -> None:
        """Write ``records`` (in order) to the current segment; durable after the next group commit.

        Raises :class:`~mlflow_er.spool.errors.SpoolDiskFull` or
        :class:`~mlflow_er.spool.errors.SpoolWriteError` if the write fails — the segment
        is then cut back so none of these records is in it — and ``ValueError`` for a
        record that cannot be encoded (nothing written).
        """
        if not records:
            return
        encoded = self._encoder.encode(records, self._framing)  # outside the lock: the CPU-heavy part
        sealed: Path | None = None
        with self._lock:
            self._check()
            if self._fd is not None and self._offset > self._data_start and (
                    self._offset + encoded.size > self.segment_bytes or self._too_old()):
                sealed = self._seal_locked()
            if self._fd is None:
                self._open_locked(getattr(records[0], "run_id", None))
            self._write_locked(encoded.frames(self._framing, self._frame_index))
            self._frame_index += len(records)
            self._appended += len(records)
        if sealed is not None:
            self._sealed_hook(sealed)
        if self.fsync_interval == 0:
            self.flush()
        elif self.fsync_interval is not None:
            self._dirty.set()

    def flush(self) -> None:
        """Make every record appended so far durable (``fsync``) and count it acknowledged."""
        self._sync()
        if self._error is not None:
            raise self._error

    def rotate(self) -> Path | None:
        """Seal the current segment now; return its path (``None`` if nothing was open)."""
        with self._lock:
            self._check()
            sealed = self._seal_locked() if self._fd is not None else None
        if sealed is not None:
            self._sealed_hook(sealed)
        return sealed

    def close(self, timeout: float = 10.0) -> None:
        """Seal the last segment and stop the committer thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._dirty.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._lock:
            if self._error is not None:
                self._abandon_locked()
                raise self._error
            sealed = self._seal_locked() if self._fd is not None else None
        if sealed is not None:
            self._sealed_hook(sealed)

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SpoolWriter {str(self.root)!r} id={self.writer_id} appended={self._appended} acked={self._acked}>"

    # -- internals (call *_locked with self._lock held) ---------------------------------------
    def _disown(self) -> None:
        """In a forked child: let go of the parent's segment without touching it."""
        self._lock = threading.Lock()  # the parent may have held it at fork time
        self._sync_lock = threading.Lock()
        if self._fd is not None:
            os.close(self._fd)  # the parent's descriptor (and its lock) stay open in the parent
        self._fd = self._path = None
        self._thread = None
        self._error = SpoolWriteError(f"spool writer {self.writer_id} belongs to process {self._meta['pid']}; "
                                      f"create a new SpoolWriter after fork()")

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise SpoolError(f"spool writer {self.writer_id} is closed")

    def _too_old(self) -> bool:
        return self.segment_age is not None and time.monotonic() - self._opened_at > self.segment_age

    def _open_locked(self, run_id: str | None) -> None:
        name = segment_name(self.writer_id, self._index)
        path = self._seg_dir / (name + OPEN_SUFFIX)
        # Made under a name recovery ignores, locked, then renamed: a recovering process can
        # never find this writer's segment unlocked and mistake it for a dead writer's.
        tmp = self._seg_dir / (TMP_PREFIX + name + OPEN_SUFFIX)
        header = encode_header({**self._meta, "segment": self._index, "run_id": run_id,
                                "created_ms": time.time_ns() // 1_000_000}, self._salt)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | O_CLOEXEC, 0o600)
        except OSError as exc:
            raise write_error(exc, str(tmp), "create") from exc
        try:
            try_lock(fd)
            done = 0
            while done < len(header):
                done += os.write(fd, header[done:])
            os.rename(tmp, path)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)  # a segment without a whole header holds nothing
            raise write_error(exc, str(path), "write") from exc
        fsync_dir(self._seg_dir)
        self._fd, self._path = fd, path
        self._offset = self._data_start = len(header)
        self._frame_index = 0
        self._opened_at = time.monotonic()

    def _write_locked(self, data: bytes) -> None:
        assert self._fd is not None and self._path is not None
        start, view, done = self._offset, memoryview(data), 0
        try:
            while done < len(data):
                n = os.write(self._fd, view[done:])
                if n <= 0:  # a regular file never does this; never loop forever if one does
                    raise OSError(28, "write made no progress")
                done += n
        except OSError as exc:
            err = write_error(exc, str(self._path), "write")
            if done:
                self._cut_back_locked(start, err)
            raise err from exc
        self._offset = start + len(data)
        self._bytes += len(data)

    def _cut_back_locked(self, offset: int, cause: SpoolWriteError) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, offset)
        except OSError as exc:
            # The partial frames stay; a reader reports them as a torn tail. Writing after
            # them would bury that damage mid-file, so this writer stops here.
            self._error = write_error(exc, str(self._path), f"cut-back after {cause}")
            log.error("%s", self._error)

    def _seal_locked(self) -> Path | None:
        """fsync, rename to ``.seg`` and close the current segment; ``None`` if it held no record."""
        fd, path = self._fd, self._path
        assert fd is not None and path is not None
        if self._offset > self._data_start:
            # The END frame: a reader can then tell a complete sealed segment from one cut short.
            self._write_locked(end_frame(self._framing, self._frame_index))
        try:
            os.fsync(fd)
        except OSError as exc:
            self._error = write_error(exc, str(path), "fsync")
            raise self._error from exc
        self._acked = self._appended
        final = path.with_suffix(SEALED_SUFFIX)
        sealed: Path | None = final
        if self._offset > self._data_start:
            os.rename(path, final)  # while still locked, so no recovery can race us to it
        else:
            path.unlink(missing_ok=True)  # header only: nothing to ship
            sealed = None
        os.close(fd)
        fsync_dir(self._seg_dir)
        self._fd = self._path = None
        self._index += 1
        if sealed is not None:
            self._sealed.append(sealed)
        return sealed

    def _abandon_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # left .open: the next writer's recovery cuts and seals it
            self._fd = self._path = None

    def _sealed_hook(self, path: Path) -> None:
        if self.on_seal is not None:
            try:
                self.on_seal(path)
            except Exception:  # a callback must never break appends
                log.exception("spool on_seal callback failed for %s", path)

    def _sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                if self._fd is None or self._acked >= self._appended or self._error is not None:
                    return
                # A duplicate fd: a rotation may close the original while we fsync outside the lock.
                fd, target, path = os.dup(self._fd), self._appended, self._path
            try:
                os.fsync(fd)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty pages: never
                # claim those records durable, stop this writer.
                with self._lock:
                    self._error = write_error(exc, str(path), "fsync")
                return
            finally:
                os.close(fd)
            with self._lock:
                if target > self._acked:
                    self._acked = target

    def _committer(self) -> None:
        tick = min(1.0, self.segment_age) if self.segment_age else None
        while not self._closed:
            if not self._dirty.wait(tick):
                self._seal_if_old()
                continue
            if self._closed:
                return
            if self.fsync_interval:
                time.sleep(self.fsync_interval)  # let more appends join this commit
            self._dirty.clear()
            self._sync()
            self._seal_if_old()

    def _seal_if_old(self) -> None:
        sealed = None
        with self._lock:
            if self._fd is not None and not self._closed and self._error is None and self._too_old() \
                    and self._offset > self._data_start:
                try:
                    sealed = self._seal_locked()
                except SpoolWriteError:
                    return  # kept in self._error; the next append or flush raises it
        if sealed is not None:
            self._sealed_hook(sealed)
