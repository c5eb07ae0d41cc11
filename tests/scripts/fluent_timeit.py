"""Per-call cost of ``mlflow.log_metric`` (µs): plain MLflow sync and async, and through ``threaded+``.

    python tests/scripts/fluent_timeit.py [N]

Each contender runs in its own process on a fresh SQLite store in a temp dir (MLflow async with
``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS=1``, as the bench's ``mlflow-async-buf1s``). Noisy on a
shared machine: compare the ratios of one run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys, time, timeit
import mlflow
mode, uri, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mlflow.set_tracking_uri(uri)
kwargs = {"synchronous": False} if mode == "async" else {}
with mlflow.start_run():
    for i in range(20):
        mlflow.log_metric("warm", float(i), step=i, **kwargs)
    calls = {"log_metric": lambda i: mlflow.log_metric("loss", 0.5, step=i, **kwargs),
             "log_param": lambda i: mlflow.log_param(f"p{i}", i, **kwargs),
             "set_tag": lambda i: mlflow.set_tag("phase", str(i), **kwargs)}
    for name, call in calls.items():
        k = n if mode != "sync" else max(50, n // 20)
        t0 = time.perf_counter()
        for i in range(k):
            call(i)
        print(f"{name} {(time.perf_counter() - t0) / k * 1e6:.1f}")
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "1"}
        contenders = [("mlflow sync", "sync", "sqlite:///{}/sync.db", {}),
                      ("mlflow async (buf 1 s)", "async", "sqlite:///{}/async.db", {}),
                      ("threaded+ fast path off", "sync", "threaded+sqlite:///{}/off.db",
                       {"MLFLOW_ER_FLUENT_FAST_PATH": "0"}),
                      ("threaded+", "sync", "threaded+sqlite:///{}/on.db", {})]
        for label, mode, uri, extra in contenders:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, uri.format(tmp), str(n)], env={**env, **extra},
                                 capture_output=True, text=True, timeout=600, cwd=tmp)
            if out.returncode:
                sys.exit(out.stderr)
            print(f"{label:26s} " + "  ".join(f"{line.split()[0]} {line.split()[1]:>7s} us"
                                                for line in out.stdout.splitlines()))


if __name__ == "__main__":
    main()
