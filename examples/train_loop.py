"""The original helper's example workload, scaled down to run in seconds.

A fake training loop: each epoch "computes" (a sleep standing in for GPU time), then logs
a metric, a 480x640 image and a big file; at the end it logs the best model. It prints the
time the loop spent blocked inside logging calls, so backends can be compared:

    python examples/train_loop.py --backend sync
    python examples/train_loop.py --backend threaded
    python examples/train_loop.py --seed-api        # the original background_worker API

By default everything goes to ``./.demo/`` (an SQLite store and its artifacts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np

from mlflow_er import ExperimentTracker, MlflowErError

EXPERIMENT = "Cool Experiment"
DEMO_DIR = Path(".demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5, help="number of epochs (default: 5)")
    p.add_argument("--compute", type=float, default=0.2, help="simulated compute per epoch, seconds (default: 0.2)")
    p.add_argument("--file-mb", type=int, default=32, help="size of the file artifact logged each epoch, MB")
    p.add_argument("--backend", default=os.environ.get("MLFLOW_ER_BACKEND") or "sync",
                   help="any registered backend (default: $MLFLOW_ER_BACKEND or 'sync')")
    p.add_argument("--tracking-uri", default=None,
                   help="tracking URI (default: sqlite:///./.demo/mlflow.db, artifacts in ./.demo/mlartifacts)")
    p.add_argument("--seed-api", action="store_true",
                   help="log through the original background_worker API (a thread for the metric, "
                        "processes for the image and files) instead of the Run methods")
    return p.parse_args(argv)


def store_location(tracking_uri: str | None) -> tuple[str, str | None]:
    """The tracking URI to use and, for a local SQLite store, an artifact folder beside it."""
    if tracking_uri is None:
        DEMO_DIR.mkdir(exist_ok=True)
        tracking_uri = f"sqlite:///{(DEMO_DIR / 'mlflow.db').resolve()}"
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite" and parts.path[1:] not in ("", ":memory:"):
        # Keep artifacts next to the database instead of in ./mlruns of whatever the cwd is.
        db = Path(parts.path[1:]).expanduser().resolve()
        return tracking_uri, (db.parent / "mlartifacts").as_uri()
    return tracking_uri, None


def make_big_file(folder: Path, size_mb: int) -> Path:
    """A file of zeros, written once (the original example used ``dd if=/dev/zero``)."""
    path = folder / "huge_file.bin"
    chunk = bytes(1024 * 1024)
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(chunk)
    return path


def train(args: argparse.Namespace) -> int:
    tracking_uri, artifact_location = store_location(args.tracking_uri)
    tmp = Path(tempfile.mkdtemp(prefix="mlflow-er-train-loop-"))
    rng = np.random.default_rng()
    blocked = 0.0  # seconds the loop spent inside logging calls
    started = time.perf_counter()
    try:
        big_file = make_big_file(tmp, args.file_mb)
        tracker = ExperimentTracker(EXPERIMENT, tracking_uri=tracking_uri, artifact_location=artifact_location,
                                    backend=args.backend)
        mode = "seed background_worker API" if args.seed_api else "Run methods"
        print(f"training {args.epochs} epochs, backend={args.backend}, logging via {mode}")
        run_name = f"train_loop-{args.backend}-{uuid.uuid4().hex[:8]}"  # a fresh run, never a resumed one
        best_loss = float("inf")
        with tracker.run(run_name=run_name, description="examples/train_loop.py") as run:
            for epoch in range(args.epochs):
                time.sleep(args.compute)  # "GPU time"
                loss = float(rng.random())
                image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
                t0 = time.perf_counter()
                if args.seed_api:
                    # The original example's calls, unchanged: a thread for the metric,
                    # fresh processes for the image and the file.
                    tracker.background_worker("metric", mlflow.log_metric, False, "cool_loss", loss, step=epoch)
                    tracker.background_worker("image", mlflow.log_image, True, image, "cool_image.png")
                    tracker.background_worker("file", mlflow.log_artifact, True, str(big_file))
                else:
                    run.log_metric("cool_loss", loss, step=epoch)
                    run.log_image(image, "cool_image.png")
                    run.log_artifact(big_file)
                spent = time.perf_counter() - t0
                blocked += spent
                best_loss = min(best_loss, loss)
                print(f"  epoch {epoch + 1}/{args.epochs}: cool_loss={loss:.4f}  logging {spent:.3f} s", flush=True)

            model = tmp / "best_model.npz"
            np.savez_compressed(model, weights=rng.random((100, 100, 100)).astype(np.float16))
            t0 = time.perf_counter()
            if args.seed_api:
                tracker.background_worker("model", mlflow.log_artifact, True, str(model))
            else:
                run.log_artifact(model)
            blocked += time.perf_counter() - t0
            closing = time.perf_counter()
        # Leaving the block joined background jobs, flushed the backend and ended the run.
        drained = time.perf_counter() - closing
        wall = time.perf_counter() - started
        print(f"time blocked in logging: {blocked:.3f} s (backend={args.backend})")
        print(f"run end (flush and close): {drained:.3f} s")
        print(f"whole run wall time: {wall:.3f} s")
        print(f"run id: {run.run_id}")
        print(f"tracking uri: {tracking_uri}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except MlflowErError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


# The guard matters: background_worker(..., use_process=True) starts fresh interpreters,
# which may import this module again; without it each would re-run the training loop.
if __name__ == "__main__":
    sys.exit(main())
