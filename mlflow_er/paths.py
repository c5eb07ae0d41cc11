"""Where mlflow-er keeps things on disk by default: never a surprise folder in the working directory."""

from __future__ import annotations

import os
from pathlib import Path

ENV_SPOOL_DIR = "MLFLOW_ER_SPOOL_DIR"


def state_home() -> Path:
    """This user's folder for data that must survive a reboot (unsent records are not a cache).

    ``$XDG_STATE_HOME`` (default ``~/.local/state``) on Linux and other POSIX systems,
    ``%LOCALAPPDATA%`` on Windows.
    """
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA")
        if base:
            return Path(base)
    xdg = os.environ.get("XDG_STATE_HOME", "").strip()
    # The XDG spec ignores relative paths: they would depend on the working directory again.
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    return Path.home() / ".local" / "state"


def default_spool_dir() -> Path:
    """``$MLFLOW_ER_SPOOL_DIR``, else ``<state home>/mlflow-er/spool`` (``~/.local/state/mlflow-er/spool``)."""
    env = os.environ.get(ENV_SPOOL_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    return state_home() / "mlflow-er" / "spool"
