"""The start-up probe (issue 10 item 9, issue 13 item 4): connect as MLflow does, say what to do.

Each failure is told apart — refused, timeout, DNS, TLS — and its message names the URL
(without the password) and the next step. Loopback only: the DNS failure is produced by a
patched resolver, never by a query leaving the machine.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import CountingListener, FaultServer, free_port

from mlflow_er.errors import TrackingUnavailable
from mlflow_er.probe import classify, normalize_tracking_uri, probe_server

pytestmark = pytest.mark.timeout(30)

SECRET = "pr0be-s3cret"
OFFLINE = 'sinks=["spool"]'


def _with_creds(uri: str, user: str = "alice", password: str = SECRET) -> str:
    return uri.replace("://", f"://{user}:{password}@", 1)


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """Accepts TCP connections (the kernel does) and never answers a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock
    finally:
        sock.close()


def _fails(uri: str, timeout: float = 5.0) -> TrackingUnavailable:
    with pytest.raises(TrackingUnavailable) as info:
        probe_server(uri, timeout=timeout)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    return info.value


def test_credentials_in_the_uri_reach_a_live_server_as_basic_auth(fault_server: FaultServer) -> None:
    # The old urllib probe took "alice:pw@127.0.0.1" for a host name: "Name or service not known".
    probe_server(_with_creds(fault_server.uri))
    (health,) = fault_server.requests_to("/health")
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert health.headers.get("Authorization") == expected


def test_mlflow_tracking_username_password_are_used(fault_server: FaultServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    probe_server(fault_server.uri)
    (health,) = fault_server.requests_to("/health")
    assert health.headers.get("Authorization") == "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()


def test_any_http_answer_means_reachable_and_redirects_are_not_followed(fault_server: FaultServer) -> None:
    from servers import Reply

    fault_server.script(Reply(status=401, body="login required"), Reply(mode="login-redirect"))
    probe_server(fault_server.uri)
    probe_server(fault_server.uri)
    assert fault_server.requests_to("/login") == []


def test_connection_refused_says_start_a_server_or_log_offline() -> None:
    port = free_port()
    exc = _fails(_with_creds(f"http://127.0.0.1:{port}"))
    assert exc.kind == "refused"
    text = str(exc)
    assert f"http://***@127.0.0.1:{port}" in text and "connection refused" in text
    assert f"`mlflow server --host 127.0.0.1 --port {port}`" in text and OFFLINE in text


def test_server_that_never_answers_is_a_timeout_with_its_next_step(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    exc = _fails(_with_creds(f"http://127.0.0.1:{port}"), timeout=1.0)
    assert exc.kind == "timeout"
    text = str(exc)
    assert f"http://***@127.0.0.1:{port}" in text and "no answer within 1s" in text
    assert "/health" in text and OFFLINE in text


@pytest.fixture
def unresolvable(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name the (patched) resolver does not know; every other name resolves as usual."""
    name = "mlflow.internal.example"
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == name:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return name


def test_unknown_host_name_says_check_the_host_name(unresolvable: str) -> None:
    exc = _fails(_with_creds(f"http://{unresolvable}:5000"))
    assert exc.kind == "dns"
    text = str(exc)
    assert f"http://***@{unresolvable}:5000" in text and repr(unresolvable) in text
    assert "Check the host name" in text and OFFLINE in text


def test_a_hanging_name_lookup_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = socket.getaddrinfo

    def slow(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "slow.example":
            release.wait(20)  # a resolver that never answers (requests' timeout does not cover it)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")  # never a real query
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        exc = _fails("http://slow.example:5000", timeout=0.5)
    finally:
        release.set()
    assert exc.kind == "timeout"


def test_tls_to_a_plain_http_server_says_use_http(fault_server: FaultServer) -> None:
    uri = _with_creds(fault_server.uri.replace("http://", "https://"))
    exc = _fails(uri)
    assert exc.kind == "tls"
    text = str(exc)
    assert "TLS handshake failed" in text and "use http://" in text
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in text and OFFLINE in text


def test_classify_reads_the_cause_chain() -> None:
    def chained(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise RuntimeError("API request to http://h failed with exception ...") from e
        except RuntimeError as outer:
            return outer

    assert classify(chained(ConnectionRefusedError(111, "Connection refused"))) == "refused"
    assert classify(chained(socket.gaierror(-2, "Name or service not known"))) == "dns"
    assert classify(chained(TimeoutError("timed out"))) == "timeout"
    assert classify(chained(ValueError("something else"))) == "error"


def test_normalize_checks_local_paths_and_probes_only_when_asked(tmp_path: Path) -> None:
    assert normalize_tracking_uri(None) is None
    assert normalize_tracking_uri(str(tmp_path)) == tmp_path.resolve().as_uri()
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        normalize_tracking_uri(str(tmp_path / "nope"))
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        normalize_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    listener = CountingListener()
    try:
        assert normalize_tracking_uri(listener.uri, probe=False) == listener.uri
        time.sleep(0.3)  # let an (unexpected) connection be counted
        assert listener.connections == 0
    finally:
        listener.close()


@pytest.mark.parametrize("uri, suggestion", [
    (f"htp://alice:{SECRET}@127.0.0.1:5000", "did you mean http://?"),
    ("threaded+htps://127.0.0.1:5000", "did you mean https://?"),
    ("sqllite:///mlflow.db", "did you mean sqlite://?"),
])
def test_unknown_scheme_is_one_line_with_a_suggestion(uri: str, suggestion: str) -> None:
    with pytest.raises(TrackingUnavailable) as info:
        normalize_tracking_uri(uri)
    text = str(info.value)
    assert info.value.kind == "scheme" and "\n" not in text
    assert "unknown scheme" in text and suggestion in text and SECRET not in text


@pytest.mark.parametrize("uri", ["postgresql+psycopg2://u@127.0.0.1/db", "threaded+sqlite:///x.db",
                                 "databricks", "mysql://u@127.0.0.1/db"])
def test_known_schemes_pass_the_scheme_check(uri: str) -> None:
    from mlflow_er.probe import check_scheme

    check_scheme(uri)
