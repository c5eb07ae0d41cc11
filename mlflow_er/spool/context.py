"""Who and what wrote a spool: the facts a live MLflow run gets from its run context.

A live run is tagged by MLflow with ``mlflow.user``, ``mlflow.source.name``,
``mlflow.source.type`` and (in a git checkout) ``mlflow.source.git.commit``. An offline run
has no MLflow run at start, so the writer records them in every segment header (computed
once per process, without importing MLflow or running ``git``) and ``mlflow-er sync``
tags the runs it creates with them, unless the run's own start record says otherwise.
"""

from __future__ import annotations

import getpass
import os
import sys
from functools import lru_cache
from pathlib import Path

USER, SOURCE_NAME, SOURCE_TYPE, GIT_COMMIT = (
    "mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")


def _git_dir(start: Path) -> Path | None:
    for d in (start, *start.parents):
        dot = d / ".git"
        if dot.is_dir():
            return dot
        if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot.read_text(errors="replace").strip()
            if text.startswith("gitdir:"):
                return (d / text[7:].strip()).resolve()
    return None


def git_commit(start: Path) -> str | None:
    """The commit checked out in the repository holding ``start`` (reads ``.git``; never raises)."""
    try:
        gd = _git_dir(start.resolve())
        if gd is None:
            return None
        head = (gd / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head[4:].strip()
        common = gd
        if (gd / "commondir").is_file():
            common = (gd / (gd / "commondir").read_text().strip()).resolve()
        for base in (gd, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip() or None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name.strip() == ref:
                    return sha
    except OSError:
        return None
    return None


@lru_cache(maxsize=1)
def run_context() -> dict[str, str]:
    """The run-context tags of this process, as MLflow's default and git context providers set them."""
    out: dict[str, str] = {SOURCE_TYPE: "LOCAL"}
    try:
        out[USER] = getpass.getuser()
    except (KeyError, OSError):
        pass
    source = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if source:
        out[SOURCE_NAME] = source
    commit = git_commit(Path(source).parent if source and os.path.exists(source) else Path.cwd())
    if commit:
        out[GIT_COMMIT] = commit
    return out
