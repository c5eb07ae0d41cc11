"""Summaries, ratios, targets, and the plain-text report (the plot is in :mod:`.plot`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .contenders import BASELINES, MLFLOW_ASYNC, MLFLOW_ASYNC_BUF, RAW, THREADED_ORM
from .peers import WANDB

THREADED = "er-threaded/mlflow"
SYNC = "er-sync/mlflow"
#: ``er-threaded/mlflow``'s loop loss before issue 12's changes, µs per metric: the midpoints of
#: the ranges in issue 12's table (SQLite 21–28, local server 15–26), measured by the lead on the
#: project's 2-core box on 2026-12-01 with the same method (a ~200 µs pure-Python step, 5
#: metrics, wall with logging minus without, in one process). This bench's own figure for the
#: same commit (1fa934b), from ``mlflow-er bench --start-server --plot docs/bench.png``, is in
#: docs/bench.md; it ran on a loaded box (load average 5–8 on 2 cores), so the issue's quieter
#: figures are the stricter baseline. The target is half of it, measured in the same run.
THREADED_LOOP_BASELINE_US = {"sqlite": 24.5, "server": 20.5}
THREADED_LOOP_BASELINE_NOTE = "baseline: issue 12's figure of 2026-12-01, commit 1fa934b (before its changes)"

#: Per workload: the columns of the table, (metric, header), in order.
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "latency": [("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("max_us", "max µs"), ("calls", "calls")],
    "throughput": [("records_per_s", "records/s"), ("records", "records"), ("seconds", "seconds"),
                   ("log_seconds", "caller s")],
    "seed": [("blocked_s", "blocked s"), ("wall_s", "wall s"), ("compute_s", "compute s"), ("end_s", "run end s")],
    "memory": [("rss_growth_mb", "RSS growth MB"), ("calls", "calls"), ("bytes_per_call", "B/call"),
               ("projected_1m_mb", "MB per 1M"), ("queue_full", "QueueFull"), ("dropped", "dropped")],
    "loop": [("lost_us_per_metric", "lost µs/metric"), ("lost_pct", "lost %"), ("call_us_per_metric", "call µs"),
             ("step_us", "step µs"), ("metrics_per_window", "metrics/window"), ("delivered_pct", "delivered %"),
             ("drain_s", "drain s")],
    "flaky": [("logged", "logged"), ("stored", "stored"), ("missing", "missing"), ("duplicates", "duplicates"),
              ("max_call_us", "max call µs"), ("flush_s", "flush s"), ("flush_ok", "flushed")],
}
#: Per workload: the metrics compared against the baselines, and whether lower is better.
RATIO_METRICS: dict[str, list[str]] = {"latency": ["p50_us", "p99_us"], "throughput": ["records_per_s"],
                                       "seed": ["blocked_s", "wall_s"], "memory": ["rss_growth_mb"],
                                       "loop": ["lost_us_per_metric"]}
LOWER_IS_BETTER = {"throughput": False}
#: References beyond the MLflow baselines, per workload.
EXTRA_REFS: dict[str, tuple[str, ...]] = {"throughput": (RAW,), "seed": (SYNC,), "loop": (THREADED, WANDB)}
#: Workloads whose references are not all the MLflow baselines (MLflow sync's loss is ~20 ms a metric).
REFS: dict[str, tuple[str, ...]] = {"loop": (MLFLOW_ASYNC, MLFLOW_ASYNC_BUF)}
DESCRIPTION = {
    "latency": "caller cost of one log_metric call, writer busy",
    "throughput": "metrics + params/tags delivered to the store, until flushed",
    "seed": "the original example: compute, metric, image, big file per epoch; model at the end",
    "memory": "peak RSS growth with the writer stalled",
    "loop": "wall time a ~200 µs pure-Python step loses per metric logged (5 a step), background threads included",
    "flaky": "logging at ~450 calls/s while the server is SIGKILLed and restarted: caller cost, what reached the store",
}
#: Per workload, a line under its table saying how to read it.
READING = {
    "loop": "lost µs/metric: (wall with logging − wall without) / metrics; call µs: inside the log calls only; "
            "delivered %: of the window's records, delivered when it ended; drain s: the flush after it (not counted)",
    "flaky": "stored: distinct steps read back from the store after the flush; missing = logged − stored when "
             "the bounded flush returned (a queue still retrying then is lost if the process exits); "
             "flushed 1: the flush finished within its bound",
}


def references(workload: str) -> tuple[str, ...]:
    """The contenders ``workload``'s ratios are computed against, in column order."""
    return (*REFS.get(workload, BASELINES), *EXTRA_REFS.get(workload, ()))


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {contender: {metric: {"median", "min", "max"}}}}`` over the repetitions."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for workload, by_contender in results.items():
        out[workload] = {}
        for name, reps in by_contender.items():
            metrics: dict[str, dict[str, float]] = {}
            keys = sorted({k for r in reps for k in r})
            for key in keys:
                raw = [r[key] for r in reps if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
                if raw and all(isinstance(v, int) for v in raw):  # a count stays an integer (an observed one)
                    metrics[key] = {"median": statistics.median_low(raw), "min": min(raw), "max": max(raw),
                                    "n": len(raw)}
                elif raw:
                    vals = [float(v) for v in raw]
                    metrics[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                    "n": len(vals)}
            out[workload][name] = metrics
    return out


def median(summary: dict[str, Any], workload: str, contender: str, metric: str) -> float | None:
    """The median of one figure (a count stays an ``int``), or ``None`` when it was not measured."""
    try:
        value = summary[workload][contender][metric]["median"]
    except KeyError:
        return None
    return value if isinstance(value, int) else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def paired_ratio(mine: list[dict[str, Any]], ref: list[dict[str, Any]], metric: str) -> float | None:
    """``mine / ref`` for one figure: the median of per-repetition ratios when both ran every
    repetition (pairs measured seconds apart, so a machine's drift cancels), else the ratio of medians."""
    a: list[Any] = [r.get(metric) for r in mine]
    b: list[Any] = [r.get(metric) for r in ref]
    if a and len(a) == len(b) and all(isinstance(x, (int, float)) for x in a + b):
        pairs = [_ratio(float(x), float(y)) for x, y in zip(a, b, strict=True)]
        if all(p is not None for p in pairs):
            return statistics.median(p for p in pairs if p is not None)
    va = [float(x) for x in a if isinstance(x, (int, float))]
    vb = [float(x) for x in b if isinstance(x, (int, float))]
    return _ratio(statistics.median(va), statistics.median(vb)) if va and vb else None


def ratios(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """``{workload: {contender: {metric: {reference: contender/reference}}}}`` for every baseline present.

    References are MLflow sync, MLflow async and MLflow async buffered; throughput is also
    compared with raw ``log_batch`` (the drain ratio) and seed with mlflow-er's ``sync``
    backend (the "time blocked" target). See :func:`paired_ratio`.
    """
    out: dict[str, Any] = {}
    for workload, by_contender in results.items():
        refs = [b for b in references(workload) if by_contender.get(b)]
        block: dict[str, Any] = {}
        for name, reps in by_contender.items():
            per_metric: dict[str, Any] = {}
            for metric in RATIO_METRICS.get(workload, []):
                vals = {ref: paired_ratio(reps, by_contender[ref], metric) for ref in refs if ref != name}
                vals = {k: v for k, v in vals.items() if v is not None}
                if vals:
                    per_metric[metric] = vals
            if per_metric:
                block[name] = per_metric
        if block:
            out[workload] = block
    return out


def _ratio_of(rat: dict[str, Any], workload: str, name: str, metric: str, ref: str) -> float | None:
    try:
        return float(rat[workload][name][metric][ref])
    except KeyError:
        return None


def _target(name: str, op: str, target: float, measured: float | None, unit: str = "",
            note: str = "", kind: str = "value") -> dict[str, Any] | None:
    if measured is None:
        return None
    met = measured <= target if op == "<=" else measured >= target
    out = {"name": name, "op": op, "target": target, "measured": measured, "unit": unit, "kind": kind,
           "met": bool(met), "judged": True}
    if note:
        out["note"] = note
    return out


def _per(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _delivered_target(summary: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A low loss that only defers the work is no win: most of a window must reach the store within it."""
    return _target(f"loop: {name} delivered within its window", ">=", 90.0,
                   median(summary, "loop", name, "delivered_pct"), "%",
                   "the loss counts background work done during the window only")


def _loop_targets(summary: dict[str, Any], rat: dict[str, Any], names: list[str],
                  store_kind: str) -> list[dict[str, Any] | None]:
    """Issue 12's loop targets: the ``process`` backend's loss, and ``threaded`` halved from its baseline."""
    m = median
    out: list[dict[str, Any] | None] = []
    for name in names:
        if not name.startswith("er-process/"):
            continue
        out.append(_target(f"loop: {name} µs lost per metric", "<=", 3.0,
                           m(summary, "loop", name, "lost_us_per_metric"), "µs"))
        for ref, goal in ((THREADED, 1 / 7), (WANDB, 1 / 25), (MLFLOW_ASYNC_BUF, 1 / 100)):
            out.append(_target(f"loop: {name} lost / {ref} lost", "<=", goal,
                               _ratio_of(rat, "loop", name, "lost_us_per_metric", ref), kind="ratio"))
        out.append(_delivered_target(summary, name))
    if THREADED in names:
        out.append(_delivered_target(summary, THREADED))
    if THREADED in names and THREADED_ORM in names:
        out.append(_target(f"loop: {THREADED} lost / {THREADED_ORM} lost (the ORM path of before, same run)", "<=",
                           0.5, _per(m(summary, "loop", THREADED, "lost_us_per_metric"),
                                     m(summary, "loop", THREADED_ORM, "lost_us_per_metric")), kind="ratio"))
    baseline = THREADED_LOOP_BASELINE_US.get("sqlite" if store_kind == "sqlite" else "server", 0.0)
    if THREADED in names and baseline > 0:
        out.append(_target(f"loop: {THREADED} µs lost per metric, half of its {baseline:.1f} µs baseline", "<=",
                           baseline / 2, m(summary, "loop", THREADED, "lost_us_per_metric"), "µs",
                           THREADED_LOOP_BASELINE_NOTE))
    return out


def targets(summary: dict[str, Any], rat: dict[str, Any], contenders: dict[str, list[str]],
            quick: bool, store_kind: str = "sqlite") -> list[dict[str, Any]]:
    """Evaluate the project's targets (only those whose inputs were measured).

    Absolute figures use the medians; ratios use :func:`ratios` (paired per repetition).
    With ``quick`` the figures are shown but not judged (``met`` is ``None``): tiny sizes
    measure start-up more than steady state.
    """
    m = median
    out: list[dict[str, Any] | None] = [
        _target("latency: threaded log_metric p50", "<=", 3.0, m(summary, "latency", THREADED, "p50_us"), "µs"),
        _target(f"latency: threaded p50 / {MLFLOW_ASYNC_BUF} p50", "<=", 1 / 30,
                _ratio_of(rat, "latency", THREADED, "p50_us", MLFLOW_ASYNC_BUF), kind="ratio"),
        _target(f"latency: threaded p99 / {MLFLOW_ASYNC_BUF} p99", "<=", 1 / 4,
                _ratio_of(rat, "latency", THREADED, "p99_us", MLFLOW_ASYNC_BUF), kind="ratio"),
        _target("throughput: threaded drain / raw log_batch", ">=", 0.9,
                _ratio_of(rat, "throughput", THREADED, "records_per_s", RAW), kind="ratio"),
        _target("seed: threaded blocked / sync blocked", "<=", 0.02,
                _ratio_of(rat, "seed", THREADED, "blocked_s", SYNC), kind="ratio"),
    ]
    compute, upload = m(summary, "seed", THREADED, "compute_s"), m(summary, "seed", SYNC, "blocked_s")
    if compute is not None and upload is not None:
        out.append(_target("seed: threaded wall / (compute + sync upload)", "<=", 1.05,
                           _ratio(m(summary, "seed", THREADED, "wall_s"), compute + upload), kind="ratio"))
    for name in contenders.get("memory", []):
        if not name.startswith(THREADED + "["):
            continue
        calls = m(summary, "memory", name, "calls")
        what = f"over {calls:,.0f} calls" if calls is not None else ""
        out.append(_target(f"memory: {name} RSS growth {what}", "<=", 64.0,
                           m(summary, "memory", name, "rss_growth_mb"), "MB"))
        if name.endswith("[block]"):
            out.append(_target(f"memory: {name} raises QueueFull when full", ">=", 1,
                               m(summary, "memory", name, "queue_full"), kind="count"))
    # The spool's targets are for a background backend (a sync backend fsyncs on every call).
    for name in contenders.get("latency", []):
        if name.endswith("/spool") and not name.startswith("er-sync/"):
            out.append(_target(f"spool: {name} log_metric p50 (same as threaded)", "<=", 3.0,
                               m(summary, "latency", name, "p50_us"), "µs"))
    for name in contenders.get("throughput", []):
        if name.endswith("/spool") and not name.startswith("er-sync/"):
            out.append(_target(f"spool: {name} durable append", ">=", 200_000.0,
                               m(summary, "throughput", name, "records_per_s"), "records/s"))
    out += _loop_targets(summary, rat, contenders.get("loop", []), store_kind)
    for name in contenders.get("flaky", []):
        if name.startswith("er-"):
            out.append(_target(f"flaky: {name} records missing after the restart", "<=", 0,
                               m(summary, "flaky", name, "missing"), kind="count"))
    done = [t for t in out if t is not None]
    if quick:
        for t in done:
            t["met"], t["judged"] = None, False
    return done


# -- text --------------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    """A number for a table cell: integers whole, else 3 significant figures, thousands separated."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    if a < 0.001:
        return "<0.001" if v > 0 else ">-0.001"
    return f"{v:.3g}"


def _sig(x: float, digits: int = 2) -> str:
    """``x`` (≥ 1) to ``digits`` significant figures, thousands separated, no exponent."""
    if x >= 10 ** digits:
        return f"{round(x, -int(math.floor(math.log10(x))) + digits - 1):,.0f}"
    return f"{x:.{digits}g}"


def fmt_ratio(r: float | None) -> str:
    """A ratio people read at a glance: ``3.2×``, ``0.80×``, ``1/80``, ``1/25,000``."""
    if r is None or math.isnan(r):
        return "-"
    if r <= 0:
        return "≤0×"  # the contender lost nothing measurable (within noise)
    if r >= 1:
        return f"{_sig(r, 3)}×"
    if r >= 0.5:
        return f"{r:.2f}×"
    return f"1/{_sig(1 / r, 2)}"


def fmt_target(t: dict[str, Any], value: float) -> str:
    """A target's measured or goal value with its unit (a ratio as :func:`fmt_ratio`)."""
    if t.get("kind") == "ratio":
        return fmt_ratio(value)
    return f"{fmt(value)} {t.get('unit', '')}".strip()


def _cell(stats: dict[str, Any] | None, spread: bool) -> str:
    if not stats:
        return "-"
    text = fmt(stats["median"])
    if spread and stats.get("n", 1) > 1 and stats["min"] != stats["max"]:
        text += f" [{fmt(stats['min'])}–{fmt(stats['max'])}]"
    return text


def _grid(rows: Sequence[Sequence[str]], right: bool = True) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [(c.rjust(w) if right else c.ljust(w)) for c, w in zip(r[1:], widths[1:], strict=False)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def result_text(t: dict[str, Any]) -> str:
    """``met``, ``MISSED`` or ``not judged at quick size``."""
    if not t.get("judged", True) or t.get("met") is None:
        return "not judged at quick size"
    return "met" if t["met"] else "MISSED"


def _workload_lines(doc: dict[str, Any], workload: str) -> list[str]:
    summary, rat = doc["workloads"], doc["ratios"]
    by_contender = summary[workload]
    lines = ["", f"== {workload}: {DESCRIPTION.get(workload, '')}"]
    cols = [(k, h) for k, h in COLUMNS.get(workload, []) if any(k in m for m in by_contender.values())]
    ratio_metric = RATIO_METRICS.get(workload, [None])[0]
    ratio_refs = [r for r in references(workload) if r in by_contender
                  and any(r in rat.get(workload, {}).get(c, {}).get(ratio_metric, {}) for c in by_contender)]
    rows = [["contender", *[h for _, h in cols], *[f"÷ {r}" for r in ratio_refs]]]
    for name, metrics in by_contender.items():
        row = [name, *[_cell(metrics.get(k), k == cols[0][0]) for k, _ in cols]]
        per = rat.get(workload, {}).get(name, {}).get(ratio_metric, {})
        row += [fmt_ratio(per[r]) if r in per else "" for r in ratio_refs]
        rows.append(row)
    if len(rows) > 1 and cols:
        lines.extend(_grid(rows))
    if workload in READING:
        lines.append(f"({READING[workload]})")
    if ratio_refs:
        better = "higher" if LOWER_IS_BETTER.get(workload, True) is False else "lower"
        lines.append(f"(÷ columns: this contender's {ratio_metric} divided by the reference's; {better} is better)")
    return lines


def _timeline_lines(timelines: dict[str, Any]) -> list[str]:
    """One line per flaky contender: the outage, the caller's worst call in it, when the store caught up."""
    lines: list[str] = []
    for name, tl in timelines.items():
        ev = tl.get("events", {})
        killed, healthy = ev.get("killed_s"), ev.get("healthy_s")
        caller = tl.get("caller", [])
        during = [b["max_us"] for b in caller if killed is not None and healthy is not None
                  and killed <= b["t"] <= healthy]
        logged = tl.get("logged")
        caught = next((p["t"] for p in tl.get("stored", []) if healthy is not None and p["t"] >= healthy
                       and logged is not None and (p.get("stored_upto") or 0) >= logged), None)
        parts = [f"{name}:"]
        if killed is not None:
            parts.append(f"killed at {killed:.1f} s, restart began {ev.get('restart_s', 0):.1f} s, "
                         f"healthy {healthy:.1f} s;" if healthy is not None else f"killed at {killed:.1f} s;")
        if during:
            parts.append(f"worst call during the outage {fmt(max(during))} µs;")
        parts.append(f"store had every record at {caught:.1f} s;" if caught is not None
                     else "store did not have every record while polled;")
        parts.append(f"stored {fmt(tl.get('stored_count'))} of {fmt(logged)} (flush {fmt(tl.get('flush_s'))} s"
                     + (f", {tl['flush_error']}" if tl.get("flush_error") else "") + ")")
        lines.append("  " + " ".join(parts))
    return lines


def text_report(doc: dict[str, Any]) -> str:
    """The whole report as plain text: the legend, one table per workload, ratios, then the targets."""
    lines: list[str] = []
    mach, settings = doc["machine"], doc["settings"]
    lines.append(f"mlflow-er bench — {doc['store']['kind']} store {doc['store']['uri']}")
    lines.append(f"machine: {mach.get('cpu_model', '?')}, {mach.get('cpus')} CPUs, {mach.get('memory_gb', '?')} GB, "
                 f"{mach.get('platform')}; Python {mach.get('python')}, mlflow {mach.get('mlflow')}, "
                 f"mlflow-er {mach.get('mlflow_er')}"
                 + "".join(f", {k} {v}" for k, v in doc.get("peers", {}).items()))
    if mach.get("loadavg_at_start"):  # a shared box: the figures mean less when it was busy
        lines.append("load average (1, 5, 15 min) at start: " + ", ".join(map(str, mach["loadavg_at_start"]))
                     + ("; at end: " + ", ".join(map(str, mach["loadavg_at_end"])) if mach.get("loadavg_at_end")
                        else ""))
    lines.append(f"repetitions: {settings['repeat']} (interleaved), cells: median [min–max]"
                 + ("; QUICK mode (tiny sizes, targets not judged)" if settings.get("quick") else ""))
    if doc.get("legend"):
        from .legend import legend_lines

        lines.append("")
        lines.append("== contenders")
        lines.extend(legend_lines(list(doc["legend"])))
    for s in doc.get("skipped", []):
        lines.append(f"  skipped {s['contender']}: {s['reason']}")
    for workload in doc["workloads"]:
        lines.extend(_workload_lines(doc, workload))
        if workload == "flaky" and doc.get("timelines"):
            lines.extend(_timeline_lines(doc["timelines"]))
    if doc.get("targets"):
        lines.append("")
        lines.append("== targets")
        rows = [["target", "measured", "goal", "result"]]
        for t in doc["targets"]:
            rows.append([t["name"], fmt_target(t, t["measured"]), f"{t['op']} {fmt_target(t, t['target'])}",
                         result_text(t)])
        lines.extend(_grid(rows))
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    for err in doc.get("errors", []):
        last = err["error"].strip().splitlines()[-1] if err["error"].strip() else "?"
        lines.append(f"error: {err['workload']} / {err['contender']} (repetition {err['repetition'] + 1}): {last}")
    lines.append(f"total time: {doc.get('seconds', 0):.0f} s")
    return "\n".join(lines)


def check_plot_available() -> str | None:
    """``None`` when matplotlib can be imported, else an error message saying how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or run without --plot)")
    return None
