"""Training on nodes that cannot reach the tracking server: spool to an object store, sync from a login node.

Each compute node (or job) logs with ``sinks=["spool"]``: records go to a crash-safe local
spool and sealed segments are uploaded to an object store; the tracking server is never
contacted (it need not be reachable from the node at all)::

    python examples/offline_cluster.py --upload-url s3://bucket/mlflow-er --run-name "$SLURM_JOB_ID-$(hostname)"

A machine that reaches both the bucket and the server (a login node) replays everything
that arrived, exactly once, on a schedule; a crontab line for every 5 minutes::

    */5 * * * * flock -n /tmp/mlflow-er-sync.lock mlflow-er sync s3://bucket/mlflow-er --tracking-uri https://mlflow.example.org >> $HOME/mlflow-er-sync.log 2>&1

``flock -n`` skips a round while the previous sync still runs; a sync that finds nothing
new prints ``synced 0 record(s)``. For an S3-compatible store (MinIO, Ceph) pass
``--endpoint-url`` here and ``-o endpoint_url=...`` to ``mlflow-er sync``. Credentials come
from the usual places (``AWS_*`` variables, ``~/.aws``, an instance role).
"""  # noqa: E501 (a crontab line cannot be wrapped)

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time
from pathlib import Path

from mlflow_er import ExperimentTracker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upload-url", default=os.environ.get("MLFLOW_ER_SPOOL_UPLOAD_URL"),
                   help="where spools are collected, e.g. s3://bucket/mlflow-er; every node uses the same one "
                        "(default: $MLFLOW_ER_SPOOL_UPLOAD_URL)")
    p.add_argument("--spool-dir", default=None,
                   help="node-local spool folder (default: $MLFLOW_ER_SPOOL_DIR, else one per run in the temp dir)")
    p.add_argument("--endpoint-url", default=None, help="endpoint of an S3-compatible store (MinIO, Ceph, ...)")
    p.add_argument("--experiment", default="offline-cluster")
    p.add_argument("--run-name", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--compute", type=float, default=0.0, help="simulated compute per step, seconds")
    args = p.parse_args(argv)
    if not args.upload_url:
        p.error("--upload-url (or MLFLOW_ER_SPOOL_UPLOAD_URL) is required")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Node-local disk: the spool fsyncs every few ms, which a shared filesystem does badly.
    spool_dir = args.spool_dir or os.environ.get("MLFLOW_ER_SPOOL_DIR") or \
        str(Path(tempfile.gettempdir()) / f"mlflow-er-spool-{args.run_name}")
    spool_options: dict = {"path": spool_dir, "upload_url": args.upload_url}
    if args.endpoint_url:
        spool_options["upload_options"] = {"endpoint_url": args.endpoint_url}

    # No tracking_uri: an all-spool tracker is offline and contacts no server. On a multi-GPU
    # node, ranks="zero" (the default) keeps every rank but 0 silent.
    tracker = ExperimentTracker(args.experiment, backend="threaded", sinks=["spool"],
                                sink_options={"spool": spool_options}, node=socket.gethostname())
    with tracker.run(run_name=args.run_name, description="trained offline, synced later") as run:
        run.log_params({"lr": 3e-4, "batch_size": 64, "steps": args.steps})
        run.log_dict({"model": "tiny", "layers": 2}, "config.json")
        for step in range(args.steps):
            if args.compute:
                time.sleep(args.compute)
            run.log_metric("loss", math.exp(-step / 200), step=step)
        run.set_tag("phase", "done")
        spool = tracker.sinks[0]
    # Leaving the block sealed the last segment and uploaded what was pending (bounded).
    stats = spool.stats()
    print(f"run id: {run.run_id}")
    print(f"spool: {stats['path']} -> {args.upload_url}: {stats.get('uploaded_segments', 0)} segment(s) uploaded, "
          f"{stats.get('pending_uploads', 0)} pending")


if __name__ == "__main__":
    main()
