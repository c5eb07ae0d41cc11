"""Summaries, ratios, targets, and the three outputs: a plain table, JSON, and a plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .contenders import BASELINES, MLFLOW_ASYNC_BUF, RAW

THREADED = "er-threaded/mlflow"
SYNC = "er-sync/mlflow"

#: Per workload: the columns of the table, (metric, header), in order.
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "latency": [("p50_us", "p50 µs"), ("p99_us", "p99 µs"), ("max_us", "max µs"), ("calls", "calls")],
    "throughput": [("records_per_s", "records/s"), ("records", "records"), ("seconds", "seconds"),
                   ("log_seconds", "caller s")],
    "seed": [("blocked_s", "blocked s"), ("wall_s", "wall s"), ("compute_s", "compute s"), ("end_s", "run end s")],
    "memory": [("rss_growth_mb", "RSS growth MB"), ("calls", "calls"), ("bytes_per_call", "B/call"),
               ("projected_1m_mb", "MB per 1M"), ("queue_full", "QueueFull"), ("dropped", "dropped")],
}
#: Per workload: the metrics compared against the baselines, and whether lower is better.
RATIO_METRICS: dict[str, list[str]] = {"latency": ["p50_us", "p99_us"], "throughput": ["records_per_s"],
                                       "seed": ["blocked_s", "wall_s"], "memory": ["rss_growth_mb"]}
LOWER_IS_BETTER = {"throughput": False}
#: References beyond the MLflow baselines, per workload.
EXTRA_REFS: dict[str, tuple[str, ...]] = {"throughput": (RAW,), "seed": (SYNC,)}
DESCRIPTION = {
    "latency": "caller cost of one log_metric call, writer busy",
    "throughput": "metrics + params/tags delivered to the store, until flushed",
    "seed": "the original example: compute, metric, image, big file per epoch; model at the end",
    "memory": "peak RSS growth with the writer stalled",
}


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{workload: {contender: {metric: {"median", "min", "max"}}}}`` over the repetitions."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for workload, by_contender in results.items():
        out[workload] = {}
        for name, reps in by_contender.items():
            metrics: dict[str, dict[str, float]] = {}
            keys = sorted({k for r in reps for k in r})
            for key in keys:
                vals = [float(r[key]) for r in reps if isinstance(r.get(key), (int, float))]
                if vals:
                    metrics[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                    "n": len(vals)}
            out[workload][name] = metrics
    return out


def median(summary: dict[str, Any], workload: str, contender: str, metric: str) -> float | None:
    """The median of one figure, or ``None`` when it was not measured."""
    try:
        return float(summary[workload][contender][metric]["median"])
    except KeyError:
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def paired_ratio(mine: list[dict[str, Any]], ref: list[dict[str, Any]], metric: str) -> float | None:
    """``mine / ref`` for one figure: the median of per-repetition ratios when both ran every
    repetition (pairs measured seconds apart, so a machine's drift cancels), else the ratio of medians."""
    a = [r.get(metric) for r in mine]
    b = [r.get(metric) for r in ref]
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
        refs = [b for b in (*BASELINES, *EXTRA_REFS.get(workload, ())) if by_contender.get(b)]
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
            note: str = "") -> dict[str, Any] | None:
    if measured is None:
        return None
    met = measured <= target if op == "<=" else measured >= target
    out = {"name": name, "op": op, "target": target, "measured": measured, "unit": unit, "met": bool(met)}
    if note:
        out["note"] = note
    return out


def targets(summary: dict[str, Any], rat: dict[str, Any], contenders: dict[str, list[str]],
            quick: bool) -> list[dict[str, Any]]:
    """Evaluate the project's targets (only those whose inputs were measured).

    Absolute figures use the medians; ratios use :func:`ratios` (paired per repetition).
    """
    m = median
    out: list[dict[str, Any] | None] = [
        _target("latency: threaded log_metric p50", "<=", 3.0, m(summary, "latency", THREADED, "p50_us"), "µs"),
        _target(f"latency: threaded p50 / {MLFLOW_ASYNC_BUF} p50", "<=", 1 / 30,
                _ratio_of(rat, "latency", THREADED, "p50_us", MLFLOW_ASYNC_BUF)),
        _target(f"latency: threaded p99 / {MLFLOW_ASYNC_BUF} p99", "<=", 1 / 4,
                _ratio_of(rat, "latency", THREADED, "p99_us", MLFLOW_ASYNC_BUF)),
        _target("throughput: threaded drain / raw log_batch", ">=", 0.9,
                _ratio_of(rat, "throughput", THREADED, "records_per_s", RAW)),
        _target("seed: threaded blocked / sync blocked", "<=", 0.02,
                _ratio_of(rat, "seed", THREADED, "blocked_s", SYNC)),
    ]
    compute, upload = m(summary, "seed", THREADED, "compute_s"), m(summary, "seed", SYNC, "blocked_s")
    if compute is not None and upload is not None:
        out.append(_target("seed: threaded wall / (compute + sync upload)", "<=", 1.05,
                           _ratio(m(summary, "seed", THREADED, "wall_s"), compute + upload)))
    for name in contenders.get("memory", []):
        if not name.startswith(THREADED + "["):
            continue
        calls = m(summary, "memory", name, "calls")
        what = f"over {calls:,.0f} calls" if calls is not None else ""
        out.append(_target(f"memory: {name} RSS growth {what}", "<=", 64.0,
                           m(summary, "memory", name, "rss_growth_mb"), "MB",
                           "quick mode: small bounds, not the default ones" if quick else ""))
        if name.endswith("[block]"):
            out.append(_target(f"memory: {name} raises QueueFull when full", ">=", 1.0,
                               m(summary, "memory", name, "queue_full")))
    # The spool's targets are for a background backend (a sync backend fsyncs on every call).
    for name in contenders.get("latency", []):
        if name.endswith("/spool") and not name.startswith("er-sync/"):
            out.append(_target(f"spool: {name} log_metric p50 (same as threaded)", "<=", 3.0,
                               m(summary, "latency", name, "p50_us"), "µs"))
    for name in contenders.get("throughput", []):
        if name.endswith("/spool") and not name.startswith("er-sync/"):
            out.append(_target(f"spool: {name} durable append", ">=", 200_000.0,
                               m(summary, "throughput", name, "records_per_s"), "records/s"))
    return [t for t in out if t is not None]


# -- text --------------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    """A number for a table cell: 3 significant figures, thousands separated."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    return f"{v:.3g}"


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


def text_report(doc: dict[str, Any]) -> str:
    """The whole report as plain text: one table per workload, ratios, then the targets."""
    lines: list[str] = []
    mach, settings = doc["machine"], doc["settings"]
    lines.append(f"mlflow-er bench — {doc['store']['kind']} store {doc['store']['uri']}")
    lines.append(f"machine: {mach.get('cpu_model', '?')}, {mach.get('cpus')} CPUs, {mach.get('memory_gb', '?')} GB, "
                 f"{mach.get('platform')}; Python {mach.get('python')}, mlflow {mach.get('mlflow')}, "
                 f"mlflow-er {mach.get('mlflow_er')}")
    lines.append(f"repetitions: {settings['repeat']} (interleaved), cells: median [min–max]"
                 + ("; QUICK mode (tiny sizes)" if settings.get("quick") else ""))
    summary, rat = doc["workloads"], doc["ratios"]
    for workload, by_contender in summary.items():
        lines.append("")
        lines.append(f"== {workload}: {DESCRIPTION.get(workload, '')}")
        cols = COLUMNS.get(workload, [])
        refs = [b for b in (*BASELINES, *EXTRA_REFS.get(workload, ())) if b in by_contender]
        ratio_metric = RATIO_METRICS.get(workload, [None])[0]
        header = ["contender", *[h for _, h in cols]]
        ratio_refs = [r for r in refs if any(r in rat.get(workload, {}).get(c, {}).get(ratio_metric, {})
                                             for c in by_contender)]
        header += [f"÷ {r}" for r in ratio_refs]
        rows = [header]
        for name, metrics in by_contender.items():
            row = [name, *[_cell(metrics.get(k), k == cols[0][0]) for k, _ in cols]]
            per = rat.get(workload, {}).get(name, {}).get(ratio_metric, {})
            row += [f"{per[r]:.3g}x" if r in per else "" for r in ratio_refs]
            rows.append(row)
        if len(rows) > 1:
            lines.extend(_grid(rows))
        if ratio_refs:
            better = "higher" if LOWER_IS_BETTER.get(workload, True) is False else "lower"
            lines.append(f"(÷ columns: this contender's {ratio_metric} divided by the reference's; {better} is better)")
    if doc.get("targets"):
        lines.append("")
        lines.append("== targets")
        rows = [["target", "measured", "goal", "result"]]
        for t in doc["targets"]:
            rows.append([t["name"], f"{fmt(t['measured'])} {t['unit']}".strip(),
                         f"{t['op']} {fmt(t['target'])} {t['unit']}".strip(), "met" if t["met"] else "MISSED"])
        lines.extend(_grid(rows))
    for note in doc.get("notes", []):
        lines.append(f"note: {note}")
    for err in doc.get("errors", []):
        last = err["error"].strip().splitlines()[-1] if err["error"].strip() else "?"
        lines.append(f"error: {err['workload']} / {err['contender']} (repetition {err['repetition'] + 1}): {last}")
    lines.append(f"total time: {doc.get('seconds', 0):.0f} s")
    return "\n".join(lines)


# -- plot --------------------------------------------------------------------------------
PLOT_METRICS = {"latency": ["p50_us", "p99_us"], "throughput": ["records_per_s"], "seed": ["blocked_s", "wall_s"],
                "memory": ["rss_growth_mb"]}
LOG_SCALE = {"latency", "throughput", "seed"}


def check_plot_available() -> str | None:
    """``None`` when matplotlib can be imported, else an error message saying how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or run without --plot)")
    return None


def plot(doc: dict[str, Any], path: str) -> None:
    """One horizontal bar panel per workload (median, min–max whiskers), saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["workloads"]
    panels = [w for w in summary if summary[w]]
    heights = [max(1.8, 0.25 * len(summary[w]) * len(PLOT_METRICS.get(w, [1])) + 1.0) for w in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, workload in zip(axes[:, 0], panels, strict=False):
        names = list(summary[workload])
        metrics = [k for k in PLOT_METRICS.get(workload, []) if any(k in summary[workload][n] for n in names)]
        bar_h = 0.8 / max(1, len(metrics))
        for j, metric in enumerate(metrics):
            ys, meds, lo, hi = [], [], [], []
            for i, name in enumerate(names):
                st = summary[workload][name].get(metric)
                if not st:
                    continue
                ys.append(i + (j - (len(metrics) - 1) / 2) * bar_h)
                meds.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            ax.barh(ys, meds, height=bar_h, xerr=[lo, hi], capsize=2, label=metric)
            for y, v in zip(ys, meds, strict=False):
                ax.text(v, y, f" {fmt(v)}", va="center", fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        if workload in LOG_SCALE:
            ax.set_xscale("log")
        ax.set_title(f"{workload}: {DESCRIPTION.get(workload, '')}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"mlflow-er bench — {doc['store']['kind']} store, {doc['machine'].get('cpus')} CPUs, "
                 f"median of {doc['settings']['repeat']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
