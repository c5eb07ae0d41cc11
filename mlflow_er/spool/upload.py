"""Shipping sealed segments and artifact snapshots to any fsspec URL: create-only, verified.

How no reader ever trusts a partial object:

* On object stores (``s3``, ``gs``, ``az``...) one PUT — or a multipart upload, which
  becomes visible only when completed — is atomic: the object appears whole or not at
  all. There the file is put under its final name directly (no copy), then read back.
* Everywhere else (``file``, ``memory``, ``sftp``...) a write is visible while it runs,
  so the file is put under ``<name>.tmp-<uuid>`` (which readers ignore), verified, then
  renamed (``mv``) to its final name.
* Verification compares size and CRC32 read back from the destination with the local
  file (``verify="size"`` skips the read-back). A final name that already exists is
  never overwritten: if it matches, the earlier upload simply completed (a crash after
  the upload, before the local marker); if not, it is an error.

Artifacts go before segments in every pass, so a segment at the destination never
refers to an artifact that is not there yet. A local marker (``uploaded/...``) records
each verified upload; the next start resumes with whatever has none.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpoolUploadError
from .format import ARTIFACTS_DIR, DESTINATION_FILE, SEALED_SUFFIX, SEGMENTS_DIR, UPLOADED_DIR, VERSION
from .reader import is_local, open_fs

log = logging.getLogger(__name__)

ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
_CHUNK = 1024 * 1024


def _protocols(fs: Any) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def write_private_temp(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a new temp file beside the local ``path`` and return the temp file's path.

    The file is created exclusively, ``0600`` at most whatever the umask, and fsynced; missing
    folders are made ``0700``. Its name (``.<name>.tmp-<hex>``) is one readers ignore, so the
    caller can then publish it under ``path`` in one step (``os.replace``, or ``os.link`` to
    create only).
    """
    from .files import private_makedirs

    target = Path(path)
    private_makedirs(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Replace the small object ``path`` with ``data`` so a reader sees the old or the new content, never a mix."""
    if is_local(fs):
        os.replace(write_private_temp(path, data), path)
        return
    fs.pipe_file(path, data)  # one PUT: atomic on object stores, in-process on memory://


def _crc_stream(f: Any) -> tuple[int, int]:
    size, crc = 0, 0
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return size, crc
        size += len(chunk)
        crc = zlib.crc32(chunk, crc)


def local_checksum(path: Path) -> tuple[int, int]:
    """``(size, crc32)`` of a local file."""
    with open(path, "rb") as f:
        return _crc_stream(f)


def _matches(fs: Any, remote: str, size: int, crc: int, verify: str) -> bool:
    try:
        if int(fs.size(remote)) != size:
            return False
        if verify == "size":
            return True
        with fs.open(remote, "rb") as f:
            return _crc_stream(f) == (size, crc)
    except FileNotFoundError:
        return False


def _remove(fs: Any, path: str) -> None:
    try:
        fs.rm(path)
    except Exception:  # best effort: a leftover temp name is ignored by readers
        pass


def put_verified(fs: Any, local: Path, remote: str, verify: str = "crc") -> bool:
    """Upload ``local`` to ``remote`` create-only and verified; False if it was already there, identical."""
    size, crc = local_checksum(local)
    fs.invalidate_cache()
    if fs.exists(remote):
        if _matches(fs, remote, size, crc, verify):
            return False
        raise SpoolUploadError(f"{remote} already exists with different content; not overwriting it")
    parent = remote.rsplit("/", 1)[0]
    if is_local(fs):
        from .files import private_makedirs

        private_makedirs(Path(parent))
    else:
        fs.makedirs(parent, exist_ok=True)
    atomic = bool(_protocols(fs) & ATOMIC_PUT_PROTOCOLS)
    target = remote if atomic else f"{remote}.tmp-{uuid.uuid4().hex}"
    try:
        fs.put_file(str(local), target)
        if is_local(fs):
            os.chmod(target, 0o600)  # a local copy is as private as the spool, whatever the umask
        if not _matches(fs, target, size, crc, verify):
            raise SpoolUploadError(f"verification of {target} failed (size or CRC differs from {local})")
        if not atomic:
            fs.mv(target, remote)
            if int(fs.size(remote)) != size:
                raise SpoolUploadError(f"{remote} has the wrong size after rename")
    except BaseException:
        _remove(fs, target)
        raise
    return True


@dataclass
class UploadStats:
    """What an :class:`Uploader` has done."""

    segments: int = 0
    artifacts: int = 0
    bytes: int = 0
    errors: int = 0
    last_error: str | None = None


class Uploader:
    """Uploads a spool folder's sealed segments and artifacts to ``url``; background or on demand.

    ``progress``: show a tqdm bar (default: when stderr is a terminal).
    """

    def __init__(self, root: str | os.PathLike[str], url: str, storage_options: dict[str, Any] | None = None,
                 verify: str = "crc", progress: bool | None = None):
        self.root = Path(root)
        self.url = url
        self.fs, self.base = open_fs(url, storage_options)
        self.base = self.base.rstrip("/")
        self.verify = verify
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stats = UploadStats()
        self._pass_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._marked_destination = False

    # -- what is pending -----------------------------------------------------------------------
    def _marker(self, kind: str, name: str) -> Path:
        return self.root / UPLOADED_DIR / kind / name

    def pending(self) -> tuple[list[Path], list[Path]]:
        """``(artifact folders, sealed segments)`` with no upload marker yet, oldest first."""
        arts = [p for p in sorted((self.root / ARTIFACTS_DIR).glob("*"))
                if p.is_dir() and not p.name.startswith(".") and not self._marker(ARTIFACTS_DIR, p.name).exists()]
        segs = [p for p in sorted((self.root / SEGMENTS_DIR).glob("*" + SEALED_SUFFIX))
                if not self._marker(SEGMENTS_DIR, p.stem).exists()]
        return arts, segs

    def _mark(self, kind: str, name: str) -> None:
        from .files import private_makedirs

        marker = self._marker(kind, name)
        private_makedirs(marker.parent)
        marker.touch(mode=0o600)

    # -- one pass ------------------------------------------------------------------------------
    def upload_pending(self, deadline: float | None = None) -> int:
        """Upload everything pending (artifacts first); return how many items were uploaded.

        Raises on the first failure (what was verified so far stays marked). ``deadline``
        (a ``time.monotonic()`` value) stops starting new files after it.
        """
        with self._pass_lock:
            arts, segs = self.pending()
            if not arts and not segs:
                return 0
            files = [(f, f"{self.base}/{ARTIFACTS_DIR}/{a.name}/{f.relative_to(a).as_posix()}", a)
                     for a in arts for f in sorted(a.rglob("*")) if f.is_file()]
            total = sum(f.stat().st_size for f, _, _ in files) + sum(s.stat().st_size for s in segs)
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"upload to {self.url}", leave=False)
            done = 0
            try:
                self._mark_destination()
                done += self._upload_artifacts(arts, files, deadline, bar)
                for seg in segs:
                    if deadline is not None and time.monotonic() > deadline:
                        break
                    size = seg.stat().st_size
                    put_verified(self.fs, seg, f"{self.base}/{SEGMENTS_DIR}/{seg.name}", self.verify)
                    self._mark(SEGMENTS_DIR, seg.stem)
                    self.stats.segments += 1
                    self.stats.bytes += size
                    done += 1
                    if bar is not None:
                        bar.update(size)
            finally:
                if bar is not None:
                    bar.close()
            return done

    def _mark_destination(self) -> None:
        if self._marked_destination:
            return
        path = f"{self.base}/{DESTINATION_FILE}"
        self.fs.invalidate_cache()
        if not self.fs.exists(path):
            write_atomic(self.fs, path, json.dumps({"format": VERSION, "kind": "mlflow-er spool upload"}).encode())
        self._marked_destination = True

    def _upload_artifacts(self, arts: list[Path], files: list[tuple[Path, str, Path]], deadline: float | None,
                          bar: Any) -> int:
        done = 0
        for art in arts:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("upload deadline passed")  # segments must not overtake artifacts
            for f, remote, owner in files:
                if owner is art:
                    put_verified(self.fs, f, remote, self.verify)
                    self.stats.bytes += f.stat().st_size
                    if bar is not None:
                        bar.update(f.stat().st_size)
            self._mark(ARTIFACTS_DIR, art.name)
            self.stats.artifacts += 1
            done += 1
        return done

    # -- background ----------------------------------------------------------------------------
    def start(self) -> None:
        """Upload in a background thread: now, on every :meth:`notify`, and on retry after failures."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mlflow-er-spool-upload", daemon=True)
            self._thread.start()
            self._wake.set()

    def notify(self) -> None:
        """Something new is sealed: upload it soon."""
        self._wake.set()

    def _loop(self) -> None:
        delay = 1.0
        while True:
            self._wake.wait(delay if self.stats.last_error else None)
            self._wake.clear()
            stopping = self._stopping
            try:
                self.upload_pending()
                self.stats.last_error = None
                delay = 1.0
            except Exception as exc:
                self.stats.errors += 1
                if str(exc) != self.stats.last_error:
                    log.warning("mlflow-er spool: upload to %s failed (will retry): %s", self.url, exc)
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = min(delay * 2, 60.0)
            if stopping:
                return

    def close(self, timeout: float | None = 60.0) -> bool:
        """Make a last upload pass within ``timeout`` seconds; True if nothing is left pending."""
        if self._thread is None:
            try:
                self.upload_pending(None if timeout is None else time.monotonic() + timeout)
            except Exception as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
        else:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout)
        arts, segs = self.pending()
        if arts or segs:
            log.warning("mlflow-er spool: %d segment(s) and %d artifact(s) not uploaded to %s yet (%s); they stay "
                        "in %s and are uploaded on the next start, or replay them with `mlflow-er sync %s`",
                        len(segs), len(arts), self.url, self.stats.last_error or "timed out", self.root, self.root)
            return False
        return True
