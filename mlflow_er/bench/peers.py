"""Peers as optional contenders: W&B offline and tensorboardX, when installed (``mlflow-er[bench]``).

They run the ``loop`` workload only: what a training loop pays per metric is the figure
that compares across libraries (their stores, latencies and delivery differ in kind).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from .contenders import scalar_step_logger

WANDB = "wandb-offline"
TENSORBOARDX = "tensorboardx"
#: contender name -> (module to import, distribution for its version)
PEERS: dict[str, tuple[str, str]] = {WANDB: ("wandb", "wandb"), TENSORBOARDX: ("tensorboardX", "tensorboardX")}
INSTALL_HINT = "pip install 'mlflow-er[bench]'"


def installed_peers() -> tuple[list[str], list[dict[str, str]], dict[str, str]]:
    """``(names installed, skipped entries for the others, {name: version})``."""
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    versions: dict[str, str] = {}
    for name, (module, dist) in PEERS.items():
        if importlib.util.find_spec(module) is None:
            skipped.append({"contender": name, "reason": f"{module} is not installed ({INSTALL_HINT})"})
            continue
        names.append(name)
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "?"
    return names, skipped, versions


class PeerSession:
    """The part of a bench session a peer provides: a per-step logger, a drain, no delivery counts."""

    run_id = ""

    def step_logger(self, keys: tuple[str, ...]) -> Callable[[int, float], None]:
        """A function ``log(step, value)`` logging one value per key, the peer's idiomatic way."""
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> None:
        """Hand everything logged so far to the peer's storage."""

    def pending(self) -> int | None:
        """Records logged and not yet written, when the peer says (it does not: ``None``)."""
        return None

    def delivered(self) -> int | None:
        """Records written so far, when the peer says (it does not: ``None``)."""
        return None

    def stats(self) -> dict[str, Any]:
        """No counters."""
        return {}


class WandbSession(PeerSession):
    """``wandb.init(mode="offline")``; one ``run.log(dict, step=)`` per step, as W&B users write it."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id = str(getattr(run, "id", ""))

    def step_logger(self, keys: tuple[str, ...]) -> Callable[[int, float], None]:
        log = self.run.log
        k0, k1, k2, k3, k4 = keys

        def step(i: int, v: float) -> None:
            log({k0: v, k1: v * 0.5, k2: v * 0.25, k3: v + 1.0, k4: v - 1.0}, step=i)
        return step


class TensorboardXSession(PeerSession):
    """``tensorboardX.SummaryWriter``; one ``add_scalar`` per metric (its writer thread writes the file)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def step_logger(self, keys: tuple[str, ...]) -> Callable[[int, float], None]:
        return scalar_step_logger(self.writer.add_scalar, keys)

    def flush(self, timeout: float | None = None) -> None:
        self.writer.flush()


@contextmanager
def open_peer(name: str, workdir: str) -> Iterator[PeerSession]:
    """Start a peer's run writing under ``workdir`` (the task's own folder); leaving ends it."""
    folder = Path(workdir) / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == WANDB:
        os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(folder),
                           "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"})
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                  save_code=False)
        run = wandb.init(mode="offline", dir=str(folder), project="mlflow-er-bench", settings=settings)
        try:
            yield WandbSession(run)
        finally:
            run.finish()
            wandb.teardown()  # stop its service process before the child exits
    elif name == TENSORBOARDX:
        from tensorboardX import SummaryWriter  # type: ignore[import-untyped]

        writer = SummaryWriter(str(folder))
        try:
            yield TensorboardXSession(writer)
        finally:
            writer.close()
    else:
        raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
