"""A helper process that imports MLflow once, then forks one fresh child per benchmark task.

Importing MLflow takes ~1.5 s; forking a process that already did takes milliseconds.
Every task still gets a clean process of its own: its own MLflow state and async queue,
its own environment variables, its own RSS, and an exit that skips ``atexit`` hooks (a
latency or memory task leaves a backlog or a stalled writer behind on purpose).

Protocol on the helper's stdin/stdout: length-prefixed pickles. The parent sends
``(task, result_path)``; the helper answers ``("pid", pid)`` once the child is forked,
then ``("exit", code)`` when it has been reaped. The child writes ``("ok", result)`` or
``("error", traceback)`` to ``result_path``. Without ``os.fork`` (Windows) the parent runs
``python -m mlflow_er.bench.zygote --once TASK RESULT`` per task instead.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import sys
import time
import traceback
from typing import Any, BinaryIO

_HEADER = struct.Struct("!I")
# What every child would otherwise import on its own (names that do not exist are skipped).
PRELOAD = ("mlflow", "mlflow.tracking.fluent", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.tracking.rest_store", "mlflow.store.artifact.local_artifact_repo",
           "mlflow.store.artifact.http_artifact_repo", "mlflow.store.artifact.mlflow_artifacts_repo",
           "mlflow.tracing.provider", "mlflow.tracing.processor.base_mlflow", "mlflow.tracking.context.registry",
           "alembic", "numpy", "PIL.Image", "psutil", "mlflow_er", "mlflow_er.tracker", "mlflow_er.bench.runner")


def write_msg(stream: BinaryIO, obj: Any) -> None:
    """Send one length-prefixed pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    buf = b""
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_msg(fd: int, timeout: float | None = None) -> Any:
    """Receive one length-prefixed pickle; ``None`` at end of stream; ``TimeoutError`` past ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0], deadline)
    return None if body is None else pickle.loads(body)


def run_child(task: Any, result_path: str) -> None:
    """Run one task in this (fresh) process, write its outcome to ``result_path``, and exit at once."""
    code = 0
    try:
        fd = os.open(task.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.chdir(task.cwd or task.ctx.workdir)
        from .runner import execute

        try:
            outcome: tuple[str, Any] = ("ok", execute(task))
        except BaseException:
            outcome = ("error", traceback.format_exc(limit=10))
        tmp = result_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(outcome, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, result_path)
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """The helper's loop: import MLflow, then fork one child per request until stdin closes."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:  # load every plugin's entry point once, here, rather than in each child
        from mlflow_er import plugins

        plugins.list_plugins()
    except Exception:
        pass
    inp = sys.stdin.fileno()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # a stray print must never corrupt the protocol
    while True:
        msg = read_msg(inp)
        if msg is None:
            return
        task, result_path = msg
        pid = os.fork()
        if pid == 0:
            out.close()
            run_child(task, result_path)
        write_msg(out, ("pid", pid))
        _, status = os.waitpid(pid, 0)
        write_msg(out, ("exit", os.waitstatus_to_exitcode(status)))


def main(argv: list[str]) -> int:
    """``python -m mlflow_er.bench.zygote`` (serve) or ``... --once TASK RESULT`` (one task, no fork)."""
    if argv[:1] == ["--once"] and len(argv) == 3:
        with open(argv[1], "rb") as f:
            task = pickle.load(f)
        run_child(task, argv[2])
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
