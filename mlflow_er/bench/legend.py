"""What each contender name means: the report's legend."""

from __future__ import annotations

from .contenders import (
    BUFFERING_ENV,
    MLFLOW_ASYNC,
    MLFLOW_ASYNC_BUF,
    MLFLOW_SCHEME,
    MLFLOW_SCHEME_PROCESS,
    MLFLOW_SYNC,
    RAW,
)

_BACKEND_MEANING = {"sync": "inline, in the log call", "threaded": "from a writer thread in the training process",
                    "process": "from a spawned delivery process"}
_SINK_MEANING = {"mlflow": "the tracking store", "spool": "the local durable spool (no server involved)"}
_POLICY_MEANING = {"block": "wait, then raise QueueFull", "drop": "drop and count", "spill": "spill to the local spool"}


def legend(names: list[str]) -> dict[str, str]:
    """What each contender name means, for the report's legend."""
    from .peers import TENSORBOARDX, WANDB

    fixed = {
        MLFLOW_SYNC: "MLflow fluent mlflow.log_metric, synchronous (MLflow's default)",
        MLFLOW_ASYNC: "MLflow fluent API with synchronous=False (its async logging queue)",
        MLFLOW_ASYNC_BUF: f"MLflow async with {BUFFERING_ENV}=1 (it batches up to 1 s of calls)",
        RAW: "MlflowClient.log_batch of prebuilt entities, 1000 per request: the store's own limit",
        MLFLOW_SCHEME: "unchanged fluent mlflow.log_* code on the threaded+<uri> tracking URI (mlflow-er beneath)",
        MLFLOW_SCHEME_PROCESS: "unchanged fluent mlflow.log_* code on the process+<uri> tracking URI",
        WANDB: "Weights & Biases offline: wandb.init(mode='offline'), one run.log of the 5 metrics per step",
        TENSORBOARDX: "tensorboardX SummaryWriter.add_scalar, one per metric",
    }
    out: dict[str, str] = {}
    for name in names:
        if name in fixed:
            out[name] = fixed[name]
            continue
        base, _, policy = name.partition("[")
        if not base.startswith("er-") or "/" not in base:
            continue
        backend, _, sink = base[3:].partition("/")
        text = (f"mlflow-er backend '{backend}' ({_BACKEND_MEANING.get(backend, 'a plugin')}) delivering to sink "
                f"'{sink}' ({_SINK_MEANING.get(sink, 'a plugin')})")
        if policy:
            p = policy.rstrip("]")
            text += f"; on_full='{p}' ({_POLICY_MEANING.get(p, 'a policy')}) with the writer stalled"
        out[name] = text
    return out


def legend_lines(names: list[str]) -> list[str]:
    """The legend as a few text lines: each fixed name, then the ``er-BACKEND/SINK[POLICY]`` pattern once."""
    full = legend(names)
    plain = [n for n in names if not n.startswith("er-")]
    er = [n for n in names if n.startswith("er-") and "/" in n]
    width = max([len(n) for n in plain] + [len("er-BACKEND/SINK[POLICY]")])
    lines = [f"  {n.ljust(width)}  {full[n]}" for n in plain if n in full]
    if er:
        backends = sorted({n[3:].split("/")[0] for n in er})
        sinks = sorted({n.split("/")[1].split("[")[0] for n in er})
        policies = sorted({n.split("[")[1].rstrip("]") for n in er if "[" in n})
        lines.append(f"  {'er-BACKEND/SINK'.ljust(width)}  mlflow-er: backend BACKEND delivering to sink SINK")
        lines.append(f"  {''.ljust(width)}    backends: " + "; ".join(
            f"{b} = {_BACKEND_MEANING.get(b, 'a plugin')}" for b in backends))
        lines.append(f"  {''.ljust(width)}    sinks: " + "; ".join(
            f"{s} = {_SINK_MEANING.get(s, 'a plugin')}" for s in sinks))
        if policies:
            lines.append(f"  {'er-BACKEND/SINK[POLICY]'.ljust(width)}  memory workload, writer stalled, on_full="
                         "POLICY: " + "; ".join(f"{p} = {_POLICY_MEANING.get(p, 'a policy')}" for p in policies))
    return lines
