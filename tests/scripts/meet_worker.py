"""Child for ``test_ranks``: one rank of a multi-host job that meets the others through the server.

Usage: ``python meet_worker.py URI STEPS [--run-name NAME]``

The launcher's variables (``RANK``, ``WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``, ...) come from
the environment; ``MLFLOW_ER_RANK_DIR`` is unset and ``TMPDIR`` is this rank's own, so the
ranks share no folder. Logs ``STEPS`` values of ``loss`` (keys become ``loss/rank{r}``) and a
param, then prints one JSON line: the rank, the run id and ``run.stats()`` taken in the block.
"""

from __future__ import annotations

import argparse
import json
import os

from mlflow_er import ExperimentTracker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("steps", type=int)
    p.add_argument("--run-name", default=None)
    args = p.parse_args()
    assert "MLFLOW_ER_RANK_DIR" not in os.environ
    rank = int(os.environ["RANK"])
    tracker = ExperimentTracker("meet-exp", tracking_uri=args.uri, backend="threaded", ranks="all")
    with tracker.run(run_name=args.run_name) as run:
        run.log_param("world", os.environ["WORLD_SIZE"])
        for i in range(args.steps):
            run.log_metric("loss", 1.0 / (i + 1) + rank, step=i)
        run.flush(timeout=60)
        stats = run.stats()
    print(json.dumps({"rank": rank, "run_id": run.run_id, "stats": stats}))


if __name__ == "__main__":
    main()
