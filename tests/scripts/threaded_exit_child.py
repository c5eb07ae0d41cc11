"""Child process for ``test_threaded_process``: log to a server that refuses log-batch, then end.

Usage: ``python threaded_exit_child.py URI MODE CLOSE_TIMEOUT EXPERIMENT``

* ``atexit``: leave the run open and fall off the end of the script; the backend's atexit
  drain must give up within ``close_timeout`` and log how many records are unsent.
* ``block``: end the ``with tracker.run()`` block normally; closing raises ``DeliveryError``.
* ``sigterm``: keep logging inside the block until the parent sends SIGTERM.

Prints ``ready`` on stdout once the records are queued.
"""

from __future__ import annotations

import sys
import time

from mlflow_er import ExperimentTracker
from mlflow_er.backends.threaded import ThreadedBackend

N = 500
_open_runs = []  # keeps an unclosed run's context alive until interpreter exit


def main() -> None:
    uri, mode, close_timeout, experiment = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    backend = ThreadedBackend(close_timeout=close_timeout)
    tracker = ExperimentTracker(experiment, tracking_uri=uri, backend=backend, close_timeout=close_timeout)
    if mode == "atexit":
        ctx = tracker.run(run_name=mode)
        run = ctx.__enter__()
        _open_runs.append(ctx)
        for i in range(N):
            run.log_metric("m", float(i), step=i)
        print("ready", flush=True)
        return
    with tracker.run(run_name=mode) as run:
        for i in range(N):
            run.log_metric("m", float(i), step=i)
        print("ready", flush=True)
        if mode == "sigterm":
            i = N
            while True:
                run.log_metric("m", float(i), step=i)
                i += 1
                time.sleep(0.01)


if __name__ == "__main__":
    main()
