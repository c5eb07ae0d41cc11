"""What each contender name means: the report's legend."""

from __future__ import annotations

from .contenders import BUFFERING_ENV, MLFLOW_ASYNC, MLFLOW_ASYNC_BUF, MLFLOW_SCHEME, MLFLOW_SYNC, RAW

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
