"""The original helper's second example: a PyTorch model's round trip through MLflow.

Against a local ``mlflow server`` (started here on a free 127.0.0.1 port, SQLite store and
artifacts in a temporary folder, stopped at the end — or any server given with
``--tracking-uri``), with the ``threaded`` backend:

1. inside ``tracker.run(run_name=...)``: train a small model for a few epochs, logging the
   loss per epoch, the hyper-parameters, a checkpoint file (``run.log_artifact``) and the
   model itself (``mlflow.pytorch.log_model``);
2. find the run again by name with ``tracker.find_run(run_name=...)``;
3. load the model back with ``mlflow.pytorch.load_model`` and check its weights equal the
   trained ones.

    python examples/pytorch_model.py
    python examples/pytorch_model.py --tracking-uri http://127.0.0.1:5000

Needs ``torch`` (``pip install 'torch==2.13.0'``, or the ``integrations`` extra).
"""

from __future__ import annotations

import argparse
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from torch import nn

from mlflow_er import ExperimentTracker

EXPERIMENT = "pytorch-model-example"
HOST = "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=None,
                   help="an MLflow server to use (default: start a local one on a free 127.0.0.1 port)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    p.add_argument("--run-name", default=None, help="run name (default: a new unique one)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the local server's SQLite store and artifacts, kept afterwards "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--server-timeout", type=float, default=90.0,
                   help="seconds to wait for the local server to answer /health (default: 90)")
    return p.parse_args(argv)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1.0) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def local_server(timeout: float, workdir: Path | None = None) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 (SQLite + served artifacts in ``workdir``); yield its URI.

    Waits at most ``timeout`` s for it to answer ``/health``. Without ``workdir`` a temporary
    folder is used and removed afterwards; the server is stopped on the way out.
    """
    keep = workdir is not None
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mlflow-er-pytorch-example-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"), "--serve-artifacts", "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true")
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not read the client's settings
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        # Own process group, so stopping it also stops uvicorn's worker.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=workdir, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
                raise RuntimeError(f"mlflow server on {uri} did not come up within {timeout:.0f}s "
                                   f"(exit code {proc.poll()}); its log ends with:\n{tail}")
            time.sleep(0.2)
        print(f"started mlflow server at {uri} (store in {workdir})")
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # the worker may outlive the leader: end the whole group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"stopped mlflow server at {uri}")


def make_model() -> nn.Module:
    """A small regression network."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def round_trip(tracking_uri: str, epochs: int, run_name: str) -> int:
    """Train, log, find, load, compare; 0 when the loaded weights equal the trained ones."""
    print(f"tracking URI: {tracking_uri}")
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(256, 1)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()

    tracker = ExperimentTracker(EXPERIMENT, tracking_uri=tracking_uri, backend="threaded")
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-er-pytorch-ckpt-"))
    try:
        with tracker.run(run_name=run_name, description="PyTorch model round trip") as run:
            run.log_params({"lr": 0.05, "epochs": epochs, "hidden": 16})
            for epoch in range(epochs):
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                run.log_metric("train_loss", loss.item(), step=epoch)  # returns at once
            # A new file per checkpoint: the threaded backend snapshots it at this call.
            checkpoint = tmp / "checkpoint.pt"
            torch.save({"epoch": epochs, "state_dict": model.state_dict()}, checkpoint)
            run.log_artifact(checkpoint, artifact_path="checkpoints")
            # A fluent MLflow call: the tracker's run is MLflow's active run.
            # pip_requirements given: skips MLflow's requirement inference (a child process
            # that re-imports torch, seconds on a small machine).
            info = mlflow.pytorch.log_model(model, name="model", input_example=x[:2].numpy(),
                                            pip_requirements=[f"torch=={torch.__version__}"])
            print(f"logged {epochs} epochs of train_loss, a checkpoint and the model {info.model_uri}")
        stats = run.stats()
        print(f"run ended: {run.info.status}; stats: delivered={stats['delivered']} "
              f"failed={stats['failed']} dropped={stats['dropped_total']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    found_name, run_id = tracker.find_run(run_name=run_name)
    if run_id != run.run_id:
        print(f"error: find_run(run_name={run_name!r}) returned {run_id!r}, expected {run.run_id!r}", file=sys.stderr)
        return 1
    print(f"found run {found_name!r}: {run_id}")

    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    trained, restored = model.state_dict(), loaded.state_dict()
    same = trained.keys() == restored.keys() and all(torch.equal(trained[k], restored[k]) for k in trained)
    print(f"loaded model from runs:/{run_id}/model: {len(restored)} tensors, weights equal: {same}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output readable
    run_name = args.run_name or f"pytorch-{uuid.uuid4().hex[:8]}"
    if args.tracking_uri:
        return round_trip(args.tracking_uri, args.epochs, run_name)
    with local_server(args.server_timeout, args.workdir) as uri:
        return round_trip(uri, args.epochs, run_name)


if __name__ == "__main__":
    sys.exit(main())
