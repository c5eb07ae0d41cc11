"""``examples/train_loop.py`` (what ``make demo`` runs) works end to end on an embedded store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_loop.py"


def run_example(tmp_path: Path, *extra: str, env_extra: dict[str, str] | None = None,
                ) -> tuple[subprocess.CompletedProcess[str], str]:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               MLFLOW_ER_STAGING_DIR=str(tmp_path / "staging"), **(env_extra or {}))
    env.pop("MLFLOW_ER_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--compute", "0.05", "--file-mb", "2", "--backend", "sync",
         "--tracking-uri", uri, *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
    )
    return proc, uri


def check_run(proc: subprocess.CompletedProcess[str], uri: str, tmp_path: Path) -> None:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert re.search(r"^time blocked in logging: \d+\.\d{3} s \(backend=sync\)$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^whole run wall time: \d+\.\d{3} s$", proc.stdout, re.M), proc.stdout
    match = re.search(r"^run id: ([0-9a-f]{32})$", proc.stdout, re.M)
    assert match, proc.stdout
    run_id = match.group(1)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "cool_loss")
    assert sorted(m.step for m in history) == [0, 1]
    artifacts = {a.path: a for a in client.list_artifacts(run_id)}
    assert {"cool_image.png", "huge_file.bin", "best_model.npz"} <= set(artifacts)
    assert artifacts["huge_file.bin"].file_size == 2 * 1024 * 1024
    # Artifacts land beside the database, never in the working directory's ./mlruns.
    assert (tmp_path / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    # Nothing else was logged anywhere in the store (no stray runs from background jobs).
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]


def test_example_run_methods(tmp_path: Path) -> None:
    proc, uri = run_example(tmp_path)
    check_run(proc, uri, tmp_path)
    assert "logging via Run methods" in proc.stdout
    assert proc.stdout.count("  epoch ") == 2


def test_example_seed_background_worker_api(tmp_path: Path) -> None:
    proc, uri = run_example(tmp_path, "--seed-api")
    check_run(proc, uri, tmp_path)
    assert "logging via seed background_worker API" in proc.stdout


def test_example_removes_its_temp_files(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc, _ = run_example(tmp_path, env_extra={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in tmpdir.iterdir() if p.name.startswith("mlflow-er-train-loop-")]


def test_example_unknown_backend_fails(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--file-mb", "1", "--backend",
                           "no-such-backend", "--tracking-uri", uri], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    assert proc.returncode != 0
    assert "no-such-backend" in proc.stderr
    assert "sync" in proc.stderr  # the error lists the available backends


def test_seed_thread_job_fluent_call_logs_to_the_active_run(tracking_uri: str) -> None:
    """The seed example's exact call: fluent ``mlflow.log_metric`` in a thread job, no run id."""
    import mlflow

    from mlflow_er import ExperimentTracker

    tracker = ExperimentTracker("seed-thread-job", tracking_uri=tracking_uri)
    with tracker.run(run_name="r") as run:
        tracker.background_worker("metric", mlflow.log_metric, False, "cool_loss", 0.5, step=1)
    client = MlflowClient(tracking_uri)
    assert [m.value for m in client.get_metric_history(run.run_id, "cool_loss")] == [0.5]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run.run_id]  # no stray run opened by the job thread
