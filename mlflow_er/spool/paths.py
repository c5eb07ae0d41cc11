"""What ``mlflow-er sync`` and ``status`` may read: is a path a spool, is an artifact record's file inside it.

A spool given by mistake (a typo, an unrelated folder) must fail loudly and create
nothing; a crafted spool must never make the syncing host upload its own files.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import NotASpool
from .format import ARTIFACTS_DIR, DESTINATION_FILE, SEGMENTS_DIR


def check_spool(fs: Any, root: str, url: str) -> None:
    """Raise :class:`NotASpool` unless ``root`` is a spool (or an upload copy of one). Never writes."""
    root = root.rstrip("/")
    fs.invalidate_cache()
    if not fs.exists(root):
        raise NotASpool(f"no spool at {url}: it does not exist (check the path; a spool is the folder the spool "
                        f"sink writes, e.g. ./mlflow-er-spool)")
    if not fs.isdir(root):
        raise NotASpool(f"{url} is a file, not a spool folder (give the folder that holds {SEGMENTS_DIR}/)")
    if not fs.isdir(f"{root}/{SEGMENTS_DIR}") and not fs.exists(f"{root}/{DESTINATION_FILE}"):
        raise NotASpool(f"{url} is not an mlflow-er spool: it has no {SEGMENTS_DIR}/ folder (a spool written by "
                        f"the spool sink, or its upload copy, has one); check the path")


def unsafe_artifact(root: str, rel: str | None, local: bool) -> str | None:
    """Why an artifact record's snapshot path must not be read (``None`` when it is inside ``artifacts/``)."""
    if not rel:
        return "names no snapshot"
    p = PurePosixPath(rel)
    if p.is_absolute() or Path(rel).is_absolute():
        return f"names an absolute path ({rel}), outside the spool's {ARTIFACTS_DIR}/ folder"
    if ".." in p.parts:
        return f"climbs out of the spool with '..' ({rel})"
    if len(p.parts) < 2 or p.parts[0] != ARTIFACTS_DIR:
        return f"is outside the spool's {ARTIFACTS_DIR}/ folder ({rel})"
    if local:
        base = os.path.realpath(os.path.join(root, ARTIFACTS_DIR))
        real = os.path.realpath(os.path.join(root, rel))
        if not real.startswith(base + os.sep):
            return f"resolves through a symlink to {real}, outside the spool's {ARTIFACTS_DIR}/ folder"
        if os.path.isdir(real):
            for dirpath, dirnames, filenames in os.walk(real):
                for name in dirnames + filenames:
                    target = os.path.realpath(os.path.join(dirpath, name))
                    if not target.startswith(base + os.sep):
                        return f"holds {os.path.join(dirpath, name)}, a symlink out of the spool"
    return None
