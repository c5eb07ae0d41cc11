"""Many writers into one production-shaped server: mlflow-er threaded vs MLflow's async logging.

    python bench/scale.py                       # 16 processes x 20 000 metrics, all four scenarios
    python bench/scale.py --procs 1,4,16 --metrics 20000 --shed 4 --json out.json

Starts PostgreSQL + moto S3 + ``mlflow server`` (tests/pg.py; ``--workers`` uvicorn workers),
then for each scenario starts ``--procs`` processes that wait at a barrier and log
``--metrics`` values of one metric each as fast as they can:

* ``er-one``: mlflow-er ``backend="threaded"``, ``ranks="all"`` — every process a rank of one
  job, all into one run (keys ``loss/rank{r}``; the ranks meet through the server);
* ``er-each``: mlflow-er threaded, one run per process;
* ``async-one`` / ``async-each``: ``mlflow.log_metric(..., synchronous=False)`` into one run
  created beforehand / one run per process, then ``mlflow.flush_async_logging()``; with
  ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` = ``--async-buffer`` (default 1: MLflow merges
  queued calls into batches; 0 leaves it unset, one request per call, ~40 records/s here).

``--shed N`` puts a load-shedding proxy in front of the server (what an nginx ``limit_req``
gateway does): more than N requests in flight get 503 or 429 with ``Retry-After: 1``.

Reported per scenario: rows in PostgreSQL vs records logged (each must be stored exactly
once: ``count(*)`` and ``count(DISTINCT (run, key, step))`` both equal procs x metrics),
server-side records/s (rows counted in PostgreSQL from the barrier to the last row), the
client loop cost per metric (median over processes: what the training loop paid), the
drain time after the loop, and the replies the proxy shed. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
SCENARIOS = ("er-one", "er-each", "async-one", "async-each")


# -- the worker: one training process ----------------------------------------------------------
def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scale.py worker")
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("uri")
    p.add_argument("metrics", type=int)
    p.add_argument("go")
    p.add_argument("--run-id")
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    import mlflow

    def barrier() -> None:
        print("ready", flush=True)
        deadline = time.monotonic() + 600
        while not os.path.exists(a.go):
            if time.monotonic() > deadline:
                raise SystemExit("no go signal within 600s")
            time.sleep(0.01)

    out: dict[str, Any] = {"rank": rank}
    if a.scenario.startswith("er-"):
        from mlflow_er import ExperimentTracker

        ranks = "all" if a.scenario == "er-one" else "each"
        tracker = ExperimentTracker("scale", tracking_uri=a.uri, backend="threaded", ranks=ranks)
        # A name of this launch only: a run found by name is resumed (the seed's rule).
        each_name = f"er-each-{os.environ.get('MLFLOW_ER_LAUNCH_ID', '')[:8]}-{rank}"
        with tracker.run(run_name=None if ranks == "all" else each_name) as run:
            barrier()
            t = time.perf_counter()
            for i in range(a.metrics):
                run.log_metric("loss", i * 1e-3, step=i)
            out["loop_s"] = time.perf_counter() - t
            t = time.perf_counter()
            run.flush(timeout=1200)
            out["drain_s"] = time.perf_counter() - t
            out["stats"] = {k: v for k, v in run.stats().items() if isinstance(v, (int, float, str))}
            out["run_id"] = run.run_id
    else:
        mlflow.set_tracking_uri(a.uri)
        key = f"loss/rank{rank}" if a.scenario == "async-one" else "loss"
        if a.run_id:
            active = mlflow.start_run(run_id=a.run_id)
        else:
            mlflow.set_experiment("scale")
            active = mlflow.start_run(run_name=f"async-each-{os.environ.get('MLFLOW_ER_LAUNCH_ID', '')[:8]}-{rank}")
        barrier()
        t = time.perf_counter()
        for i in range(a.metrics):
            mlflow.log_metric(key, i * 1e-3, step=i, synchronous=False)
        out["loop_s"] = time.perf_counter() - t
        t = time.perf_counter()
        mlflow.flush_async_logging()
        out["drain_s"] = time.perf_counter() - t
        out["run_id"] = active.info.run_id
        if not a.run_id:
            mlflow.end_run()
    print(json.dumps(out), flush=True)


# -- the parent: server, processes, counting ------------------------------------------------------
def shedding_proxy(upstream: str, limit: int) -> Any:
    """A FaultServer that answers 503/429 (alternately) to requests beyond ``limit`` in flight."""
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import FaultServer, Reply

    class Shedder(FaultServer):
        def __init__(self) -> None:
            super().__init__(upstream=upstream, forward_timeout=120)
            self.inflight = 0
            self.shed = {503: 0, 429: 0}
            self._gate = threading.Lock()

        def _handle(self, h: Any) -> None:
            with self._gate:
                self.inflight += 1
            try:
                super()._handle(h)
            finally:
                with self._gate:
                    self.inflight -= 1

        def _choose(self, path: str) -> Any:
            with self._gate:
                if self.inflight <= limit:
                    return None
                status = 503 if (self.shed[503] + self.shed[429]) % 2 == 0 else 429
                self.shed[status] += 1
            return Reply(status=status, headers={"Retry-After": "1"}, forward=False,
                         body={"error_code": "TEMPORARILY_UNAVAILABLE", "message": "shed"})

    proxy = Shedder()
    proxy._requests = _NoList()  # type: ignore[assignment]  # don't keep 100 000s of request bodies
    return proxy.start()


class _NoList(list):  # type: ignore[type-arg]
    def append(self, item: Any) -> None:
        pass


def run_scenario(prod: Any, uri: str, scenario: str, procs: int, metrics: int, tmp: Path,
                 async_buffer: int = 1) -> dict[str, Any]:
    go = tmp / f"go-{uuid.uuid4().hex[:8]}"
    run_id = None
    if scenario == "async-one":
        from mlflow import MlflowClient

        client = MlflowClient(prod.uri)
        exp = client.get_experiment_by_name("scale") or client.get_experiment(client.create_experiment("scale"))
        run_id = client.create_run(exp.experiment_id, run_name=f"async-one-{procs}").info.run_id
    launch = uuid.uuid4().hex
    children = []
    for r in range(procs):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MLFLOW_ER_RANK_DIR")}
        env.update(RANK=str(r), WORLD_SIZE=str(procs), MLFLOW_ER_LAUNCH_ID=launch, MLFLOW_ER_RANK_TIMEOUT="600",
                   PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                   MLFLOW_ER_STAGING_DIR=str(tmp / f"staging-{scenario}-{r}"))
        env.pop("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", None)
        if scenario.startswith("async") and async_buffer > 0:
            # An int: MLflow 3.17 rejects "1.0" inside its logging thread, and flush_async_logging() then hangs.
            env["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = str(async_buffer)
        argv = [sys.executable, str(HERE), "worker", scenario, uri, str(metrics), str(go)]
        if run_id:
            argv += ["--run-id", run_id]
        # stderr to a file: a pipe nobody reads while waiting on another worker fills and blocks it.
        with open(tmp / f"{scenario}-{procs}-{r}.err", "w") as err:
            children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                             stdin=subprocess.DEVNULL))
    for c in children:  # every process imported mlflow and made its run: start together
        seen = []
        while c.stdout is not None and (line := c.stdout.readline()) and line.strip() != "ready":
            seen.append(line)  # whatever MLflow printed first
        if not line:  # the worker exited before the barrier
            for other in children:
                other.kill()
            raise RuntimeError(f"worker not ready: {''.join(seen)[-2000:]} (stderr in {tmp})")
    base = _rows(prod)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), _rows(prod) - base))
            done.wait(0.25)

    t0 = time.monotonic()
    go.write_text("go")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    for c in children:
        out, _ = c.communicate(timeout=3600)
        if c.returncode != 0:
            raise RuntimeError(f"worker failed ({c.returncode}): stderr in {tmp}")
        # MLflow's end_run prints "View run ..." lines on stdout too.
        results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]))
    wall = time.monotonic() - t0
    done.set()
    sampler.join()
    run_ids = sorted({r["run_id"] for r in results})
    total, distinct = prod.sql("SELECT count(*), count(DISTINCT (run_uuid, key, step)) FROM metrics "
                               "WHERE run_uuid = ANY(%s)", run_ids)[0]
    final = max((n for _, n in samples), default=0)
    last = next((t for t, n in samples if n >= final), t0 + wall)
    loop = [r["loop_s"] / metrics * 1e6 for r in results]
    return {
        "scenario": scenario, "procs": procs, "metrics_per_proc": metrics, "expected": procs * metrics,
        "rows": int(total), "distinct": int(distinct), "runs": len(run_ids),
        "server_records_per_s": round(int(total) / max(last - t0, 1e-6)),
        "loop_us_per_metric_median": round(statistics.median(loop), 2),
        "loop_us_per_metric_max": round(max(loop), 2),
        "drain_s_max": round(max(r["drain_s"] for r in results), 2), "wall_s": round(wall, 2),
        "retries": sum(int(r.get("stats", {}).get("retries", 0)) for r in results),
    }


def _rows(prod: Any) -> int:
    return int(prod.sql("SELECT count(*) FROM metrics")[0][0])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="16", help="comma-separated process counts (a ramp), default 16")
    p.add_argument("--metrics", type=int, default=20_000, help="metrics per process (default 20000)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--workers", type=int, default=4, help="mlflow server (uvicorn) workers")
    p.add_argument("--shed", type=int, default=0, help="shed requests beyond N in flight with 503/429 (0: off)")
    p.add_argument("--async-buffer", type=int, default=1,
                   help="MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS for the async scenarios (0: unset)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    import signal

    # SIGTERM (timeout, kill) must still stop the server and PostgreSQL: turn it into SystemExit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(ROOT / "tests"))
    from pg import Production
    from servers import MotoS3

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-er-scale-"))
    print(f"work dir (worker stderr): {tmp}", flush=True)
    s3 = MotoS3().start()
    prod = Production(tmp / "server", s3, workers=a.workers)
    proxy = None
    rows = []
    try:
        prod.start()
        uri = prod.uri
        if a.shed:
            proxy = shedding_proxy(prod.uri, a.shed)
            uri = proxy.uri
        for procs in [int(x) for x in a.procs.split(",")]:
            for scenario in a.scenarios.split(","):
                before = dict(proxy.shed) if proxy else {}
                row = run_scenario(prod, uri, scenario, procs, a.metrics, tmp, a.async_buffer)
                if proxy:
                    row["shed"] = {k: proxy.shed[k] - before.get(k, 0) for k in proxy.shed}
                row["stored_once"] = row["rows"] == row["distinct"] == row["expected"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        prod.stop()
        s3.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    print(f"\n{'scenario':<11} {'procs':>5} {'rows':>8} {'once':>5} {'srv rec/s':>9} {'loop us/m':>9} "
          f"{'drain s':>8} {'retries':>7} shed")
    for r in rows:
        print(f"{r['scenario']:<11} {r['procs']:>5} {r['rows']:>8} {str(r['stored_once']):>5} "
              f"{r['server_records_per_s']:>9} {r['loop_us_per_metric_median']:>9} {r['drain_s_max']:>8} "
              f"{r['retries']:>7} {r.get('shed', '')}")
    if not all(r["stored_once"] for r in rows):
        raise SystemExit("some records were lost or stored twice")


if __name__ == "__main__":
    main()
