"""``mlflow-er bench``: the shape of its output (tables, JSON, plot), never its speed."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlflow_er.bench import SCHEMA, _plan_contenders, main
from mlflow_er.bench.contenders import BASELINES, MLFLOW_ASYNC_BUF, MLFLOW_SYNC, RAW
from mlflow_er.bench.legend import legend
from mlflow_er.bench.report import COLUMNS, RATIO_METRICS, fmt, fmt_ratio, references, targets, text_report

pytestmark = pytest.mark.timeout(120)

#: Figures that count things: integers in the JSON, never "65.0".
COUNTS = {"latency": ["calls"], "throughput": ["records"], "memory": ["calls", "queue_full", "dropped"],
          "loop": ["metrics_per_window", "windows"]}


def _numeric(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_shape(doc: dict[str, Any], workloads: list[str]) -> None:
    assert doc["schema"] == SCHEMA
    for key in ("machine", "store", "settings", "contenders", "legend", "workloads", "ratios", "targets",
                "timelines", "errors", "notes"):
        assert key in doc, key
    assert doc["errors"] == [], doc["errors"]
    assert doc["store"]["kind"] == "sqlite" and doc["store"]["uri"].startswith("sqlite:")
    assert list(doc["workloads"]) == workloads
    for workload in workloads:
        names = doc["contenders"][workload]
        assert names, workload
        assert set(doc["workloads"][workload]) == set(names), workload
        for name in names:
            assert name in doc["legend"], name  # every contender is explained
            metrics = doc["workloads"][workload][name]
            assert COLUMNS[workload][0][0] in metrics, (workload, name, metrics)
            for metric, stats in metrics.items():
                assert all(_numeric(stats[k]) for k in ("median", "min", "max")), (workload, name, metric, stats)
                assert stats["min"] <= stats["median"] <= stats["max"]
            for metric in COUNTS.get(workload, []):
                if metric in metrics:
                    assert all(type(metrics[metric][k]) is int for k in ("median", "min", "max")), (name, metric)
        refs = [b for b in references(workload) if b in names]
        for name in names:
            for metric in RATIO_METRICS.get(workload, []):
                if metric in doc["workloads"][workload][name] and refs != [name]:
                    got = doc["ratios"][workload][name][metric]
                    assert all(_numeric(got[r]) for r in refs if r != name), (workload, name, got)
    for t in doc["targets"]:
        assert set(t) >= {"name", "op", "target", "measured", "unit", "kind", "met", "judged"}
        assert _numeric(t["measured"]) and _numeric(t["target"])


@pytest.mark.timeout(300)  # ~25 s on a quiet 2-core box; a loaded one is several times slower
def test_quick_in_process_every_workload_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    code = main(["--quick", "--json", "--quiet", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    doc = json.loads(out)
    workloads = ["latency", "throughput", "seed", "memory", "loop"]
    _check_shape(doc, workloads)
    names = doc["contenders"]
    for n in (MLFLOW_SYNC, MLFLOW_ASYNC_BUF, "er-sync/mlflow", "er-threaded/mlflow"):
        assert n in names["latency"] and n in names["seed"] and n in names["loop"]
    assert RAW in names["throughput"] and RAW not in names["latency"] and RAW not in names["loop"]
    loop = doc["workloads"]["loop"]["er-threaded/mlflow"]
    assert {"lost_us_per_metric", "lost_pct", "call_us_per_metric", "delivered_pct", "drain_s"} <= set(loop)
    assert 0 <= loop["delivered_pct"]["median"] <= 100
    assert {"er-threaded/mlflow[block]", "er-threaded/mlflow[drop]"} <= set(names["memory"])
    assert doc["workloads"]["memory"]["er-threaded/mlflow[block]"]["queue_full"]["median"] == 1
    # quick sizes measure start-up: every target is shown, none judged
    assert doc["targets"] and all(t["met"] is None and t["judged"] is False for t in doc["targets"])
    assert any("flaky" in n and "--start-server" in n for n in doc["notes"])
    # the plot: one panel per workload, each axis saying its unit and which way is better
    assert png.stat().st_size > 10_000
    panels = doc["plot"]["panels"]
    assert [p.split(":")[0] for p in panels] == workloads


@pytest.mark.timeout(300)
def test_quick_text_report_reads_well(tmp_path: Path) -> None:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    cmd = [sys.executable, "-m", "mlflow_er.bench", "--quick", "--workloads", "latency,memory,loop",
           "--contenders", f"{MLFLOW_SYNC},{MLFLOW_ASYNC_BUF},er-threaded/mlflow"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "== loop:" in text and "lost µs/metric" in text and "delivered %" in text
    assert "== contenders" in text and re.search(r"mlflow-async-buf1s +MLflow async with", text)
    assert re.search(r"er-BACKEND/SINK +mlflow-er: backend BACKEND delivering to sink SINK", text)
    assert "not judged at quick size" in text and "MISSED" not in text
    assert not re.search(r"\d(\.\d+)?e[-+]\d\dx", text)  # no "5.05e-05x" ratios
    assert re.search(r"\s1/[\d,.]+\s|\s[\d,.]+×\s", text)  # "1/80" or "3.2×"
    latency_rows = [ln for ln in text.splitlines() if ln.startswith(MLFLOW_SYNC)]
    assert latency_rows and not re.search(r"\s\d+\.0\s", latency_rows[0])  # calls "65", not "65.0"
    assert "[1/1] loop" in proc.stderr  # progress goes to stderr
    assert list(tmp_path.iterdir()) == []  # no stray files in the working directory


def test_ratio_and_count_formatting() -> None:
    assert fmt_ratio(1 / 80) == "1/80"
    assert fmt_ratio(3.2) == "3.2×"
    assert fmt_ratio(5.05e-05) == "1/20,000"
    assert fmt_ratio(0.8) == "0.80×"
    assert fmt_ratio(-0.1) == "≤0×"
    assert fmt(65) == "65" and fmt(16_198) == "16,198" and fmt(65.0) == "65.0"


def _fake_doc(quick: bool) -> dict[str, Any]:
    stats = {"median": 12.0, "min": 10.0, "max": 15.0, "n": 3}
    summary = {"latency": {"er-threaded/mlflow": {"p50_us": stats, "p99_us": stats},
                           MLFLOW_ASYNC_BUF: {"p50_us": stats, "p99_us": stats}},
               "loop": {"er-process/mlflow": {"lost_us_per_metric": {"median": 2.0, "min": 1.5, "max": 2.5, "n": 3}},
                        "er-threaded/mlflow": {"lost_us_per_metric": stats},
                        "wandb-offline": {"lost_us_per_metric": {"median": 80.0, "min": 72.0, "max": 83.0, "n": 3}},
                        MLFLOW_ASYNC_BUF: {"lost_us_per_metric": stats}},
               "flaky": {"er-threaded/mlflow": {"logged": {"median": 900, "min": 900, "max": 900, "n": 1},
                                                "missing": {"median": 0, "min": 0, "max": 0, "n": 1}}}}
    caller = [{"t": i * 0.25, "calls": 100, "p50_us": 1.0, "max_us": 5.0 + i} for i in range(12)]
    stored = [{"t": i * 0.25, "stored_upto": None if 4 <= i < 8 else i * 100} for i in range(14)]
    timeline = {"caller": caller, "stored": stored, "logged": 1200, "stored_count": 1200, "flush_s": 0.3,
                "events": {"killed_s": 1.0, "restart_s": 1.2, "healthy_s": 2.0}}
    names = {w: list(v) for w, v in summary.items()}
    return {"schema": SCHEMA, "machine": {"cpus": 2}, "store": {"kind": "server", "uri": "http://127.0.0.1:1"},
            "settings": {"quick": quick, "repeat": 3}, "contenders": names, "skipped": [],
            "legend": legend(sorted({n for ns in names.values() for n in ns})), "peers": {},
            "workloads": summary, "ratios": {}, "targets": [],
            "timelines": {"er-threaded/mlflow": timeline, "mlflow-async": timeline}, "errors": [], "notes": []}


def test_plot_has_titled_axes_and_the_flaky_timeline(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from mlflow_er.bench.plot import FAMILY_COLOURS, family, plot

    fig, titles = plot(_fake_doc(False), str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert [t.split(":")[0] for t in titles] == ["latency", "loop", "flaky server timeline", "flaky server timeline"]
    for ax in fig.axes:
        label = ax.get_xlabel() or ax.get_ylabel()
        assert label, ax.get_title(loc="left")
    bar_axes = fig.axes[:2]
    assert all(("µs" in ax.get_xlabel() and "lower is better" in ax.get_xlabel()) for ax in bar_axes)
    assert "seconds" in fig.axes[-1].get_xlabel() and fig.axes[-1].get_ylabel() == "records"
    assert {family("er-threaded/mlflow"), family(MLFLOW_ASYNC_BUF), family("wandb-offline")} == set(FAMILY_COLOURS)
    assert len(set(FAMILY_COLOURS.values())) == 3


def test_a_new_backend_is_a_contender_everywhere_without_bench_changes() -> None:
    # What the setup child reports when a plugin registers a backend named "process" (no options needed).
    probed = {"backends": ["process", "sync", "threaded"], "sinks": ["mlflow", "spool"], "broken": {},
              "policies": {"process": ["block"], "threaded": ["block", "drop", "spill"]}, "peers": []}
    workloads = ["latency", "throughput", "seed", "memory", "loop", "flaky"]
    plan = _plan_contenders(probed, workloads, None, [], [])
    names = {w: [c.name for c in cs] for w, cs in plan.items()}
    for w in ("latency", "throughput", "seed", "loop"):
        assert {"er-process/mlflow", "er-process/spool"} <= set(names[w]), w
    assert "er-process/mlflow[block]" in names["memory"]
    assert "er-process/mlflow" in names["flaky"] and "mlflow-async" in names["flaky"]
    assert "er-sync/mlflow" not in names["flaky"]  # one request per call: no background delivery to watch
    # ... and its loop targets (issue 12) are evaluated once it has figures
    doc = _fake_doc(False)
    rat = {"loop": {"er-process/mlflow": {"lost_us_per_metric": {"er-threaded/mlflow": 1 / 6, "wandb-offline": 1 / 40,
                                                                 MLFLOW_ASYNC_BUF: 1 / 6}}}}
    got = {t["name"]: t for t in targets(doc["workloads"], rat, doc["contenders"], False, "server")}
    assert got["loop: er-process/mlflow µs lost per metric"]["met"] is True
    assert got["loop: er-process/mlflow lost / er-threaded/mlflow lost"]["met"] is False  # 1/6 > 1/7
    assert got["loop: er-process/mlflow lost / wandb-offline lost"]["met"] is True
    assert got["flaky: er-threaded/mlflow records missing after the restart"]["met"] is True
    text = text_report({**doc, "ratios": rat, "targets": list(got.values())})
    assert "1/6" in text and "<= 1/7" in text and "MISSED" in text


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workloads", "nope"]) == 2
    assert "unknown workload" in capsys.readouterr().err
    assert main(["--repeat", "0"]) == 2
    assert main(["--workloads", "flaky"]) == 2  # it kills the server: only one the bench started
    assert "--start-server" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main(["--quick", "--plot", "out.png"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_baselines_are_contenders() -> None:
    names = {n for n in BASELINES}
    assert names <= set(legend(sorted(names)))
