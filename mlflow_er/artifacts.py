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
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import InvalidRecord, MlflowErError


def staging_root() -> Path:
    """Where snapshots wait for upload. ``MLFLOW_ER_STAGING_DIR`` overrides the temp dir."""
    root = Path(os.environ.get("MLFLOW_ER_STAGING_DIR") or Path(tempfile.gettempdir()) / "mlflow-er-staging")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


#: Files up to this size are copied at call time (a true snapshot); bigger ones are hard
#: linked when possible, and an in-place rewrite before upload is detected and reported.
COPY_LIMIT = int(float(os.environ.get("MLFLOW_ER_COPY_LIMIT_MB", "16")) * 2**20)
_FICLONE = 0x40049409  # Linux ioctl: copy-on-write clone (btrfs, xfs); instant and safe


class SnapshotChanged(MlflowErError):
    """A hard-linked artifact snapshot no longer holds the content it had at the log call."""


def snapshot(local_path: str | os.PathLike[str]) -> tuple[str, bool, int, tuple | None]:
    """Freeze ``local_path`` as it is now.

    Returns ``(snapshot_path, is_dir, size_bytes, fingerprint)``; ``fingerprint`` is set
    when some file was hard linked rather than copied, for :func:`verify` before upload.
    """
    src = Path(local_path)
    if not src.exists():
        raise InvalidRecord("artifact local_path", f"{str(src)!r} does not exist")
    holder = Path(tempfile.mkdtemp(prefix="snap-", dir=staging_root()))
    dst = holder / src.name
    linked: list[tuple[str, int, int, int]] = []
    is_dir = src.is_dir()

    def take(s: str, d: str) -> str:
        fp = _snapshot_file(s, d)
        if fp is not None:
            linked.append((os.path.relpath(d, dst) if is_dir else "", *fp))
        return d

    if is_dir:
        shutil.copytree(src, dst, copy_function=take)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    else:
        take(str(src), str(dst))
        size = dst.stat().st_size
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
    holder = Path(tempfile.mkdtemp(prefix="render-", dir=staging_root()))
    out = holder / Path(name).name
    if kind == "text":
        out.write_text(content, encoding="utf-8")
    elif kind == "json":
        if out.suffix in {".yaml", ".yml"}:
            import yaml

            out.write_text(yaml.safe_dump(content, default_flow_style=False), encoding="utf-8")
        else:
            out.write_text(json.dumps(content, indent=2), encoding="utf-8")
    elif kind == "image":
        to_pil(content).save(out)
    else:
        raise ValueError(f"unknown artifact payload {kind!r}")
    return str(out)


def copy_image(image: Any) -> Any:
    """Copy an image in the caller so later in-place edits by the caller don't leak in."""
    # Look at the type's module before importing PIL: importing it costs the caller
    # tens of milliseconds the first time, and most images are numpy arrays.
    if type(image).__module__.startswith("PIL."):
        return image.copy()
    import numpy as np

    arr = np.array(image, copy=True)
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
