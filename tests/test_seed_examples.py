"""The original helper's second example, ``examples/pytorch_model.py``, runs end to end.

It starts its own ``mlflow server`` on 127.0.0.1, logs a PyTorch model, a checkpoint and
metrics through the threaded backend, finds the run by name, loads the model back and
compares the weights, then stops the server. The test keeps the server's store
(``--workdir``) and checks what landed in it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # the `integrations` extra (torch==2.13.0), which `dev` includes
from mlflow import MlflowClient
from servers import port_is_free

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pytorch_model.py"
EPOCHS = 3


@pytest.mark.timeout(180)
def test_pytorch_model_round_trip_against_its_own_server(tmp_path: Path) -> None:
    workdir = tmp_path / "server"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               MLFLOW_ER_STAGING_DIR=str(tmp_path / "staging"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ER_BACKEND", "MLFLOW_ER_SINKS"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", str(EPOCHS), "--run-name", "torch-round-trip",
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=170, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"

    # What it says it did, in order: server up, logged, run ended clean, found, loaded equal, server down.
    started = re.search(r"^started mlflow server at (http://127\.0\.0\.1:(\d+))", out, re.M)
    assert started, out
    port = int(started.group(2))
    lines = [
        rf"^logged {EPOCHS} epochs of train_loss, a checkpoint and the model models:/m-[0-9a-f]+$",
        r"^run ended: FINISHED; stats: delivered=\d+ failed=0 dropped=0$",
        r"^found run 'torch-round-trip': ([0-9a-f]{32})$",
        r"^loaded model from runs:/[0-9a-f]{32}/model: 4 tensors, weights equal: True$",
        rf"^stopped mlflow server at {re.escape(started.group(1))}$",
    ]
    pos = started.end()
    for pattern in lines:
        m = re.compile(pattern, re.M).search(out, pos)
        assert m, f"{pattern!r} not found after offset {pos} in:\n{out}"
        pos = m.end()
    run_id = re.search(lines[2], out, re.M).group(1)  # type: ignore[union-attr]
    assert port_is_free(port), "the example left its mlflow server running"

    # The store the server wrote: the run, its params and per-epoch metric ...
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "torch-round-trip"
    assert run.data.params == {"lr": "0.05", "epochs": str(EPOCHS), "hidden": "16"}
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert losses[-1] < losses[0]  # it trained

    # ... the checkpoint (run.log_artifact, uploaded by the background uploader) ...
    run_artifacts = workdir / "artifacts" / run.info.experiment_id / run_id / "artifacts"
    checkpoint = run_artifacts / "checkpoints" / "checkpoint.pt"
    assert checkpoint.is_file(), sorted(str(p) for p in workdir.rglob("*"))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == EPOCHS

    # ... and the model (mlflow.pytorch.log_model): a logged model of this run, whose weights
    # are the checkpoint's.
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_id)]
    model_dir = workdir / "artifacts" / run.info.experiment_id / "models" / models[0].model_id / "artifacts"
    assert (model_dir / "MLmodel").is_file(), sorted(str(p) for p in workdir.rglob("*"))
    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model(str(model_dir))
    restored = loaded.state_dict()
    assert restored.keys() == saved["state_dict"].keys()
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(restored[key], tensor), key
