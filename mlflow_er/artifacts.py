"""Artifact snapshots and rendering.

A log call snapshots the file at call time so the caller may overwrite or delete it at
once: a copy-on-write clone where the filesystem has one, else a copy for files up to
``MLFLOW_ER_COPY_LIMIT_MB`` (16 MB), else a hard link whose identity is checked before
upload (an in-place rewrite is reported, never uploaded as if it were the logged file). Content
that must be rendered (an image array, a dict, a text) is copied in the caller and
rendered into a file by the writer, off the caller's thread.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import InvalidRecord, MlflowErError


class StagingUnsafe(MlflowErError, PermissionError):
    """The staging folder belongs to another user or is open to others: snapshots could be swapped."""


def _default_staging() -> Path:
    # A per-uid name in the temp dir, not $XDG_RUNTIME_DIR: that is a small RAM-backed tmpfs that
    # is removed at logout, and snapshots can be multi-GB checkpoints of a job that outlives the
    # login session. The name is predictable, so it is verified (owner, mode, not a symlink).
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    suffix = f"-{uid}" if uid is not None else f"-{os.environ.get('USERNAME', 'user')}"
    return Path(tempfile.gettempdir()) / f"mlflow-er-staging{suffix}"


def staging_root() -> Path:
    """This user's private folder where snapshots wait for upload, created ``0700``.

    ``MLFLOW_ER_STAGING_DIR`` overrides the default (``<tmp>/mlflow-er-staging-<uid>``). The
    folder must be a real directory (not a symlink) owned by this user with no permissions for
    group or others; otherwise :class:`StagingUnsafe` is raised: another local user could swap
    a snapshot before it is uploaded.
    """
    configured = os.environ.get("MLFLOW_ER_STAGING_DIR")
    root = Path(configured) if configured else _default_staging()
    try:
        os.mkdir(root, 0o700)  # mkdir's mode is masked by the umask, which can only narrow 0700
    except FileExistsError:
        pass
    except FileNotFoundError:
        root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
    check_private_dir(root, "MLFLOW_ER_STAGING_DIR" if configured else None)
    return root


def check_private_dir(path: Path, setting: str | None = None) -> None:
    """Raise :class:`StagingUnsafe` unless ``path`` is a directory of this user's that only they can use."""
    st = os.lstat(path)
    how = (f"set {setting} to a folder of yours with mode 0700" if setting else
           "set MLFLOW_ER_STAGING_DIR to a folder of yours with mode 0700 (e.g. ~/.cache/mlflow-er/staging)")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise StagingUnsafe(f"staging folder {str(path)!r} is {what}; refusing to stage artifacts there: "
                            f"remove it, or {how}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        owner = _user_name(st.st_uid)
        raise StagingUnsafe(f"staging folder {str(path)!r} belongs to {owner} (uid {st.st_uid}), not to this user "
                            f"(uid {os.geteuid()}): another user could swap snapshots before they are uploaded; "
                            f"refusing to stage artifacts there: {how}")
    if st.st_mode & 0o077:
        raise StagingUnsafe(f"staging folder {str(path)!r} has mode {stat.S_IMODE(st.st_mode):04o}, open to other "
                            f"users; it must be 0700: run `chmod 700 {path}`, or {how}")


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "another user"


#: Files up to this size are copied at call time (a true snapshot); bigger ones are hard
#: linked when possible, and an in-place rewrite before upload is detected and reported.
COPY_LIMIT = int(float(os.environ.get("MLFLOW_ER_COPY_LIMIT_MB", "16")) * 2**20)
_FICLONE = 0x40049409  # Linux ioctl: copy-on-write clone (btrfs, xfs); instant and safe


class SnapshotChanged(MlflowErError):
    """A hard-linked artifact snapshot no longer holds the content it had at the log call."""


_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _special(mode: int) -> str | None:
    return next((what for test, what in _SPECIAL if test(mode)), None)


def check_source(local_path: str | os.PathLike[str], field: str = "artifact local_path") -> os.stat_result:
    """Refuse, without opening anything, a path that is not a regular file or a folder of them.

    Reading a FIFO blocks until a writer appears, a socket cannot be read, a device never ends
    (``/dev/zero``): any of them, given directly or found inside a folder (symlinks followed,
    as the copy would), raises :class:`InvalidRecord` naming it. Returns ``os.stat(local_path)``.
    """
    path = os.fspath(local_path)
    try:
        st = os.stat(path)  # stat never opens: safe on a FIFO
    except FileNotFoundError:
        missing = "a broken symlink" if os.path.islink(path) else "does not exist"
        raise InvalidRecord(field, f"{path!r} {missing}") from None
    if not stat.S_ISDIR(st.st_mode):
        what = _special(st.st_mode)
        if what is not None:
            raise InvalidRecord(field, f"{path!r} is {what}; only regular files (and folders of them) can be "
                                       "logged: reading it could block the caller forever or never end")
        return st
    seen = {(st.st_dev, st.st_ino)}
    for root, dirs, files in os.walk(path, followlinks=True):
        for name in files + dirs:
            entry = os.path.join(root, name)
            try:
                est = os.stat(entry)
            except OSError:
                raise InvalidRecord(field, f"{entry!r} inside {path!r} is a broken symlink or unreadable; remove "
                                           "it or log the other files one by one") from None
            inner = _special(est.st_mode)
            if inner is not None:
                raise InvalidRecord(field, f"{entry!r} inside {path!r} is {inner}; only regular files can be logged: "
                                           "reading it could block the caller forever or never end")
            if stat.S_ISDIR(est.st_mode):
                if (est.st_dev, est.st_ino) in seen:
                    raise InvalidRecord(field, f"{entry!r} inside {path!r} links back to a folder above it (a "
                                               "symlink loop); the copy would never end")
                seen.add((est.st_dev, est.st_ino))
    return st


def snapshot(local_path: str | os.PathLike[str]) -> tuple[str, bool, int, tuple | None]:
    """Freeze ``local_path`` as it is now.

    Returns ``(snapshot_path, is_dir, size_bytes, fingerprint)``; ``fingerprint`` is set
    when some file was hard linked rather than copied, for :func:`verify` before upload.
    A FIFO, socket or device (or a folder holding one) raises :class:`InvalidRecord` first.
    """
    src = Path(local_path)
    check_source(src)
    holder = Path(tempfile.mkdtemp(prefix="snap-", dir=staging_root()))
    dst = holder / src.name
    linked: list[tuple[str, int, int, int]] = []
    is_dir = src.is_dir()

    def take(s: str, d: str) -> str:
        fp = _snapshot_file(s, d)
        if fp is not None:
            linked.append((os.path.relpath(d, dst) if is_dir else "", *fp))
        return d

    try:
        if is_dir:
            shutil.copytree(src, dst, copy_function=take)
            size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        else:
            take(str(src), str(dst))
            size = dst.stat().st_size
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)  # a failed snapshot leaves no folder behind
        raise
    return str(dst), is_dir, size, tuple(linked) or None


def _snapshot_file(src: str, dst: str) -> tuple[int, int, int] | None:
    """Clone, copy or (big files) hard-link ``src`` to ``dst``; return a fingerprint if linked."""
    if _reflink(src, dst):
        return None
    if os.stat(src).st_size > COPY_LIMIT:
        try:
            # Copying a GB checkpoint would block the caller for seconds. A hard link is
            # instant and survives delete and write-new-then-rename; an in-place rewrite
            # (open(path, "wb"), np.save to the same path) changes it: verify() catches that.
            os.link(src, dst)
            st = os.stat(dst)
            return st.st_ino, st.st_size, st.st_mtime_ns
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(src, dst)  # sendfile/copy_file_range: an in-kernel copy on Linux
    return None


def _link_or_copy(src: str, dst: str) -> str:
    """``copy_function`` for ``shutil.copytree`` with the same rules as :func:`snapshot`."""
    _snapshot_file(src, dst)
    return dst


def _reflink(src: str, dst: str) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(src, "rb") as fs, open(dst, "wb") as fd:
            fcntl.ioctl(fd.fileno(), _FICLONE, fs.fileno())
        return True
    except OSError:
        try:
            os.unlink(dst)
        except OSError:
            pass
        return False


def verify(local_path: str, is_dir: bool, fingerprint: tuple | None) -> None:
    """Raise :class:`SnapshotChanged` if a hard-linked snapshot was rewritten since the log call."""
    for rel, ino, size, mtime in fingerprint or ():
        path = os.path.join(local_path, rel) if is_dir else local_path
        st = os.stat(path)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != (ino, size, mtime):
            raise SnapshotChanged(
                f"{path!r} was rewritten in place after it was logged; files over MLFLOW_ER_COPY_LIMIT_MB "
                f"({COPY_LIMIT >> 20} MB) are hard-linked, not copied: save each checkpoint to a new file "
                "(or write elsewhere and rename over it), or raise MLFLOW_ER_COPY_LIMIT_MB")


def discard(path: str | None) -> None:
    """Remove a snapshot and its holder folder once every sink has it."""
    if not path:
        return
    holder = Path(path).parent
    shutil.rmtree(holder if holder.name.startswith(("snap-", "render-")) else path, ignore_errors=True)


def render(kind: str, content: Any, name: str) -> str:
    """Write rendered content to a fresh staging file; return its path."""
    if kind not in ("text", "json", "image"):
        raise ValueError(f"unknown artifact payload {kind!r}")
    holder = Path(tempfile.mkdtemp(prefix="render-", dir=staging_root()))
    out = holder / Path(name).name
    try:
        if kind == "text":
            out.write_text(content, encoding="utf-8")
        elif kind == "json":
            out.write_text(dump_dict(content, out.name), encoding="utf-8")
        else:
            to_pil(content).save(out)
    except BaseException:
        shutil.rmtree(holder, ignore_errors=True)  # a failed render leaves no folder behind
        raise
    return str(out)


def dump_dict(content: Any, artifact_file: str) -> str:
    """``log_dict``'s text: YAML for ``.yaml``/``.yml``, else JSON (indent 2), as MLflow writes it.

    Raises :class:`InvalidRecord` naming the file when ``content`` cannot be serialised.
    """
    try:
        if posixpath.splitext(artifact_file)[1] in {".yaml", ".yml"}:
            import yaml  # type: ignore[import-untyped]

            return str(yaml.safe_dump(content, default_flow_style=False))
        return json.dumps(content, indent=2)
    except Exception as exc:
        raise InvalidRecord(f"log_dict content for {artifact_file!r}",
                            f"cannot be serialised: {type(exc).__name__}: {exc}"[:300]) from exc


_IMAGE_KINDS = frozenset("biuf")  # numpy dtype kinds MLflow renders: bool, signed/unsigned int, float


def copy_image(image: Any) -> Any:
    """Copy an image in the caller so later in-place edits by the caller don't leak in."""
    # Look at the type's module before importing PIL: importing it costs the caller
    # tens of milliseconds the first time, and most images are numpy arrays.
    if type(image).__module__.startswith("PIL."):
        return image.copy()
    import numpy as np

    try:
        arr = np.array(image, copy=True)
    except Exception as exc:
        raise InvalidRecord("image", f"cannot be read as an array: {type(exc).__name__}: {exc}"[:300]) from exc
    if arr.dtype.kind not in _IMAGE_KINDS:
        # MLflow's rule; a complex array would otherwise lose its imaginary part without a word
        raise InvalidRecord("image", f"dtype {arr.dtype} is not an image's", "bool, integer or floating values")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InvalidRecord("image", f"shape {arr.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    return arr


def to_pil(image: Any) -> Any:
    """Convert what ``mlflow.log_image`` accepts (PIL image or numpy array) to a PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    import numpy as np

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype.kind == "f":
        # MLflow's rule: floats are expected in [0, 1] and scaled to 0..255
        arr = (np.clip(arr, 0.0, 1.0) * 255).round()
    elif arr.dtype.kind in "iu" and arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    elif arr.dtype == np.bool_:
        arr = arr * 255
    return Image.fromarray(arr.astype(np.uint8))
