"""Durable file operations of a spool folder: private folders, locks, folder fsync, crash recovery.

A live writer holds an exclusive ``flock`` on its open segment for as long as it lives;
the kernel drops it when the process dies, however it dies. That is how another process
tells a crashed writer's segment (safe to seal) from a live one (never touched).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from .errors import SpoolPermissionError
from .format import OPEN_SUFFIX, SEALED_SUFFIX, SEGMENTS_DIR, Damage, Frame, end_frame, is_end, parse_header, scan

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so no recovery of other writers' segments
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: A segment being created: not yet locked and named, so recovery leaves it alone.
TMP_PREFIX = ".new-"


def fsync_dir(path: Path) -> None:
    """fsync a folder: a new or renamed file is only durable once its folder entry is."""
    try:
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the file itself is synced
    finally:
        os.close(fd)


def try_lock(fd: int) -> bool:
    """Take the exclusive lock of a segment without waiting; False if a live writer holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def private_makedirs(path: Path) -> None:
    """Create ``path`` and any missing parent, each ``0700`` whatever the umask.

    (``os.makedirs(mode=...)`` gives the mode to the last level only; the others get
    ``0777 & ~umask``, so with umask 0 a world-writable folder.)
    """
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: checked by its creator, or by check_private_dir
        os.chmod(d, 0o700)  # mkdir applies the umask; a umask of 0o700 would leave it unusable


def check_private_dir(path: Path) -> None:
    """Refuse a spool folder that belongs to another user or is open to other users."""
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows: ACLs, not modes
        return
    st = os.stat(path)
    me = os.getuid()
    if st.st_uid != me:
        raise SpoolPermissionError(
            f"spool folder {path} belongs to {_user(st.st_uid)} (uid {st.st_uid}), not to you ({_user(me)}, uid "
            f"{me}): its owner could read or change what you log. Use a folder of your own (the spool sink's "
            "path option or $MLFLOW_ER_SPOOL_DIR)")
    if st.st_mode & 0o077:
        raise SpoolPermissionError(
            f"spool folder {path} is open to other users (mode {oct(stat.S_IMODE(st.st_mode))}, must be 0700): "
            f"run `chmod 700 {path}` if only you have used it, or choose a new folder")


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"user {uid}"


def make_spool_dir(root: Path) -> Path:
    """Create ``root`` and its segment folder private to the user (``0700``), or check an existing one's
    owner and mode; return the segment folder."""
    private_makedirs(root)
    check_private_dir(root)
    seg = root / SEGMENTS_DIR
    private_makedirs(seg)
    check_private_dir(seg)
    return seg


def recover_segments(root: str | os.PathLike[str]) -> list[Path]:
    """Seal every ``.open`` segment under ``root`` whose writer is gone; return the sealed paths.

    A segment whose lock can be taken has no live writer. A torn tail (a write cut short
    by the crash) is cut off first; it held no acknowledged record, since a record is
    acknowledged only once its whole frame was written and fsynced. A segment with no
    complete record is removed.
    """
    seg_dir = Path(root) / SEGMENTS_DIR
    out: list[Path] = []
    if fcntl is None or not seg_dir.is_dir():
        return out
    for path in sorted(seg_dir.glob("*" + OPEN_SUFFIX)):
        try:
            fd = os.open(path, os.O_RDWR | O_CLOEXEC)
        except OSError:
            continue  # sealed or removed meanwhile
        try:
            if not try_lock(fd) or not path.exists():
                continue
            if path.name.startswith(TMP_PREFIX):
                path.unlink()  # its writer died while creating it: a header at most
                continue
            data = path.read_bytes()
            header = parse_header(data)
            if header.unsupported:
                log.warning("spool: left %s as it is: written by a newer mlflow-er (%s)", path.name, header.problem)
                continue
            frames, cut, last, ended = 0, None, -1, False
            for item in scan(data, header.end, header.framing):
                if type(item) is Frame:
                    frames += 1
                    last, ended = item.number, is_end(item.payload)
                elif type(item) is Damage and item.torn:
                    cut = item.start
            if frames == 0:
                path.unlink()
                log.info("spool: removed %s (no complete record)", path.name)
                continue
            if cut is not None:
                os.ftruncate(fd, cut)
                log.warning("spool: cut a torn tail of %d bytes from %s (a writer died mid-write)",
                            len(data) - cut, path.name)
            if header.framing is not None and header.framing.version >= 2 and not ended:
                os.lseek(fd, 0, os.SEEK_END)
                os.write(fd, end_frame(header.framing, last + 1))  # sealed like a writer seals
            os.fsync(fd)
            sealed = path.with_suffix(SEALED_SUFFIX)
            os.rename(path, sealed)
            out.append(sealed)
            log.info("spool: sealed %s left open by a writer that is gone", sealed.name)
        except OSError as exc:
            log.warning("spool: could not recover %s: %s", path, exc)
        finally:
            os.close(fd)
    if out:
        fsync_dir(seg_dir)
    return out
