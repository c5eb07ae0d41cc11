"""Issue 13 item 5: sync progress in records and artifacts, ``--dry-run``, exit codes in ``--help``, run context."""

from __future__ import annotations

import getpass
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import mlflow_er
from mlflow_er.records import Artifact, Batch, Metric
from mlflow_er.sinks.spool import SpoolSink
from mlflow_er.spool import cli as spool_cli
from mlflow_er.spool.cli import EXIT_OK, sync_main
from mlflow_er.spool.replay import sync

RUN = "0123456789abcdef0123456789abcdef"
TS = 1_700_000_000_000
PKG_DIR = str(Path(mlflow_er.__file__).parent)


def make_spool(path: Path, n: int = 400, artifacts: int = 2) -> None:
    sink = SpoolSink(path, experiment_name="prog", segment_bytes=8_000)
    sink.start_run(RUN, run_name="shown")
    for i in range(0, n, 50):
        sink.write_batch(Batch.of(RUN, [Metric(RUN, "m", float(j), TS + j, j, j) for j in range(i, i + 50)]))
    for k in range(artifacts):
        f = path.parent / f"a{k}.txt"
        f.write_text(str(k))
        sink.write_artifact(Artifact(RUN, str(f), None, TS, n + k))
    sink.end_run(RUN)
    sink.close()


def test_without_a_terminal_a_line_every_10_percent(tmp_path: Path, tracking_uri: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    make_spool(tmp_path / "spool")
    report = sync(str(tmp_path / "spool"), tracking_uri, chunk_records=20)  # stderr is not a terminal here
    assert report.records == 404 and report.artifacts == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlflow-er sync: ")]
    pcts = [int(m.group(1)) for ln in lines if (m := re.search(r"/404 records \((\d+)%\)", ln))]
    assert len(pcts) >= 9 and pcts == sorted(pcts) and pcts[-1] == 100
    assert "2/2 artifacts" in lines[-1]


def test_on_a_terminal_the_bar_counts_records_and_artifacts(tmp_path: Path, tracking_uri: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    make_spool(tmp_path / "spool")
    sync(str(tmp_path / "spool"), tracking_uri, chunk_records=50, progress=True)
    err = capsys.readouterr().err
    assert "404/404" in err and " records" in err and "2/2 artifacts" in err
    assert "B/s" not in err and "kB" not in err  # not segment bytes


def test_dry_run_lists_runs_and_records_and_sends_nothing(tmp_path: Path, tracking_uri: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    spool = tmp_path / "spool"
    make_spool(spool)
    assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"{RUN} (shown) -> new run" in out and "400 metrics" in out and "2 artifacts" in out
    assert "404 record(s) of 1 run(s) not yet synced" in out and "nothing was sent or written" in out
    assert not (spool / "sync").exists()
    assert MlflowClient(tracking_uri).get_experiment_by_name("prog") is None
    sync(str(spool), tracking_uri, progress=False)
    assert sync_main([str(spool), "--tracking-uri", tracking_uri, "--dry-run"]) == EXIT_OK
    assert "nothing to sync" in capsys.readouterr().out


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        sync_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    codes = {v for k, v in vars(spool_cli).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert codes == set(range(7))
    for code in codes:
        assert re.search(rf"^\s+{code}\s+\S", text, re.M), f"exit code {code} is not documented in --help"
    assert "--dry-run" in text and "--wait" in text


WRITER = r"""
import sys, types
pkg = types.ModuleType("mlflow_er"); pkg.__path__ = [sys.argv[2]]; sys.modules["mlflow_er"] = pkg
from mlflow_er.records import Batch, Metric
from mlflow_er.sinks.spool import SpoolSink
RUN = "0123456789abcdef0123456789abcdef"
sink = SpoolSink(sys.argv[1], experiment_name="ctx")
sink.start_run(RUN, run_name="offline")
sink.write_batch(Batch.of(RUN, [Metric(RUN, "m", 1.0, 1, 0, 0)]))
sink.end_run(RUN)
sink.close()
"""


@pytest.mark.timeout(60)
def test_a_synced_run_carries_user_source_and_git_commit(tmp_path: Path, tracking_uri: str) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    script = repo / "train.py"
    script.write_text(WRITER)
    subprocess.run([*git, "add", "train.py"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-qm", "x"], check=True, timeout=30)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "spool"), PKG_DIR], capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sync_main([str(tmp_path / "spool"), "--tracking-uri", tracking_uri, "--no-progress"]) == EXIT_OK
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("ctx")
    (run,) = client.search_runs([exp.experiment_id])
    tags = run.data.tags
    assert run.info.user_id == getpass.getuser() == tags["mlflow.user"]
    assert tags["mlflow.source.name"] == str(script) and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == commit
    assert exp.tags.get("git_commit") == commit  # the experiment, as ExperimentTracker tags a new one
    assert json.loads(json.dumps(tags))["mlflow.runName"] == "offline"
