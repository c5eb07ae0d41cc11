"""Shared pytest fixtures: isolated local tracking stores and real loopback servers."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# MLflow decides about telemetry once, at import, before PYTEST_CURRENT_TEST exists; set
# this first so the test process never tries to reach anything beyond loopback.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import fsspec  # noqa: E402
import mlflow  # noqa: E402
import pytest  # noqa: E402

# Make `from servers import ...` / `from tests.servers import ...` both work without a
# package __init__ or pytest pythonpath config.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import FaultServer, MlflowServer, MotoS3  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's markers."""
    config.addinivalue_line("markers", "server: test needs a real `mlflow server` subprocess")


def _clear_mlflow_state() -> None:
    while mlflow.active_run():
        mlflow.end_run()
    # A stale active experiment id would point the next test at an experiment that only
    # exists in a previous test's database.
    import mlflow.tracking.fluent as fluent

    if hasattr(fluent, "_active_experiment_id"):
        fluent._active_experiment_id = None


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh ``sqlite:///<tmp_path>/mlflow.db`` store, set as env var and in MLflow.

    The test runs in ``tmp_path`` so a stray ``mlruns/`` never lands in the repo. At
    teardown active runs are ended and MLflow's tracking URI is restored.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # The private global, not get_tracking_uri(): the latter resolves defaults, and
    # restoring that would pin a URI where previously there was none.
    previous = getattr(tracking_utils, "_tracking_uri", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        _clear_mlflow_state()
        # set_tracking_uri also writes os.environ; monkeypatch (torn down after this
        # fixture) then restores MLFLOW_TRACKING_URI to its original value.
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]


@pytest.fixture
def use_uri(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``use_uri(uri)`` makes ``uri`` MLflow's tracking URI for the test; ``tracking_uri`` is restored after.

    Runs still open at the end are ended (a ``DeliveryError`` there was already checked by the test).
    """
    from mlflow_er import DeliveryError

    def use(uri: str) -> str:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return uri

    try:
        yield use
    finally:
        while mlflow.active_run():
            try:
                mlflow.end_run()
            except DeliveryError:
                pass
        mlflow.set_tracking_uri(tracking_uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real ``mlflow server`` for the whole session (started on first use)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def restartable_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A server of the test's own, free to be killed and restarted."""
    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A started :class:`FaultServer` without upstream; script it with ``.script(...)``."""
    server = FaultServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto S3 on a loopback port for the whole session."""
    server = MotoS3()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    """A new, uniquely named bucket: yields ``(s3fs filesystem, "s3://bucket")``.

    AWS/MLflow S3 env vars point at moto for this test only (monkeypatch undoes them).
    """
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    url = moto_s3.make_bucket(f"test-{uuid.uuid4().hex[:12]}")
    yield moto_s3.fs(), url


def _clear_memfs() -> None:
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")  # fsspec's initial state: the root pseudo-dir


@pytest.fixture
def memfs() -> Iterator[Any]:
    """fsspec's global ``memory://`` filesystem, emptied before and after the test."""
    _clear_memfs()
    try:
        yield fsspec.filesystem("memory")
    finally:
        _clear_memfs()


@pytest.fixture(scope="session")
def prod(tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3) -> Iterator[Any]:
    """One production-shaped server for the session: PostgreSQL + moto S3 + ``mlflow server`` (tests/pg.py)."""
    from pg import Production, require_postgres

    require_postgres()
    deployment = Production(tmp_path_factory.mktemp("prod-server"), moto_s3)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def spooled_run(use_uri: Any, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``spooled_run(n)`` logs a run of ``n`` ``loss`` metrics and a param through ``spool+<tracking_uri>``.

    The spool is ``tmp_path / "spool"``; returns ``(run_id, spool)``.
    """

    def log(n: int) -> tuple[str, Path]:
        spool = tmp_path / "spool"
        monkeypatch.setenv("MLFLOW_ER_SPOOL_DIR", str(spool))
        use_uri("spool+" + tracking_uri)
        with mlflow.start_run(run_name="spooled") as active:
            for i in range(n):
                mlflow.log_metric("loss", float(i), step=i)
            mlflow.log_param("lr", 0.1)
        return active.info.run_id, spool

    return log
