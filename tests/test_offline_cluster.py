"""The offline-cluster recipe end to end: two "hosts" spool to one S3 prefix, a "login node" syncs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_er.spool.cli import EXIT_OK, sync_main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "offline_cluster.py"
HOSTS = {"host-a": 200, "host-b": 350}  # run name -> steps


@pytest.mark.timeout(90)
def test_two_hosts_spool_to_s3_and_the_login_node_syncs_once(tmp_path: Path, s3_bucket: tuple[Any, str],
                                                             moto_s3: Any, tracking_uri: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    s3, bucket = s3_bucket
    url = f"{bucket}/cluster/mlflow-er"
    # Each host: its own local disk and staging folder, the same upload prefix, no tracking server.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    procs = {}
    for name, steps in HOSTS.items():
        host = tmp_path / name
        host.mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--upload-url", url, "--endpoint-url", moto_s3.endpoint_url,
             "--spool-dir", str(host / "spool"), "--run-name", name, "--steps", str(steps)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=host, stdin=subprocess.DEVNULL,
            env={**env, "MLFLOW_ER_STAGING_DIR": str(host / "staging")})
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{name} failed:\n{err[-3000:]}"
        assert re.search(r"[1-9]\d* segment\(s\) uploaded, 0 pending", out), out
    # Both hosts' segments sit side by side under the one prefix (writer ids never clash).
    segments = s3.ls(f"{url[5:]}/segments")
    assert len(segments) >= 2
    assert not (tmp_path / "mlflow.db").exists(), "the hosts must not have touched the tracking store"

    # The login node: `mlflow-er sync s3://... --tracking-uri URI`.
    argv = [url, "--tracking-uri", tracking_uri, "-o", f"endpoint_url={moto_s3.endpoint_url}", "--json",
            "--no-progress"]
    capsys.readouterr()
    assert sync_main(argv) == EXIT_OK
    first = json.loads(capsys.readouterr().out)
    # per host: 3 params + the loss values + 1 tag + 1 artifact + the run's start and end
    assert first["records"] == sum(steps + 7 for steps in HOSTS.values()), first
    assert len(first["runs_created"]) == 2 and first["artifacts"] == 2 and first["failed"] == [] == first["gaps"]

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("offline-cluster")
    assert exp is not None

    def counts() -> dict[str, int]:
        runs = client.search_runs([exp.experiment_id])
        return {r.info.run_name: len(client.get_metric_history(r.info.run_id, "loss")) for r in runs}

    assert counts() == HOSTS
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.0003", "batch_size": "64", "steps": str(HOSTS[run.info.run_name])}
        assert run.data.tags["phase"] == "done"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.json"]

    # The next cron round: nothing new, nothing changes.
    assert sync_main(argv) == EXIT_OK
    second = json.loads(capsys.readouterr().out)
    assert second["records"] == 0 and second["runs_created"] == [] and second["artifacts"] == 0, second
    assert second["segments_skipped"] == len(segments)
    assert counts() == HOSTS
    assert len(client.search_runs([exp.experiment_id])) == 2
