"""Stores for the benchmark: a fresh embedded SQLite store, or a local ``mlflow server``.

Everything binds to 127.0.0.1 only. The server is started in its own process group so
stopping it reaches uvicorn's children too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def healthy(uri: str, timeout: float = 1.0) -> bool:
    """True when ``GET {uri}/health`` answers 200."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, n_bytes: int = 3000) -> str:
    try:
        return path.read_bytes()[-n_bytes:].decode("utf-8", "replace")
    except OSError:
        return "<no log>"


class LocalServer:
    """A real ``mlflow server`` subprocess on 127.0.0.1 with a SQLite store in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.artifacts_dir = self.workdir / "artifacts"
        self.log_path = self.workdir / "mlflow-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        """The argv that starts the server."""
        return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination", str(self.artifacts_dir), "--serve-artifacts",
                "--workers", "1", "--disable-security-middleware"]

    def start(self, timeout: float = 90.0) -> LocalServer:
        """Start the server and wait for ``/health``; raise ``RuntimeError`` with the log tail if it fails."""
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while not healthy(self.uri):
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise RuntimeError(f"mlflow server exited with {code}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{_tail(self.log_path)}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group at once (no shutdown: a crash), and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def alive(self) -> bool:
        """Whether the server process runs and answers ``/health``."""
        return self._proc is not None and self._proc.poll() is None and healthy(self.uri)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds, reap."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                try:  # the leader is gone; make sure no child of the group lingers
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break


@dataclass
class Store:
    """Where the benchmark logs: a tracking URI, and the local artifact root when we know it."""

    kind: str  # "sqlite", "server" (started here) or "uri" (given)
    uri: str
    workdir: Path
    artifact_location: str | None = None  # for a new experiment (SQLite: a folder beside the DB)
    artifact_root: Path | None = None  # local folder holding run artifacts, for cleanup after a task
    server: LocalServer | None = field(default=None, repr=False)
    _own_workdir: bool = field(default=True, repr=False)

    def describe(self) -> dict[str, str]:
        """What the JSON output says about the store (credentials never appear)."""
        from ..redact import redact as _redact

        return {"kind": self.kind, "uri": _redact(self.uri)}

    def close(self) -> None:
        """Stop the server if we started one and remove the temporary folder."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def open_store(tracking_uri: str | None, start_server: bool, keep: bool = False,
               workdir: Path | None = None) -> Store:
    """Make the store the benchmark runs against (the caller must :meth:`Store.close` it).

    ``workdir`` is the temporary folder to use (made here when not given); it is removed
    at close unless ``keep``.
    """
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mlflow-er-bench-"))
    try:
        if start_server:
            server = LocalServer(workdir / "server").start()
            return Store("server", server.uri, workdir, None, server.artifacts_dir, server, not keep)
        if tracking_uri:
            return Store("uri", tracking_uri, workdir, None, None, None, not keep)
        db = workdir / "mlflow.db"
        arts = workdir / "artifacts"
        arts.mkdir()
        return Store("sqlite", f"sqlite:///{db}", workdir, arts.as_uri(), arts, None, not keep)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
