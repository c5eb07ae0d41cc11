"""Child for ``test_ranks``: one rank of a fake distributed job (``RANK``/``WORLD_SIZE`` come from the env).

Usage: ``python rank_worker.py URI RANKS STEPS [--backend B] [--done FILE] [--fail-after FILE] [--job-marker FILE]``

Logs ``STEPS`` values of ``loss``, one ``log_metrics`` call (``acc``, ``tput``), two params
(``lr`` the same on every rank, ``seed`` = the rank), a tag and a text artifact, then prints
one JSON line: the rank, ``run.stats()`` taken inside the block, the run id, whether torch
got imported, and the error the block raised, if any.

``--done FILE``: write FILE once the run block has ended. ``--fail-after FILE``: inside the
block, wait (bounded) for FILE, then raise — a rank that fails after rank 0 ended the run.
``--job-marker FILE``: submit a ``background_worker`` job that would create FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mlflow_er import ExperimentTracker


def touch(path: str) -> None:
    Path(path).write_text("ran")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("ranks")
    p.add_argument("steps", type=int)
    p.add_argument("--backend", default="threaded")
    p.add_argument("--done")
    p.add_argument("--fail-after")
    p.add_argument("--job-marker")
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    tracker = ExperimentTracker("ranks-exp", tracking_uri=args.uri, backend=args.backend, ranks=args.ranks)
    stats: dict = {}
    error = None
    run_id = None
    try:
        with tracker.run(run_name="job", description="a 4-rank job") as run:
            run_id = run.run_id
            run.log_params({"lr": 0.01, "seed": rank})
            run.set_tag("written_by", f"rank{rank}")
            run.log_text(f"hello from rank {rank}", f"notes/rank{rank}.txt")
            for i in range(args.steps):
                run.log_metric("loss", 1.0 / (i + 1) + rank, step=i)
            run.log_metrics({"acc": 0.5, "tput": 100.0 + rank}, step=0)
            if args.job_marker:
                tracker.background_worker("job", touch, False, args.job_marker)
            stats = run.stats()
            if args.fail_after:
                deadline = time.monotonic() + 60
                while not Path(args.fail_after).exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                raise RuntimeError(f"rank {rank} fails after rank 0 ended the run")
    except RuntimeError as exc:
        error = str(exc)
    if args.done:
        Path(args.done).write_text("done")
    print(json.dumps({"rank": rank, "stats": stats, "run_id": run_id, "error": error,
                      "torch": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
