"""Every error a new user meets first names the thing and the fix (issue 13)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import free_port

from mlflow_er import ExperimentTracker, InvalidRecord, TrackingUnavailable
from mlflow_er import tracker as tracker_module
from mlflow_er.options import UnknownOption
from mlflow_er.testing import prefill_sqlite_store

pytestmark = pytest.mark.timeout(60)


def test_refused_connection_says_nothing_listens_and_how_to_start_a_server_or_go_offline() -> None:
    port = free_port()
    with pytest.raises(TrackingUnavailable) as info:
        ExperimentTracker("x", tracking_uri=f"http://127.0.0.1:{port}")
    msg = str(info.value)
    assert "connection refused" in msg and f"127.0.0.1:{port}" in msg
    assert f"mlflow server --host 127.0.0.1 --port {port}" in msg
    assert 'sinks=["spool"]' in msg and "mlflow-er sync" in msg


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the handshake but where nothing ever answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_timeout_is_told_apart_from_refused(silent_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracker_module, "PROBE_TIMEOUT", 0.5)
    with pytest.raises(TrackingUnavailable) as info:
        ExperimentTracker("x", tracking_uri=f"http://127.0.0.1:{silent_port}")
    msg = str(info.value)
    assert "(timed out)" in msg and "refused" not in msg
    assert "firewall" in msg and 'sinks=["spool"]' in msg


def test_a_host_name_that_does_not_resolve_says_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*_args: object, **_kw: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # never ask a real resolver: loopback only
    with pytest.raises(TrackingUnavailable) as info:
        ExperimentTracker("x", tracking_uri="http://mlfow.example:5000")
    msg = str(info.value)
    assert "'mlfow.example' cannot be resolved (DNS)" in msg and "Check the host name" in msg


def test_a_typo_in_the_uri_scheme_is_one_line_naming_the_scheme() -> None:
    with pytest.raises(TrackingUnavailable) as info:
        ExperimentTracker("x", tracking_uri="htp://127.0.0.1:5000")
    msg = str(info.value)
    assert "\n" not in msg
    assert "unknown scheme 'htp'" in msg and "did you mean http://?" in msg and "threaded+" in msg


def test_unknown_backend_option_names_the_valid_ones(tracking_uri: str) -> None:
    prefill_sqlite_store(tracking_uri)
    with pytest.raises(UnknownOption) as info:
        ExperimentTracker("x", tracking_uri=tracking_uri, backend="threaded", backend_options={"max_qeue": 10})
    msg = str(info.value)
    assert isinstance(info.value, TypeError)  # what a raw constructor call raised before
    assert "backend 'threaded'" in msg and "'max_qeue' (did you mean 'max_queue'?)" in msg
    assert "on_full" in msg and "flush_interval" in msg


@pytest.mark.parametrize(("sink", "key", "expected"), [("spool", "pth", "'path'"),
                                                       ("mlflow", "request_timout", "'request_timeout'")])
def test_unknown_sink_option_names_the_valid_ones(tracking_uri: str, sink: str, key: str,
                                                  expected: str) -> None:
    prefill_sqlite_store(tracking_uri)
    with pytest.raises(UnknownOption) as info:
        ExperimentTracker("x", tracking_uri=tracking_uri, sinks=[sink], sink_options={sink: {key: 1}})
    msg = str(info.value)
    assert f"sink {sink!r} takes no option {key!r} (did you mean {expected}?)" in msg
    assert "valid options:" in msg


def test_options_for_a_sink_the_tracker_does_not_use_are_refused(tracking_uri: str) -> None:
    prefill_sqlite_store(tracking_uri)
    with pytest.raises(UnknownOption) as info:
        ExperimentTracker("x", tracking_uri=tracking_uri, sinks=["spool", "mlflow"],
                          sink_options={"spol": {"path": "x"}})
    assert "'spol' is not one of this tracker's sinks" in str(info.value)
    assert "did you mean 'spool'?" in str(info.value)


def test_run_without_with_raises_a_type_error_showing_the_with_form(tmp_path: Path) -> None:
    tracker = ExperimentTracker("x", sinks=["spool"], sink_options={"spool": {"path": tmp_path}})
    with pytest.raises(TypeError) as info:
        tracker.run(run_name="r").log_metric("loss", 1.0)
    msg = str(info.value)
    assert "'log_metric'" in msg and "with tracker.run(run_name='r') as run:" in msg
    with pytest.raises(TypeError, match="with tracker.run"):
        _ = tracker.run().run_id


def test_param_conflict_after_resume_says_it_was_resumed_and_how_to_start_new(tracking_uri: str) -> None:
    prefill_sqlite_store(tracking_uri)
    tracker = ExperimentTracker("x", tracking_uri=tracking_uri)
    with tracker.run(run_name="baseline") as run:
        run.log_param("lr", 0.001)
    with pytest.raises(InvalidRecord) as info:
        with tracker.run(run_name="baseline") as again:
            again.log_param("lr", 0.01)
    msg = str(info.value)
    assert "already logged as '0.001'" in msg
    assert f"this run ({run.run_id}) was resumed, found by its name 'baseline'" in msg
    assert "tracker.run(run_name='baseline', resume=False)" in msg
