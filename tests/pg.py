"""A production-shaped tracking server for tests: real PostgreSQL + moto S3 + ``mlflow server``.

* :class:`PostgresServer` ``initdb``s a throwaway cluster with Debian's PostgreSQL binaries
  (``/usr/lib/postgresql/<v>/bin``) in a temp dir and runs it with ``pg_ctl`` on a free
  127.0.0.1 port. PostgreSQL refuses to run as root (CI runs as root), so as root every
  PostgreSQL command runs as an unprivileged user (``nobody`` unless
  ``$MLFLOW_ER_PG_USER``) through ``runuser``, with the cluster in a folder owned by it.
* :class:`PgMlflowServer` is :class:`servers.MlflowServer` with
  ``--backend-store-uri postgresql+psycopg://…`` and ``--artifacts-destination s3://…``
  on moto, ``--serve-artifacts``.
* :class:`TcpRelay` forwards a TCP port on one address (a veth address of a test
  namespace) to a loopback port, so "hosts" in network namespaces reach the one server.

Everything binds to 127.0.0.1 (or a veth address the test itself made); every wait is bounded.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from servers import HOST, Acceptor, MlflowServer, MotoS3, _tail, free_port

PG_GLOB = "/usr/lib/postgresql/*/bin/initdb"


def pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` folder with ``initdb``, else ``None``."""
    found = sorted(glob.glob(PG_GLOB), key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port (trust auth, loopback only)."""

    def __init__(self, bindir: Path | None = None, port: int | None = None, user: str | None = None,
                 max_connections: int = 200) -> None:
        found = bindir or pg_bindir()
        if found is None:
            raise RuntimeError(f"no PostgreSQL server binaries ({PG_GLOB}); on Debian: apt-get install -y postgresql")
        self.bindir = found
        self.port = port or free_port()
        self.max_connections = max_connections
        self.as_root = os.geteuid() == 0
        self.user = (user or os.environ.get("MLFLOW_ER_PG_USER") or "nobody") if self.as_root else None
        # Not under pytest's tmp dirs: those are 0700 root, which the postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="mlflow-er-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._started = False

    def _cmd(self, *argv: str) -> list[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user is not None else []
        return [*prefix, *argv]

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(self._cmd(*argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}\n{_tail(self.log_path)}")

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """``initdb`` (first time) and ``pg_ctl start -w``; returns once it accepts connections."""
        if not (self.data / "PG_VERSION").exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
        # fsync=off: a test cluster, durability across an OS crash is not what is tested.
        opts = (f"-p {self.port} -c listen_addresses={HOST} -c unix_socket_directories={self.data} "
                f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                f"-c max_connections={self.max_connections}")
        self._run(str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log_path),
                  "-o", opts, "-w", "-t", str(int(timeout)), timeout=timeout + 10)
        self._started = True
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """``pg_ctl stop -m fast``; the cluster folder is removed."""
        if self._started:
            try:
                self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w",
                          "-t", str(int(timeout)), timeout=timeout + 10)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate", "-w")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL of ``database`` (``postgresql+psycopg://postgres@127.0.0.1:PORT/db``)."""
        return f"{driver}://postgres@{HOST}:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        """A psycopg connection (autocommit) to ``database``."""
        import psycopg

        return psycopg.connect(host=HOST, port=self.port, user="postgres", dbname=database, autocommit=True,
                               connect_timeout=10)

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its SQLAlchemy URL."""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` run in ``database``."""
        with self.connect(database) as conn:
            return list(conn.execute(sql, params).fetchall())

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PgMlflowServer(MlflowServer):
    """``mlflow server`` on a PostgreSQL database with S3 (moto) artifacts, served through the server."""

    def __init__(self, workdir: Path, db_url: str, s3: MotoS3, artifacts: str, port: int | None = None,
                 workers: int = 1) -> None:
        super().__init__(workdir, port)
        self.db_uri = db_url
        self.s3 = s3
        self.artifacts = artifacts
        self.workers = workers

    def command(self) -> list[str]:
        """The argv: PostgreSQL store, ``s3://`` artifacts destination, proxied artifacts."""
        argv = super().command()
        argv[argv.index("--artifacts-destination") + 1] = self.artifacts
        argv[argv.index("--workers") + 1] = str(self.workers)
        return argv

    def _env(self) -> dict[str, str]:
        return {**super()._env(), **self.s3.env()}


class TcpRelay(Acceptor):
    """Listen on ``(host, port)`` and pipe each connection to ``target`` (a loopback server).

    Lets processes in a test network namespace reach a server that binds only loopback:
    the relay listens on the namespace-facing veth address the test assigned, nothing else.
    """

    def __init__(self, host: str, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        sock = socket.create_server((host, port))
        self.host, self.port = sock.getsockname()[:2]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        super().__init__(sock, name=f"relay-{self.host}")

    @property
    def uri(self) -> str:
        """``http://HOST:PORT`` of the relay."""
        return f"http://{self.host}:{self.port}"

    def accepted(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._conns += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting and cut every open connection."""
        super().close()
        with self._lock:
            for s in self._conns:
                s.close()


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``pred()`` until true, else ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


class Production:
    """PostgreSQL + moto S3 + ``mlflow server`` on both, as one deployment would run them."""

    DATABASE = "mlflow"

    def __init__(self, workdir: Path, s3: MotoS3, workers: int = 1) -> None:
        self.s3 = s3
        self.pg = PostgresServer()
        self.bucket = f"mlflow-er-prod-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.artifacts = f"s3://{self.bucket}/mlflow"
        self.server: PgMlflowServer | None = None
        self.workdir = Path(workdir)
        self.workers = workers

    def start(self) -> Production:
        """PostgreSQL first, then the bucket, then the server (its first start migrates the schema)."""
        self.pg.start()
        db_url = self.pg.create_database(self.DATABASE)
        self.s3.make_bucket(self.bucket)
        self.server = PgMlflowServer(self.workdir, db_url, self.s3, self.artifacts, workers=self.workers)
        self.server.start(timeout=120)
        return self

    def stop(self) -> None:
        """Server, then PostgreSQL (each stopped even if the other fails)."""
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            self.pg.stop()

    @property
    def uri(self) -> str:
        """The tracking server's ``http://127.0.0.1:PORT``."""
        assert self.server is not None
        return self.server.uri

    def db_uri(self, driver: str = "postgresql") -> str:
        """The server's database as a URI for a direct store (``postgresql://`` = SQLAlchemy's psycopg2)."""
        return self.pg.url(self.DATABASE, driver)

    def sql(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` in the server's database: the ground truth tests count against."""
        return self.pg.query(self.DATABASE, sql, *params)

    def metric_rows(self, run_id: str) -> dict[str, tuple[int, int]]:
        """Per metric key of the run: (rows stored, distinct steps) straight from PostgreSQL."""
        rows = self.sql("SELECT key, count(*), count(DISTINCT step) FROM metrics WHERE run_uuid = %s GROUP BY key",
                        run_id)
        return {key: (int(n), int(steps)) for key, n, steps in rows}


def require_postgres() -> None:
    """Skip (developer machine) or fail (CI) when PostgreSQL's server binaries or psycopg are missing."""
    import pytest

    missing = []
    if pg_bindir() is None:
        missing.append(f"PostgreSQL server binaries ({PG_GLOB}; Debian: apt-get install -y postgresql)")
    for module in ("psycopg", "psycopg2"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the {module} module (pip install -e '.[test]')")
    if missing:
        why = "the production-shaped server needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(why + " — .ci/run installs them on a fresh machine", pytrace=False)
        pytest.skip(why)
