"""Profile what a Python-bound loop's logging costs, thread by thread (issue 12's profile).

Run the bench's loop step (``mlflow_er.bench.loop``: ~200 µs of pure Python, then 5 metrics)
for 30,000 steps under py-spy, sampling only the thread that holds the interpreter lock::

    py-spy record -r 200 --threads --gil -f raw -o /tmp/gil.txt -- \\
        python tests/scripts/loop_profile.py run threaded mlflow      # or: process spool, ...
    python tests/scripts/loop_profile.py top /tmp/gil.txt lane        # frames of threads matching 'lane'

``run BACKEND SINK`` logs to a fresh SQLite store (``MLFLOW_ER_SQL_FAST_PATH=0`` shows the
ORM path of before). ``top FILE [MATCH]`` prints GIL samples per thread, then the inclusive
and self frames of the samples whose stack contains MATCH.
"""

from __future__ import annotations

import collections
import re
import sys
import tempfile
import time

KEYS = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_s")


def run(backend: str, sink: str, steps: int = 30_000) -> None:
    from mlflow_er import ExperimentTracker
    from mlflow_er.bench.loop import _work, calibrate

    n = calibrate()
    uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    tracker = ExperimentTracker(tracking_uri=uri, experiment_name="profile", backend=backend, sinks=[sink],
                                quiet=True)
    with tracker.run(run_name="profile") as r:
        r.log_metric("warm", 1.0)
        r.flush(120)
        t0 = time.perf_counter()
        for i in range(steps):
            _work(n)
            for k in KEYS:
                r.log_metric(k, i * 0.5, step=i)
        window = time.perf_counter() - t0
        r.flush(600)
    print(f"{backend}/{sink}: {steps * len(KEYS)} metrics, window {window:.2f} s", file=sys.stderr)


def top(path: str, match: str = "", rows: int = 40) -> None:
    threads: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames, n = stack.split(";"), int(count)
            threads[frames[0]] += n
            if match and match not in stack:
                continue
            total += n
            own[frames[-1]] += n
            for fr in {re.sub(r":\d+\)", ")", x) for x in frames[1:]}:
                incl[fr] += n
    print("samples per thread:", threads.most_common(8))
    print(f"samples matching {match!r}: {total}")
    for title, counter in (("inclusive", incl), ("self", own)):
        print(f"--- {title}")
        for name, n in counter.most_common(rows):
            print(f"{n:7d} {100 * n / max(total, 1):5.1f}%  {name[:150]}")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["run"]
    if cmd == "run":
        run(*(rest or ["threaded", "mlflow"]))
    elif cmd == "top":
        top(*rest)
    else:
        sys.exit(__doc__)
