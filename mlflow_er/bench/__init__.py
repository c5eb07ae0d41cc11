"""``mlflow-er bench``: MLflow's logging modes and every mlflow-er backend × sink, side by side.

Workloads (``latency``, ``throughput``, ``seed``, ``memory``, ``loop``, ``flaky``) run for
every contender in one invocation, interleaved (A B A B …) over ``--repeat`` repetitions,
each task in a fresh child process. The report gives medians with their spread, ratios
against MLflow sync and async, and the project's targets as met or missed (not judged
with ``--quick``). ``--json`` prints the same as a stable JSON document::

    {"schema": "mlflow-er-bench/1", "machine": {...}, "store": {"kind", "uri"},
     "settings": {...}, "contenders": {workload: [name, ...]}, "skipped": [...],
     "legend": {contender: meaning}, "peers": {name: version},
     "workloads": {workload: {contender: {metric: {"median", "min", "max", "n"}}}},
     "ratios": {workload: {contender: {metric: {reference: ratio}}}},
     "targets": [{"name", "op", "target", "measured", "unit", "kind", "met", "judged"}],
     "timelines": {contender: {"caller": [...], "stored": [...], "events": {...}, ...}},
     "plot": {"path", "panels": [...]}, "errors": [...], "notes": [...]}

Counts (calls, records, dropped) are integers; ``met`` is ``null`` when not judged.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import report
from .contenders import Contender, Context, er_contender, mlflow_contenders, orm_contender
from .legend import legend
from .runner import Plan, Task, Zygote, run_plan
from .server import open_store
from .workloads import WORKLOADS, applies, sizes_for

SCHEMA = "mlflow-er-bench/1"

__all__ = ["main", "SCHEMA"]


def _options(values: list[str], flag: str) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` strings as ``{NAME: {KEY: VALUE}}`` (VALUE parsed as JSON when it is JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for item in values:
        name, dot, rest = item.partition(".")
        key, eq, raw = rest.partition("=")
        if not (dot and eq and name and key):
            raise ValueError(f"{flag} expects NAME.KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``mlflow-er bench`` argument parser."""
    p = argparse.ArgumentParser(prog="mlflow-er bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition, targets not judged: "
                   "a smoke run of ~15 s")
    p.add_argument("--repeat", type=int, default=None, help="repetitions per workload × contender (default 3, "
                   "quick 1)")
    p.add_argument("--workloads", default=None, help=f"comma-separated subset of {WORKLOADS} (default all; "
                   "'flaky' needs --start-server: it kills and restarts the server)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated names or glob patterns (e.g. 'mlflow-*,er-threaded/*'); default all")
    store = p.add_mutually_exclusive_group()
    store.add_argument("--tracking-uri", default=None, help="an existing store, e.g. http://127.0.0.1:5000 "
                       "(default: a fresh SQLite store in a temporary folder)")
    store.add_argument("--start-server", action="store_true",
                       help="start a local 'mlflow server' (SQLite, --serve-artifacts) on 127.0.0.1 for the run")
    p.add_argument("--jobs", type=int, default=None, help="tasks at a time, each in its own child (default 1; "
                   "--quick: 2). More than 1 makes the figures noisier: for smoke runs")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    p.add_argument("--plot", metavar="PNG", default=None, help="also save a plot (needs matplotlib)")
    p.add_argument("--epochs", type=int, default=None, help="seed workload: epochs (default 5)")
    p.add_argument("--compute", type=float, default=None, help="seed workload: simulated compute per epoch, s")
    p.add_argument("--file-mb", type=int, default=None, help="seed workload: size of the file artifact, MB "
                   "(default 32)")
    p.add_argument("--sink-option", action="append", default=[], metavar="SINK.KEY=VALUE",
                   help="an option for a sink, e.g. spool.path=/tmp/spool (repeatable)")
    p.add_argument("--backend-option", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                   help="an option for a backend, e.g. threaded.flush_interval=0.1 (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store and the child logs")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        info["cpu_model"] = platform.processor() or "?"
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for dist, key in (("mlflow", "mlflow"), ("mlflow-er", "mlflow_er")):
        try:
            info[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[key] = "?"
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _select(contenders: list[Contender], patterns: str | None) -> list[Contender]:
    if not patterns:
        return contenders
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [c for c in contenders if _matches(c.name, pats)]


#: Left out of ``--quick`` unless named with ``--contenders``: variants whose figures the quick
#: run's smoke check does not need (the full bench runs them), and the peers (tensorboardX
#: imports torch when it is installed: seconds per child).
QUICK_LEAVES_OUT = ("mlflow-async", "mlflow-scheme-threaded", "mlflow-scheme-process", "er-sync/spool", "*/spool[*",
                    "peer", "er-threaded/mlflow-orm")


def _quick_keeps(c: Contender) -> bool:
    return not any(c.kind == p or _matches(c.name, [p]) for p in QUICK_LEAVES_OUT)


def _plan_contenders(probed: dict[str, Any], workloads: list[str], patterns: str | None,
                     notes: list[str], skipped: list[dict[str, str]],
                     quick: bool = False, sql_store: bool = False) -> dict[str, list[Contender]]:
    broken = probed.get("broken", {})
    base = mlflow_contenders()
    base += [Contender(name, "peer") for name in probed.get("peers", [])]
    for b in probed["backends"]:
        if f"backend:{b}" in broken:
            skipped.append({"contender": f"er-{b}/*", "reason": broken[f"backend:{b}"]})
            continue
        for s in probed["sinks"]:
            if f"sink:{s}" in broken:
                skipped.append({"contender": f"er-{b}/{s}", "reason": f"sink needs options it was not given "
                                f"(pass --sink-option {s}.KEY=VALUE): {broken[f'sink:{s}']}"})
                continue
            base.append(er_contender(b, s))
            if sql_store and (b, s) == ("threaded", "mlflow"):
                base.append(orm_contender())
    # Background backends right after raw log_batch (their drain is compared with it), one-request-per-call last.
    base.sort(key=lambda c: (c.kind == "peer", c.kind == "er", c.kind == "er" and c.per_call))
    everyone = list(base)
    if quick and not patterns:
        left = sorted({c.name for c in base if not _quick_keeps(c)})
        base = [c for c in base if _quick_keeps(c)]
        notes.append(f"quick: left out (the full bench runs them; or name them with --contenders): "
                     f"{', '.join(left)}, */spool[policy]")
    chosen = _select(base, patterns)
    plan: dict[str, list[Contender]] = {}
    chosen_names = {c.name for c in chosen}
    pats = [p.strip() for p in (patterns or "").split(",") if p.strip()]
    for w in workloads:
        if w == "flaky":  # a picture of two families: even --quick keeps both
            plan[w] = [c for c in _select(everyone, patterns) if applies(w, c)]
            continue
        if w != "memory":
            plan[w] = [c for c in chosen if applies(w, c)]
            continue
        cands: list[Contender] = []
        for c in base:  # one memory contender per backpressure policy the backend accepts
            if c.kind == "er":
                cands.extend(c.with_policy(p) for p in probed.get("policies", {}).get(c.backend, [])
                             if not quick or patterns or _quick_keeps(c.with_policy(p)))
            elif applies(w, c):
                cands.append(c)
        # selected by its own name (er-threaded/mlflow[drop]) or by its contender's (er-threaded/mlflow)
        plan[w] = [c for c in cands if c.name.split("[")[0] in chosen_names or _matches(c.name, pats)]
        for key, why in broken.items():
            name = key.partition(":")[2]
            if key.startswith("policy:") and name.split("[")[0] in probed.get("policies", {}):
                notes.append(f"memory: {name} not run: {why}")
    if not any(plan.values()):
        raise ValueError(f"--contenders {patterns!r} selects nothing to run; contenders: "
                         f"{', '.join(c.name for c in base)} (memory: NAME[block|drop|...])")
    return plan


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 if a task failed, or 2 on bad usage."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    workloads = [w.strip() for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        print(f"mlflow-er bench: error: unknown workload(s) {unknown}; choose from {WORKLOADS}", file=sys.stderr)
        return 2
    early_notes: list[str] = []
    if "flaky" in workloads and not args.start_server:
        if args.workloads:
            print("mlflow-er bench: error: the flaky workload kills and restarts the tracking server, so it needs "
                  "one this bench starts: add --start-server", file=sys.stderr)
            return 2
        workloads.remove("flaky")
        early_notes.append("flaky: not run (it kills and restarts the server): add --start-server")
    if args.plot and (problem := report.check_plot_available()):
        print(f"mlflow-er bench: error: {problem}", file=sys.stderr)
        return 2
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        print("mlflow-er bench: error: --repeat must be at least 1", file=sys.stderr)
        return 2
    jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    if jobs < 1:
        print("mlflow-er bench: error: --jobs must be at least 1", file=sys.stderr)
        return 2
    sizes = sizes_for(args.quick, seed_epochs=args.epochs, seed_compute_s=args.compute, seed_file_mb=args.file_mb)
    try:
        sink_opts = _options(args.sink_option, "--sink-option")
        backend_opts = _options(args.backend_option, "--backend-option")
    except ValueError as exc:
        print(f"mlflow-er bench: error: {exc}", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    machine = _machine()
    workdir = tempfile.mkdtemp(prefix="mlflow-er-bench-")
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir)
    zygote = Zygote(log_dir).start()  # imports MLflow while the store is being prepared
    helpers = [Zygote(log_dir).start() for _ in range(jobs - 1)] if zygote.fork else []
    store = None
    try:
        progress("mlflow-er bench: " + ("starting a local mlflow server..." if args.start_server else "preparing..."))
        store = open_store(args.tracking_uri, args.start_server, keep=args.keep, workdir=Path(workdir))
        ctx = Context(store.uri, "", workdir, str(store.artifact_root) if store.artifact_root else None,
                      sink_opts, backend_opts)
        ok, probed = zygote.run(Task("setup", ctx, sizes, os.path.join(log_dir, "setup.log"), None,
                                     store.artifact_location), 180.0)
        if not ok:
            print(f"mlflow-er bench: error: could not set up the store {store.describe()['uri']}:\n{probed}",
                  file=sys.stderr)
            return 1
        ctx.experiment_id = probed["experiment_id"]
        progress(f"mlflow-er bench: store and plugins ready after {time.perf_counter() - started:.1f}s")
        notes: list[str] = list(early_notes)
        skipped: list[dict[str, str]] = list(probed.get("peers_skipped", []))
        try:
            plan = Plan(workloads, _plan_contenders(probed, workloads, args.contenders, notes, skipped, args.quick,
                                         sql_store=not store.uri.startswith(("http:", "https:"))),
                        repeat,
                        sizes)
        except ValueError as exc:
            print(f"mlflow-er bench: error: {exc}", file=sys.stderr)
            return 2
        if "memory" in workloads and plan.contenders["memory"]:
            notes.append(f"memory: MLflow async contenders make {sizes.memory_mlflow_calls:,} calls (~100 µs each); "
                         "'MB per 1M' extrapolates their growth linearly; its writer is stalled by patching its "
                         "queue's log function, mlflow-er's by patching its sink's write_batch")
        if any(c.per_call for w in ("latency", "throughput") for c in plan.contenders.get(w, [])):
            notes.append("latency/throughput: contenders that send one request per call (mlflow-sync, "
                         "mlflow-async, er-sync) log fewer records or stop at a time budget; rates and "
                         "percentiles are per call, so they compare")
        if "loop" in workloads and plan.contenders.get("loop"):
            notes.append("loop: µs lost per metric = (wall with logging − wall without) / metrics, in one child, "
                         "windows alternating; it includes background threads' interpreter-lock time during the "
                         "window; delivery left at the window's end is not (see 'delivered %' and 'drain s'). "
                         "'delivered %' of MLflow async counts its queue only (a batch being sent counts as "
                         "delivered); W&B and tensorboardX do not say")
        if helpers:
            notes.append(f"{len(helpers) + 1} tasks at a time (--jobs): the figures are noisier than one at a time")
        outcome = run_plan(plan, ctx, zygote, log_dir, progress, keep=args.keep, server=store.server,
                           helpers=helpers)
        notes.extend(outcome.notes)
        if hasattr(os, "getloadavg"):
            machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        summary = report.summarize(outcome.results)
        rat = report.ratios(outcome.results)
        names = {w: [c.name for c in cs] for w, cs in plan.contenders.items()}
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "command": "mlflow-er bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "store": store.describe(),
            "settings": {"quick": args.quick, "repeat": repeat, "jobs": jobs, "workloads": workloads,
                         "sizes": {k: v for k, v in vars(sizes).items()}},
            "contenders": names, "skipped": skipped,
            "legend": legend(sorted({n for ns in names.values() for n in ns})),
            "peers": probed.get("peer_versions", {}), "workloads": summary,
            "ratios": rat, "targets": report.targets(summary, rat, names, args.quick, store.kind),
            "timelines": outcome.timelines,
            "errors": outcome.errors, "notes": notes, "seconds": round(time.perf_counter() - started, 1),
        }
        if args.keep:
            doc["notes"].append(f"store and logs kept in {store.workdir}")
        if args.plot:
            from .plot import plot

            doc["plot"] = {"path": args.plot, "panels": plot(doc, args.plot)[1]}
            progress(f"plot saved to {args.plot}")
        try:
            print(json.dumps(doc, indent=2) if args.json else report.text_report(doc), flush=True)
        except BrokenPipeError:  # e.g. piped into `head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1 if outcome.errors else 0
    finally:
        zygote.close()
        for helper in helpers:
            helper.close()
        if store is not None:
            store.close()
        elif not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
