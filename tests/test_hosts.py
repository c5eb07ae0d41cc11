"""Hosts that are really apart: each "node" is its own network namespace, the server is elsewhere.

Topology (root namespace = the server room: PostgreSQL, moto S3 and ``mlflow server``, all
on loopback; a :class:`pg.TcpRelay` per link exposes exactly the services that node may reach):

=========  ======================  ==============================================================
node       link (a /30 of its own)  reaches
=========  ======================  ==============================================================
train-a    10.231.0.0/30            the tracking server only  — rank 0 of a 2-node job
train-b    10.231.0.4/30            the tracking server only  — rank 1; no folder shared with rank 0
offline    10.231.0.8/30            the object store only (a storage network): *no route* to the
                                    tracking server; spools to ``s3://`` (the offline-cluster recipe)
login      10.231.0.12/30           both: runs ``mlflow-er sync s3://… --tracking-uri …`` (cron's job)
=========  ======================  ==============================================================

No namespace has a default route, so nothing leaves the machine. Every node has its own
temp dir (cwd, ``TMPDIR``, staging). Where namespaces cannot be made (not root, no ``ip``,
no ``CAP_SYS_ADMIN``), the same nodes run as separate processes on loopback with separate
temp dirs; the no-route check then cannot be made and is said so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from pg import TcpRelay

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
MEET = ROOT / "tests" / "scripts" / "meet_worker.py"
OFFLINE = ROOT / "examples" / "offline_cluster.py"
NODES = ("train-a", "train-b", "offline", "login")
CLEAN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_RUN_ID", "MLFLOW_ER_RANK_DIR", "MLFLOW_TRACKING_URI",
              "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
              "SLURM_STEP_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "HTTP_PROXY", "HTTPS_PROXY",
              "http_proxy", "https_proxy")


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20, check=check,
                          stdin=subprocess.DEVNULL)


class Cluster:
    """Four nodes: network namespaces with one veth /30 each, or (fallback) plain processes on loopback."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = {node: f"mlfer-{tag}-{node}" for node in NODES}
        self.veth = {node: f"mfe{tag}{i}" for i, node in enumerate(NODES)}  # ≤ 15 chars, as Linux wants
        # 10.231.0.(4i)/30: .4i+1 the server room's end, .4i+2 the node's.
        self.gateway = {node: f"10.231.0.{4 * i + 1}" for i, node in enumerate(NODES)}
        self.address = {node: f"10.231.0.{4 * i + 2}" for i, node in enumerate(NODES)}
        self.made: list[str] = []
        self.relays: list[TcpRelay] = []
        self.namespaces = False
        self.why_not = ""
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def make(self) -> None:
        if os.geteuid() != 0:
            self.why_not = "not root"
        elif shutil.which("ip") is None:
            self.why_not = "no `ip` command (apt-get install -y iproute2)"
        else:
            probe = _ip("netns", "add", self.ns["train-a"], check=False)
            if probe.returncode != 0:
                self.why_not = f"`ip netns add` failed: {probe.stderr.strip()}"
            else:
                self.made.append(self.ns["train-a"])
                self.namespaces = True
        if not self.namespaces:
            warnings.warn(f"network namespaces unavailable ({self.why_not}): nodes run as separate processes on "
                          "loopback with separate temp dirs", stacklevel=2)
            return
        for node in NODES:
            ns, veth, peer = self.ns[node], self.veth[node], self.veth[node] + "p"
            if ns not in self.made:
                _ip("netns", "add", ns)
                self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("addr", "add", f"{self.gateway[node]}/30", "dev", veth)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.address[node]}/30", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")

    def expose(self, node: str, port: int) -> str:
        """Let ``node`` reach the loopback service on ``port``; returns the address:port it uses."""
        host = self.gateway[node] if self.namespaces else "127.0.0.1"
        relay = TcpRelay(host, ("127.0.0.1", port))
        self.relays.append(relay)
        return f"{relay.host}:{relay.port}"

    def argv(self, node: str, *argv: str) -> list[str]:
        """``argv`` run on ``node``."""
        return ["ip", "netns", "exec", self.ns[node], *argv] if self.namespaces else list(argv)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for relay in self.relays:
            relay.close()
        for node in NODES:
            if self.namespaces:
                _ip("link", "del", self.veth[node], check=False)  # also removes the peer in the namespace
        for ns in self.made:
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def __enter__(self) -> Cluster:
        try:
            self.make()
        except BaseException:
            self.close()  # what make() set up before it failed
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        yield c
    leftover = _ip("netns", "list", check=False).stdout if shutil.which("ip") else ""
    assert not any(ns in leftover for ns in c.ns.values()), f"namespaces left behind: {leftover}"


def node_env(tmp_path: Path, node: str, **extra: str) -> tuple[Path, dict[str, str]]:
    home = tmp_path / node
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_VARS and not k.startswith("AWS_")
           and k != "MLFLOW_S3_ENDPOINT_URL"}
    env.update(TMPDIR=str(home), MLFLOW_ER_STAGING_DIR=str(home / "staging"), MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", MLFLOW_ER_RANK_TIMEOUT="60", **extra)
    return home, env


def spawn(cluster: Cluster, node: str, home: Path, env: dict[str, str], *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cluster.argv(node, *argv), cwd=home, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[str], what: str, timeout: float = 90) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{err[-3000:]}"
    return out


@pytest.mark.timeout(240)  # + the session server's start, charged to the first user
def test_training_nodes_offline_node_and_login_node(prod: Any, cluster: Cluster, tmp_path: Path) -> None:
    server_port = int(prod.uri.rsplit(":", 1)[1])
    s3_port = int(prod.s3.endpoint_url.rsplit(":", 1)[1])
    server = {node: cluster.expose(node, server_port) for node in ("train-a", "train-b", "login")}
    store = {node: cluster.expose(node, s3_port) for node in ("offline", "login")}
    s3_env = {"AWS_ACCESS_KEY_ID": prod.s3.KEY, "AWS_SECRET_ACCESS_KEY": prod.s3.SECRET,
              "AWS_DEFAULT_REGION": prod.s3.REGION}
    spool_url = f"s3://{prod.bucket}/hosts-{tmp_path.name}/mlflow-er"
    job = {"TORCHELASTIC_RUN_ID": f"hosts-{tmp_path.name}", "MASTER_ADDR": "train-a", "MASTER_PORT": "29500"}

    if cluster.namespaces:  # the offline node really has no way to the tracking server
        gw = cluster.gateway["train-a"]
        probe = subprocess.run(cluster.argv("offline", sys.executable, "-c", (
            "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
            "except OSError as e:\n print(type(e).__name__, e.errno)\nelse:\n print('connected')"),
            gw, server["train-a"].rsplit(":", 1)[1]), capture_output=True, text=True, timeout=30)
        assert probe.stdout.startswith("OSError 101"), probe  # ENETUNREACH: no route at all

    procs: dict[str, subprocess.Popen[str]] = {}
    cluster.procs = procs  # killed at teardown if still running, before the namespaces go
    for rank, node in enumerate(("train-a", "train-b")):
        home, env = node_env(tmp_path, node, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", **job)
        procs[node] = spawn(cluster, node, home, env, sys.executable, str(MEET), f"http://{server[node]}", "300")
    home, env = node_env(tmp_path, "offline", **s3_env)
    procs["offline"] = spawn(cluster, "offline", home, env, sys.executable, str(OFFLINE), "--upload-url", spool_url,
                             "--endpoint-url", f"http://{store['offline']}", "--spool-dir", str(home / "spool"),
                             "--run-name", "offline-node", "--steps", "400", "--experiment", "hosts-offline")
    outputs = {node: finish(proc, node) for node, proc in procs.items()}
    ranks = [json.loads(outputs[n].strip().splitlines()[-1]) for n in ("train-a", "train-b")]
    [rid] = {r["run_id"] for r in ranks}
    assert prod.metric_rows(rid) == {"loss/rank0": (300, 300), "loss/rank1": (300, 300)}
    assert "0 pending" in outputs["offline"]
    assert MlflowClient(prod.uri).get_experiment_by_name("hosts-offline") is None  # nothing reached the server yet

    def sync() -> dict[str, Any]:
        home, env = node_env(tmp_path, f"login-{uuid.uuid4().hex[:4]}", **s3_env)
        proc = spawn(cluster, "login", home, env, sys.executable, "-c",
                     "import sys; from mlflow_er.cli import main; sys.exit(main())", "sync", spool_url,
                     "--tracking-uri", f"http://{server['login']}", "-o", f"endpoint_url=http://{store['login']}",
                     "--json", "--no-progress")
        out = finish(proc, "mlflow-er sync on the login node")
        # MLflow's end_run prints "View run ..." lines on stdout before the JSON document.
        return json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)

    first = sync()
    # 3 params + 400 loss values + 1 tag + 1 artifact + the run's start and end
    assert first["records"] == 407 and len(first["runs_created"]) == 1 and first["failed"] == [] == first["gaps"]
    second = sync()  # the next cron round: nothing new
    assert second["records"] == 0 and second["runs_created"] == [] and second["artifacts"] == 0, second
    client = MlflowClient(prod.uri)
    [offline_run] = client.search_runs([client.get_experiment_by_name("hosts-offline").experiment_id])
    assert prod.metric_rows(offline_run.info.run_id) == {"loss": (400, 400)}
    assert offline_run.info.status == "FINISHED" and offline_run.data.tags["phase"] == "done"
    # The synced artifact went through the server into S3.
    exp_id = offline_run.info.experiment_id
    key = f"{prod.bucket}/mlflow/{exp_id}/{offline_run.info.run_id}/artifacts/config.json"
    assert json.loads(prod.s3.fs().cat_file(key)) == {"model": "tiny", "layers": 2}
