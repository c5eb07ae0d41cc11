"""``--plot PATH``: one panel per workload, plus the flaky-server timeline (needs matplotlib).

Bars are medians with min–max whiskers, coloured by family (mlflow-er, MLflow, peers);
a workload's second figure (p99, wall) is the lighter, hatched bar. Every axis says its
unit and whether lower or higher is better; value labels sit right of the whiskers.
"""

from __future__ import annotations

import math
from typing import Any

from .report import DESCRIPTION, fmt

FAMILY_COLOURS = {"mlflow-er": "#1f6fb4", "MLflow": "#e0701b", "peers": "#2e9d4a"}
#: workload -> [(metric, label)], axis title, log scale, lower is better
PANELS: dict[str, tuple[list[tuple[str, str]], str, bool, bool]] = {
    "latency": ([("p50_us", "p50"), ("p99_us", "p99")], "µs per log_metric call (log scale)", True, True),
    "throughput": ([("records_per_s", "records/s")], "records delivered per second (log scale)", True, False),
    "seed": ([("blocked_s", "blocked in logging"), ("wall_s", "wall")], "seconds (log scale)", True, True),
    "memory": ([("rss_growth_mb", "RSS growth")], "MB of peak RSS growth", False, True),
    "loop": ([("lost_us_per_metric", "loop time lost")], "µs of loop time lost per metric (log scale)", True, True),
    "flaky": ([("max_call_us", "slowest call")], "µs, slowest log call in the run (log scale)", True, True),
}


def family(name: str) -> str:
    """``mlflow-er``, ``MLflow`` or ``peers`` for a contender name (colour and legend)."""
    if name.startswith("er-") or name == "mlflow-scheme-threaded":
        return "mlflow-er"
    if name.startswith("mlflow-") or name == "raw-log-batch":
        return "MLflow"
    return "peers"


def _lighter(hex_colour: str, amount: float = 0.55) -> tuple[float, float, float]:
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _bars(ax: Any, workload: str, by_contender: dict[str, Any]) -> None:
    metrics, axis_title, log, lower = PANELS[workload]
    names = list(by_contender)
    metrics = [(k, lab) for k, lab in metrics if any(k in by_contender[n] for n in names)]
    bar_h = 0.8 / max(1, len(metrics))
    floor = math.inf
    tops: list[float] = []
    for j, (metric, label) in enumerate(metrics):
        for i, name in enumerate(names):
            st = by_contender[name].get(metric)
            if not st:
                continue
            y = i + (j - (len(metrics) - 1) / 2) * bar_h
            med, lo, hi = float(st["median"]), float(st["min"]), float(st["max"])
            base = FAMILY_COLOURS[family(name)]
            colour = base if j == 0 else _lighter(base)
            shown = med if not log or med > 0 else math.nan  # ≤ 0 cannot sit on a log axis: label only
            ax.barh(y, shown, height=bar_h * 0.92, color=colour, hatch="//" if j else None, edgecolor="white",
                    xerr=[[max(0.0, med - lo)], [max(0.0, hi - med)]] if hi > lo and med > 0 else None,
                    error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
            if med > 0:
                floor = min(floor, lo if lo > 0 else med)
            tops.append(max(hi, med))
            text = fmt(st["median"]) + (f" {label}" if len(metrics) > 1 else "")
            if med <= 0:  # nothing to draw: say so where the bar would start
                text += " (≤ 0: within noise)"
            at = max(hi, med) if max(hi, med) > 0 else None
            ax.annotate(text, (at, y) if at is not None else (0, y), xytext=(4, 0), textcoords="offset points",
                        xycoords="data" if at is not None else ("axes fraction", "data"), va="center", fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    for tick, name in zip(ax.get_yticklabels(), names, strict=False):
        tick.set_color(FAMILY_COLOURS[family(name)])
    ax.invert_yaxis()
    top = max(tops) if tops else 1.0
    if log and math.isfinite(floor) and top > 0:
        ax.set_xscale("log")
        ax.set_xlim(floor / 3, top * 12)  # room for the labels right of the whiskers
    else:
        ax.set_xlim(0, top * 1.35 if top > 0 else 1)
    ax.set_xlabel(f"{axis_title} — {'lower' if lower else 'higher'} is better", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{workload}: {DESCRIPTION.get(workload, '')}", fontsize=9, loc="left")
    ax.grid(axis="x", alpha=0.25)


def _timeline(ax_lat: Any, ax_rec: Any, timelines: dict[str, Any]) -> None:
    """Caller latency (top) and records in the store (bottom) against time, the outage shaded."""
    styles = ["-", "--", ":", "-."]
    for k, (name, tl) in enumerate(timelines.items()):
        colour = FAMILY_COLOURS[family(name)]
        style = styles[k % len(styles)]
        caller = tl.get("caller", [])
        ax_lat.plot([b["t"] for b in caller], [b["max_us"] for b in caller], style, color=colour, lw=1,
                    label=f"{name} (slowest call per 0.25 s)")
        stored = [p for p in tl.get("stored", []) if p.get("stored_upto") is not None]
        ax_rec.plot([p["t"] for p in stored], [p["stored_upto"] for p in stored], style, color=colour, lw=1.4,
                    marker=".", ms=3, label=f"{name}: in the store")
        if caller:
            total = 0
            xs, ys = [], []
            for b in caller:
                total += b["calls"]
                xs.append(b["t"] + 0.25)
                ys.append(total)
            ax_rec.plot(xs, ys, style, color=_lighter(colour, 0.4), lw=0.8, label=f"{name}: logged")
        ev = tl.get("events", {})
        if "killed_s" in ev:  # each contender's own outage (a restart's length varies)
            end = ev.get("healthy_s", ev["killed_s"])
            for ax in (ax_lat, ax_rec):
                ax.axvspan(ev["killed_s"], end, color=colour, alpha=0.08, lw=0)
                ax.axvline(ev["killed_s"], color=colour, lw=0.8, ls=style)
                ax.axvline(end, color=colour, lw=0.8, ls=style)
            ax_lat.annotate(f"server down ({name}): SIGKILL … healthy", (ev["killed_s"], 1 - 0.09 * (k + 1)),
                            xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points",
                            fontsize=7, color=colour)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("µs per call (log)", fontsize=8)
    ax_lat.set_title("flaky server timeline: caller latency while the server is killed and restarted — lower is "
                     "better", fontsize=9, loc="left")
    ax_rec.set_ylabel("records", fontsize=8)
    ax_rec.set_xlabel("seconds since logging began", fontsize=8)
    ax_rec.set_title("flaky server timeline: records logged and records in the store (highest step read back) — "
                     "store close to logged is better", fontsize=9, loc="left")
    for ax in (ax_lat, ax_rec):
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)


def plot(doc: dict[str, Any], path: str) -> tuple[Any, list[str]]:
    """Save the figure to ``path``; return ``(figure, panel titles)`` (the figure is closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    summary = doc["workloads"]
    panels = [w for w in summary if summary[w] and w in PANELS and w != "flaky"]
    timelines = doc.get("timelines") or {}
    heights = [max(1.9, 0.26 * len(summary[w]) * len(PANELS[w][0]) + 1.2) for w in panels]
    if timelines:
        heights += [2.4, 2.4]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, workload in zip(axes[:, 0], panels, strict=False):
        _bars(ax, workload, summary[workload])
    if timelines:
        axes[-2, 0].sharex(axes[-1, 0])  # one time axis for both halves of the timeline
        _timeline(axes[-2, 0], axes[-1, 0], timelines)
    handles = [Patch(color=c, label=f) for f, c in FAMILY_COLOURS.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=3, frameon=False)
    quick = " — QUICK mode (tiny sizes)" if doc["settings"].get("quick") else ""
    fig.suptitle(f"mlflow-er bench — {doc['store']['kind']} store, {doc['machine'].get('cpus')} CPUs, "
                 f"median of {doc['settings']['repeat']} (whiskers: min–max){quick}", fontsize=10, x=0.01,
                 ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    titles = [ax.get_title(loc="left") for ax in axes[:, 0]]
    return fig, titles
