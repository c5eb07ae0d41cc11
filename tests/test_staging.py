"""Artifact staging and inputs (issue 10 items 6, 14 and 19).

* the staging folder is this user's own (0700, owner checked), refused otherwise;
* a FIFO, socket or device given to ``log_artifact(s)`` is refused before anything opens it;
* a failed ``log_dict``/``log_image`` leaves no staging folder; a complex image is refused.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from mlflow_er import ExperimentTracker, artifacts
from mlflow_er.artifacts import StagingUnsafe, staging_root
from mlflow_er.errors import InvalidRecord
from mlflow_er.testing import prefill_sqlite_store


@pytest.fixture
def store(tracking_uri: str) -> str:
    """A fresh SQLite store copied from a migrated template (no second of migrations per test)."""
    return prefill_sqlite_store(tracking_uri)


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "staging"
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(root))
    return root


# -- item 6: staging is per user and checked ----------------------------------------------------
def test_default_staging_is_per_user_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ER_STAGING_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    old = os.umask(0)  # a umask of 0 must not open it up
    try:
        root = staging_root()
    finally:
        os.umask(old)
    assert root.parent == tmp_path and root.name == f"mlflow-er-staging-{os.geteuid()}"
    st = os.lstat(root)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert staging_root() == root  # an existing private folder is reused


def test_staging_created_0700_whatever_the_umask(staging: Path) -> None:
    old = os.umask(0)
    try:
        staging_root()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(staging).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o777, 0o701])
def test_staging_open_to_others_is_refused(staging: Path, mode: int) -> None:
    staging.mkdir()
    os.chmod(staging, mode)
    with pytest.raises(StagingUnsafe, match=f"mode {mode:04o}.*chmod 700"):
        staging_root()


def test_staging_owned_by_another_user_is_refused(staging: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    staging.mkdir(mode=0o700)
    os.chown(staging, nobody, -1)
    with pytest.raises(StagingUnsafe, match=f"belongs to nobody \\(uid {nobody}\\).*swap"):
        staging_root()


def test_staging_symlink_is_refused(staging: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o700)
    staging.symlink_to(elsewhere)
    with pytest.raises(StagingUnsafe, match="symlink"):
        staging_root()


def test_the_old_shared_default_planted_by_another_user_is_not_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The attack of issue 10: another user creates <tmp>/mlflow-er-staging first, world-writable.
    monkeypatch.delenv("MLFLOW_ER_STAGING_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    planted = tmp_path / "mlflow-er-staging"
    planted.mkdir()
    os.chmod(planted, 0o777)
    src = tmp_path / "model.bin"
    src.write_bytes(b"REAL WEIGHTS")
    snap, *_ = artifacts.snapshot(src)
    try:
        assert not Path(snap).is_relative_to(planted)
        assert stat.S_IMODE(os.lstat(Path(snap).parent.parent).st_mode) == 0o700
    finally:
        artifacts.discard(snap)


def test_log_artifact_into_unsafe_staging_raises_a_clear_error(store: str, staging: Path,
                                                               tmp_path: Path) -> None:
    staging.mkdir()
    os.chmod(staging, 0o777)
    src = tmp_path / "a.txt"
    src.write_text("x")
    tracker = ExperimentTracker("staging-unsafe", backend="threaded", close_timeout=30)
    with tracker.run(run_name="r") as run:
        with pytest.raises(StagingUnsafe, match="MLFLOW_ER_STAGING_DIR"):
            run.log_artifact(src)


# -- item 14: FIFO, socket, device ---------------------------------------------------------------
def _call_bounded(fn, *args) -> BaseException | None:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread; fail the test (not hang it) if it blocks."""
    out: dict[str, BaseException | None] = {}

    def target() -> None:
        try:
            fn(*args)
            out["exc"] = None
        except BaseException as exc:
            out["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        # Unblock the thread stuck in open() on the FIFO so it does not linger.
        for a in args:
            if isinstance(a, (str, Path)) and stat.S_ISFIFO(os.stat(a).st_mode):
                fd = os.open(a, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
        pytest.fail(f"{fn.__name__}{args} blocked for 10 s")
    return out["exc"]


@pytest.fixture
def special_files(tmp_path: Path):  # type: ignore[no-untyped-def]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    try:
        yield {"fifo": fifo, "socket": sock_path, "device": Path("/dev/null")}
    finally:
        sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["sync", "threaded"])
def test_log_artifact_on_a_special_file_is_refused_at_once(store: str, staging: Path, special_files: dict,
                                                           backend: str) -> None:
    tracker = ExperimentTracker(f"special-{backend}", backend=backend, close_timeout=30)
    with tracker.run(run_name="r") as run:
        for kind, words in [("fifo", "named pipe"), ("socket", "socket"), ("device", "character device")]:
            exc = _call_bounded(run.log_artifact, special_files[kind])
            assert isinstance(exc, InvalidRecord), (kind, repr(exc))
            assert words in str(exc) and str(special_files[kind]) in str(exc)
        assert run.stats().get("failed", 0) == 0


@pytest.mark.timeout(60)
def test_log_artifacts_on_a_folder_holding_a_fifo_is_refused(store: str, staging: Path,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.txt").write_text("fine")
    os.mkfifo(folder / "sub" / "pipe")
    (folder / "zero").symlink_to("/dev/zero")  # a copy that follows it would never end
    tracker = ExperimentTracker("special-dir", backend="threaded", close_timeout=30)
    with tracker.run(run_name="r") as run:
        exc = _call_bounded(run.log_artifacts, folder)
        assert isinstance(exc, InvalidRecord), repr(exc)
        assert "inside" in str(exc)
    assert not staging.exists() or list(staging.iterdir()) == []


# -- item 19: failed renders leave nothing, complex images refused ---------------------------------
def test_failed_renders_leave_no_staging_folder(staging: Path) -> None:
    for _ in range(20):
        with pytest.raises(InvalidRecord):
            artifacts.render("json", {"x": object()}, "d.json")
        with pytest.raises(ValueError, match="extension"):  # PIL knows no such format
            artifacts.render("image", np.zeros((2, 2), dtype=np.uint8), "i.notanimage")
    assert list(staging.iterdir()) == []


@pytest.mark.timeout(60)
def test_log_dict_that_cannot_be_serialised_raises_at_the_call_and_stages_nothing(
        store: str, staging: Path) -> None:
    tracker = ExperimentTracker("log-dict-bad", backend="threaded", close_timeout=30)
    with tracker.run(run_name="r") as run:
        for _ in range(20):
            with pytest.raises(InvalidRecord, match="'cfg.json'.*not JSON serializable"):
                run.log_dict({"when": {1, 2}}, "cfg.json")
        run.log_dict({"lr": 0.1}, "good.yaml")
        run.flush(timeout=30)
        assert run.stats()["failed"] == 0
    assert list(staging.iterdir()) == []
    from mlflow import MlflowClient

    assert [f.path for f in MlflowClient(store).list_artifacts(run.run_id)] == ["good.yaml"]


def test_image_that_is_not_bool_int_or_float_is_refused_at_the_call(store: str, staging: Path) -> None:
    tracker = ExperimentTracker("log-image-bad", backend="threaded", close_timeout=30)
    with tracker.run(run_name="r") as run:
        for image in [np.zeros((4, 4), dtype=np.complex128) + 1j, np.array([["a", "b"], ["c", "d"]]),
                      np.zeros((2, 2), dtype=object)]:
            with pytest.raises(InvalidRecord, match=f"dtype {image.dtype}"):
                run.log_image(image, "img.png")
        run.flush(timeout=30)
        assert run.stats()["failed"] == 0
    assert not staging.exists() or list(staging.iterdir()) == []
