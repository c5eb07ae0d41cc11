"""``mlflow-er bench --quick``: the shape of its output, not its speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from mlflow_er.bench import SCHEMA, main
from mlflow_er.bench.contenders import BASELINES, MLFLOW_ASYNC_BUF, MLFLOW_SYNC, RAW
from mlflow_er.bench.report import COLUMNS, RATIO_METRICS

pytestmark = pytest.mark.timeout(120)


def _numeric(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_shape(doc: dict[str, Any], workloads: list[str]) -> None:
    assert doc["schema"] == SCHEMA
    for key in ("machine", "store", "settings", "contenders", "workloads", "ratios", "targets", "errors", "notes"):
        assert key in doc, key
    assert doc["errors"] == [], doc["errors"]
    assert doc["machine"]["cpus"] and doc["machine"]["mlflow"]
    assert doc["store"]["kind"] == "sqlite" and doc["store"]["uri"].startswith("sqlite:")
    assert list(doc["workloads"]) == workloads
    for workload in workloads:
        names = doc["contenders"][workload]
        assert names, workload
        assert set(doc["workloads"][workload]) == set(names), workload
        for name in names:
            metrics = doc["workloads"][workload][name]
            main_metric = COLUMNS[workload][0][0]
            assert main_metric in metrics, (workload, name, metrics)
            for metric, stats in metrics.items():
                assert set(stats) >= {"median", "min", "max"}, (workload, name, metric)
                assert all(_numeric(stats[k]) for k in ("median", "min", "max")), (workload, name, metric, stats)
                assert stats["min"] <= stats["median"] <= stats["max"]
        # every contender but the references has a ratio against each reference present
        refs = [b for b in BASELINES if b in names] + ([RAW] if workload == "throughput" and RAW in names else [])
        assert refs, workload
        for name in names:
            for metric in RATIO_METRICS[workload]:
                if metric not in doc["workloads"][workload][name]:
                    continue
                got = doc["ratios"][workload][name][metric]
                for ref in refs:
                    if ref != name:
                        assert _numeric(got[ref]), (workload, name, metric, ref)
    for t in doc["targets"]:
        assert set(t) >= {"name", "target", "measured", "met"}
        assert isinstance(t["met"], bool) and _numeric(t["measured"]) and _numeric(t["target"])


def test_quick_in_process_every_workload(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = main(["--quick", "--json", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    doc = json.loads(out)
    workloads = ["latency", "throughput", "seed", "memory"]
    _check_shape(doc, workloads)
    names = doc["contenders"]
    # the MLflow contenders and both built-in backends on the mlflow sink, side by side
    for n in (MLFLOW_SYNC, "mlflow-async", MLFLOW_ASYNC_BUF, "er-sync/mlflow", "er-threaded/mlflow"):
        assert n in names["latency"] and n in names["seed"]
    assert RAW in names["throughput"] and RAW not in names["latency"]
    assert {"er-threaded/mlflow[block]", "er-threaded/mlflow[drop]"} <= set(names["memory"])
    block = doc["workloads"]["memory"]["er-threaded/mlflow[block]"]
    assert block["queue_full"]["median"] == 1  # a stalled writer makes 'block' raise QueueFull
    assert doc["workloads"]["memory"]["er-threaded/mlflow[drop]"]["dropped"]["median"] > 0
    assert {t["name"].split(":")[0] for t in doc["targets"]} >= {"latency", "throughput", "seed", "memory"}
    assert time.monotonic() - started < 60


def test_quick_subprocess_table_and_json(tmp_path: Any) -> None:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    cmd = [sys.executable, "-m", "mlflow_er.bench", "--quick", "--json", "--workloads", "latency,throughput",
           "--contenders", f"{MLFLOW_SYNC},{MLFLOW_ASYNC_BUF},{RAW},er-threaded/mlflow"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # nothing but the JSON document on stdout
    _check_shape(doc, ["latency", "throughput"])
    assert doc["contenders"]["latency"] == [MLFLOW_SYNC, MLFLOW_ASYNC_BUF, "er-threaded/mlflow"]
    assert doc["contenders"]["throughput"] == [MLFLOW_SYNC, MLFLOW_ASYNC_BUF, RAW, "er-threaded/mlflow"]
    assert "[1/1] latency" in proc.stderr  # progress goes to stderr
    assert list(tmp_path.iterdir()) == []  # no stray files in the working directory


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workloads", "nope"]) == 2
    assert "unknown workload" in capsys.readouterr().err
    assert main(["--repeat", "0"]) == 2


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main(["--quick", "--plot", "out.png"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
