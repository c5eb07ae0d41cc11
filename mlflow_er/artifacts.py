"""Artifact snapshots and rendering.

A log call snapshots the file at call time (a hard link when the spool folder is on the
same filesystem, else a copy), so the caller may overwrite or delete it at once. Content
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

from .errors import InvalidRecord


def staging_root() -> Path:
    """Where snapshots wait for upload. ``MLFLOW_ER_STAGING_DIR`` overrides the temp dir."""
    root = Path(os.environ.get("MLFLOW_ER_STAGING_DIR") or Path(tempfile.gettempdir()) / "mlflow-er-staging")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def snapshot(local_path: str | os.PathLike[str]) -> tuple[str, bool, int]:
    """Freeze ``local_path`` as it is now. Returns ``(snapshot_path, is_dir, size_bytes)``."""
    src = Path(local_path)
    if not src.exists():
        raise InvalidRecord("artifact local_path", f"{str(src)!r} does not exist")
    holder = Path(tempfile.mkdtemp(prefix="snap-", dir=staging_root()))
    dst = holder / src.name
    if src.is_dir():
        # copytree with a link-or-copy function keeps big files cheap to snapshot
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        return str(dst), True, size
    _link_or_copy(str(src), str(dst))
    return str(dst), False, dst.stat().st_size


def _link_or_copy(src: str, dst: str) -> str:
    try:
        # A hard link shares the inode, so it is only a snapshot if the writer replaces
        # the file (write-new-then-rename, as np.save/torch.save do) rather than editing
        # it in place; copying would cost seconds for a GB file on the caller's thread.
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


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
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return image.copy()
    except ImportError:
        pass
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
