"""Real components for tests, bound to loopback only.

* :class:`MlflowServer` runs a real ``mlflow server`` subprocess (sqlite + local artifacts).
* :class:`FaultServer` impersonates MLflow's REST API with scripted failures, delays and
  disconnects, optionally forwarding to a real upstream server.
* :class:`MotoS3` runs moto's S3 in-process on a free port.

Every wait is bounded in time, and every component only ever binds to ``127.0.0.1``.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:``port`` (so a server could bind it now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like uvicorn: TIME_WAIT leftovers must not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def wait_port_free(port: int, timeout: float = 10.0) -> None:
    """Block until ``port`` can be bound again, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still in use after {timeout}s")
        time.sleep(0.1)


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-n_bytes:].decode("utf-8", "replace")


# --------------------------------------------------------------------------- mlflow server


class MlflowServer:
    """A real ``mlflow server`` subprocess on 127.0.0.1 with a sqlite store in ``workdir``.

    The port is fixed at construction so :meth:`restart` comes back on the same address
    with the same database and artifacts, as a crashed-and-restarted server would.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.db_uri = f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.artifacts_dir = self.workdir / "artifacts"
        self.log_path = self.workdir / "mlflow-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """Tracking URI of the server, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the ``mlflow server`` process (also its process-group id), if started."""
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The argv used to start the server."""
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", HOST,
            "--port", str(self.port),
            "--backend-store-uri", self.db_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--serve-artifacts",
            # One uvicorn worker: one sqlite writer, fast start, few processes to kill.
            "--workers", "1",
            # Host-header/CORS checks only get in the way of proxies such as FaultServer;
            # the server binds to loopback anyway.
            "--disable-security-middleware",
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The server must not pick up the test process's client-side tracking settings.
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update(
            {
                # MLflow 3.x otherwise spawns a huey job runner with ~7 consumer processes.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                # No traffic beyond loopback.
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self, timeout: float = 60.0) -> MlflowServer:
        """Start the server and wait until ``GET /health`` answers 200.

        Raises ``RuntimeError`` (with the tail of the server log) if it exits or does not
        become healthy within ``timeout`` seconds; the process is killed in that case.
        """
        if self.is_running():
            raise RuntimeError(f"mlflow server already running on {self.uri}")
        wait_port_free(self.port)
        # Log to a file, not a pipe: nobody drains a pipe and a full one blocks the server.
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== starting {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self._env(),
                # Own process group so kill()/stop() reach the uvicorn child as well.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"mlflow server exited with {code}:\n{_tail(self.log_path)}")
            if self._healthy():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1.0) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _signal_group(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass  # whole group already gone

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: SIGTERM the process group, SIGKILL after ``timeout`` s, reap."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._finish()

    def kill(self) -> None:
        """Crash the server: SIGKILL its whole process group and wait for the port to be free."""
        if self._proc is None:
            return
        self._finish()

    def _finish(self) -> None:
        # SIGKILL the group even if the leader already exited: children may linger.
        assert self._proc is not None
        self._signal_group(signal.SIGKILL)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        self._proc = None
        wait_port_free(self.port)

    def restart(self, timeout: float = 60.0) -> MlflowServer:
        """Start again on the same port with the same store (stops it first if running)."""
        self.stop()
        return self.start(timeout=timeout)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- fault server


@dataclass(frozen=True)
class Reply:
    """One scripted response of a :class:`FaultServer`.

    Attributes:
        status: HTTP status; ``None`` means the upstream's status when forwarded, else 200.
        body: JSON-able object (or str/bytes sent as is); ``None`` means the upstream's body
            when forwarded, else ``{}``.
        headers: extra response headers, e.g. ``{"Retry-After": "1"}``.
        delay: seconds to sleep before answering (after forwarding, if forwarded), so a
            client can time out on a request the upstream already committed.
        forward: send the request to the upstream first. ``None`` means: forward when an
            upstream is set and ``status`` is ``None`` or below 400 (an error reply then
            models "rejected before commit"; pass ``forward=True`` for "committed, but the
            client saw an error").
        disconnect: close the connection without any response (after forward/delay).
        mode: answer as a proxy that is not MLflow would, one of :data:`PROXY_MODES`
            (overrides everything above).
    """

    status: int | None = None
    body: Any = None
    headers: Mapping[str, str] | None = None
    delay: float = 0.0
    forward: bool | None = None
    disconnect: bool = False
    mode: str | None = None


#: How a proxy in front of MLflow can answer instead of MLflow (``Reply(mode=...)`` or
#: ``FaultServer.set_mode``):
#:
#: * ``login-redirect`` — 302 to ``/login`` (which serves an HTML sign-in page with 200);
#: * ``html`` — 200 with an HTML page;
#: * ``wrong-content-type`` — 200 ``{}`` but ``text/plain``;
#: * ``not-shape`` — 200 ``application/json`` whose body is a JSON array, not an object;
#: * ``truncated`` — forwarded to the upstream (committed), then the reply is cut off mid-body;
#: * ``stall`` — the request is read and never answered (until ``stop()``);
#: * ``reset`` — the connection is reset (TCP RST) instead of an answer.
PROXY_MODES = ("login-redirect", "html", "wrong-content-type", "not-shape", "truncated", "stall", "reset")

LOGIN_PAGE = (b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form method='post' "
              b"action='/login'><input name='user'><input name='password' type='password'></form></body></html>")


@dataclass
class RecordedRequest:
    """A request received by a :class:`FaultServer` and what it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]
    time: float  # time.monotonic() on arrival
    status: int | None = None  # status replied; None if disconnected
    forwarded: bool = False


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def _fake_run(run_id: str) -> dict[str, Any]:
    """Minimal run JSON that MLflow's REST client can parse."""
    return {
        "run": {
            "info": {
                "run_id": run_id,
                "run_uuid": run_id,
                "experiment_id": "0",
                "run_name": "fault-server-run",
                "user_id": "test",
                "status": "RUNNING",
                "start_time": int(time.time() * 1000),
                "artifact_uri": "",
                "lifecycle_stage": "active",
            },
            "data": {"metrics": [], "params": [], "tags": []},
            "inputs": {},
        }
    }


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    # HTTP/1.0: one request per connection, so a stopped server answers nothing more
    # (keep-alive handler threads would otherwise outlive stop()).
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; requests are recorded instead

    def do_GET(self) -> None:
        self.server.owner._handle(self)

    do_POST = do_PATCH = do_PUT = do_DELETE = do_GET


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for handlers sleeping in a delay
    owner: FaultServer


class FaultServer:
    """A fake MLflow REST endpoint on 127.0.0.1 that fails on demand.

    Replies are chosen, in order of precedence, by: an active :meth:`fail_for` window, the
    next scripted :class:`Reply` (consumed FIFO), then the default: forward to ``upstream``
    if set, otherwise 200 with a minimal run for ``runs/get``/``runs/create`` and ``{}``
    for anything else. Only requests whose path ends with one of ``script_paths`` (all
    paths when ``None``) see the failure window and consume the script.
    """

    def __init__(
        self,
        script: list[Reply] | None = None,
        upstream: str | None = None,
        script_paths: tuple[str, ...] | None = None,
        forward_timeout: float = 30.0,
    ) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.script_paths = script_paths
        self.forward_timeout = forward_timeout
        self._lock = threading.Lock()
        self._script: collections.deque[Reply] = collections.deque(script or [])
        self._requests: list[RecordedRequest] = []
        self._fail_until = 0.0
        self._fail_reply = Reply(status=503)
        self._mode: str | None = None
        #: Optional: picks a reply from the request itself (body included); ``None`` falls through to the rest.
        self.responder: Callable[[RecordedRequest], Reply | None] | None = None
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Append replies to the script."""
        with self._lock:
            self._script.extend(replies)

    def fail_for(
        self,
        seconds: float,
        status: int = 503,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> None:
        """Answer every (matching) request with ``status`` for the next ``seconds``."""
        with self._lock:
            self._fail_reply = Reply(status=status, headers=headers, body=body, forward=False)
            self._fail_until = time.monotonic() + seconds

    def set_mode(self, mode: str | None) -> None:
        """Answer every (matching) request in proxy ``mode`` (see :data:`PROXY_MODES`) until set to ``None``."""
        if mode is not None and mode not in PROXY_MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; one of {PROXY_MODES}")
        with self._lock:
            self._mode = mode

    @property
    def pending(self) -> int:
        """Number of scripted replies not consumed yet."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, suffix: str) -> list[RecordedRequest]:
        """Recorded requests whose path ends with ``suffix`` (e.g. ``"runs/log-batch"``)."""
        return [r for r in self.requests if r.path.endswith(suffix)]

    @property
    def uri(self) -> str:
        """Base URI to use as an MLflow tracking URI."""
        assert self._httpd is not None, "start() first"
        return f"http://{HOST}:{self._httpd.server_address[1]}"

    def start(self) -> FaultServer:
        """Bind to a free loopback port and serve in a daemon thread."""
        self._stopping.clear()
        self._httpd = _HTTPServer((HOST, 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; handlers still sleeping in a delay are woken and abandoned."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request handling ----------------------------------------------------------------

    def _choose(self, path: str) -> Reply | None:
        if self.script_paths is not None and not path.endswith(self.script_paths):
            return None
        with self._lock:
            if time.monotonic() < self._fail_until:
                return self._fail_reply
            if self._script:
                return self._script.popleft()
            return Reply(mode=self._mode) if self._mode else None

    def _forward(self, h: _Handler, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self.upstream is not None
        req = urllib.request.Request(self.upstream + h.path, data=raw or None, method=h.command)
        for name in ("Content-Type", "Authorization", "User-Agent"):
            if h.headers.get(name):
                req.add_header(name, h.headers[name])
        try:
            with urllib.request.urlopen(req, timeout=self.forward_timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except (OSError, urllib.error.URLError) as e:
            # What a real reverse proxy says when the upstream is down.
            body = {"error_code": "TEMPORARILY_UNAVAILABLE", "message": f"upstream: {e}"}
            return 502, {}, json.dumps(body).encode()

    def _handle(self, h: _Handler) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        rec = RecordedRequest(
            method=h.command,
            path=parsed.path,
            query=urllib.parse.parse_qs(parsed.query),
            body=body,
            headers=dict(h.headers),
            time=time.monotonic(),
        )
        with self._lock:
            self._requests.append(rec)

        if parsed.path == "/login":  # where the login-redirect mode sends clients that follow it
            self._send(h, rec, 200, {"Content-Type": "text/html; charset=utf-8"}, LOGIN_PAGE)
            return
        reply = self.responder(rec) if self.responder is not None else None
        if reply is None:
            reply = self._choose(parsed.path)
        if reply is not None and reply.mode is not None:
            self._answer_as_proxy(h, rec, reply.mode, raw)
            return
        if reply is None:
            reply = Reply(forward=self.upstream is not None)
        forward = reply.forward
        if forward is None:
            forward = self.upstream is not None and (reply.status is None or reply.status < 400)

        status, headers, payload = 200, {}, b""
        if forward and self.upstream is not None:
            status, up_headers, payload = self._forward(h, raw)
            headers = {"Content-Type": up_headers.get("Content-Type", "application/json")}
            rec.forwarded = True
        else:
            payload = json.dumps(self._default_body(parsed.path, rec)).encode()

        if reply.delay:
            # Event.wait, not sleep: stop() wakes it so shutdown stays quick.
            self._stopping.wait(reply.delay)
        if reply.disconnect or self._stopping.is_set():
            h.close_connection = True
            return
        if reply.status is not None:
            status = reply.status
        if reply.body is not None:
            payload = _encode(reply.body)
            headers["Content-Type"] = "application/json"
        headers.setdefault("Content-Type", "application/json")
        headers.update(reply.headers or {})
        rec.status = status
        try:
            h.send_response(status)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timed out) before we answered: that is the point

    def _send(self, h: _Handler, rec: RecordedRequest, status: int, headers: Mapping[str, str], payload: bytes,
              length: int | None = None) -> None:
        rec.status = status
        try:
            h.send_response(status)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(payload) if length is None else length))
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _answer_as_proxy(self, h: _Handler, rec: RecordedRequest, mode: str, raw: bytes) -> None:
        html = {"Content-Type": "text/html; charset=utf-8"}
        if mode == "login-redirect":
            target = f"http://{HOST}:{h.server.server_address[1]}/login?next={urllib.parse.quote(rec.path)}"
            self._send(h, rec, 302, {**html, "Location": target}, b"<html><body>Redirecting to sign in</body></html>")
        elif mode == "html":
            self._send(h, rec, 200, html, LOGIN_PAGE)
        elif mode == "wrong-content-type":
            self._send(h, rec, 200, {"Content-Type": "text/plain"}, b"{}")
        elif mode == "not-shape":
            self._send(h, rec, 200, {"Content-Type": "application/json"}, b'["ok"]')
        elif mode == "truncated":
            status, up_headers, payload = self._forward(h, raw) if self.upstream else (200, {}, b"{}")
            rec.forwarded = self.upstream is not None
            body = payload + b" " * 64  # the promised length is longer than what is sent
            self._send(h, rec, status, {"Content-Type": up_headers.get("Content-Type", "application/json")},
                       body[: len(body) // 2], length=len(body))
            h.close_connection = True
        elif mode == "stall":
            self._stopping.wait(3600)
            h.close_connection = True
        elif mode == "reset":
            # SO_LINGER with a zero timeout: close() sends RST, the client sees ECONNRESET.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.close_connection = True
            h.connection.close()
            h.wfile = io.BytesIO()  # the handler's finish() flushes it: nothing left to send
        else:  # pragma: no cover - set_mode validates
            raise ValueError(mode)

    @staticmethod
    def _default_body(path: str, rec: RecordedRequest) -> Any:
        if path.endswith("/runs/get"):
            run_id = (rec.query.get("run_id") or rec.query.get("run_uuid") or [uuid.uuid4().hex])[0]
            return _fake_run(run_id)
        if path.endswith("/runs/create"):
            return _fake_run(uuid.uuid4().hex)
        return {}


# --------------------------------------------------------------------------- moto S3


class MotoS3:
    """moto's S3 served in-process (a thread) on a free 127.0.0.1 port."""

    KEY = "testing"
    SECRET = "testing"
    REGION = "us-east-1"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        # port=0: the OS picks; the bound port is read back after start().
        self._server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        self._endpoint: str | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        assert self._endpoint is not None, "start() first"
        return self._endpoint

    def start(self) -> MotoS3:
        """Start serving; returns once the socket is bound."""
        self._server.start()
        _host, port = self._server.get_host_and_port()
        self._endpoint = f"http://{HOST}:{port}"
        return self

    def stop(self) -> None:
        """Stop the server thread."""
        if self._endpoint is not None:
            self._server.stop()
            self._endpoint = None

    def env(self) -> dict[str, str]:
        """Environment for code (or subprocesses) that must talk to this S3 via boto/MLflow."""
        return {
            "AWS_ACCESS_KEY_ID": self.KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # MLflow's S3 artifact repository reads its own variable.
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def fs(self) -> Any:
        """A fresh ``s3fs.S3FileSystem`` for this server (no instance cache shared)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.KEY,
            secret=self.SECRET,
            endpoint_url=self.endpoint_url,
            skip_instance_cache=True,
            client_kwargs={"region_name": self.REGION},
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``"s3://name"``."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.KEY,
            aws_secret_access_key=self.SECRET,
            region_name=self.REGION,
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def reset(self) -> None:
        """Drop all moto state (every bucket)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Acceptor:
    """A listening socket whose connections a daemon thread hands to :meth:`accepted` until :meth:`close`.

    A subclass sets its own attributes first: the thread starts in this ``__init__``.
    """

    def __init__(self, sock: socket.socket, name: str | None = None) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)  # how often the accept loop looks at the stop flag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=name)
        self._thread.start()

    def accepted(self, conn: socket.socket) -> None:
        """Handle one accepted connection (on the accept thread)."""
        raise NotImplementedError

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted(conn)

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class CountingListener(Acceptor):
    """A TCP listener on 127.0.0.1 that counts connection attempts (a server that must not be called)."""

    def __init__(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.connections = 0
        super().__init__(sock)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def accepted(self, conn: socket.socket) -> None:
        self.connections += 1
        conn.close()
