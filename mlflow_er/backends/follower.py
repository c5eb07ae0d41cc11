"""The ``process`` backend's delivery process: follows a spool queue and delivers it.

Started by :class:`~mlflow_er.backends.process.ProcessBackend` as a fresh interpreter
(``python -m mlflow_er.backends.follower QUEUE_DIR``; never a ``fork()``), in a session of its
own so a Ctrl-C meant for training does not cut delivery short. It builds the same pipeline
the training process would have built (from ``config.json``: sink names and contexts), then:

* reads the queue's segments in order (``SpoolReader``; a torn tail is simply not read yet) and
  hands the records to the pipeline;
* publishes ``status.json`` (records delivered so far, in stream order; its position) and appends
  failed records to ``failures.jsonl`` — what the training process's ``flush()`` waits for and raises;
* resumes from the last published position after a restart (a chunk delivered but not yet published
  is delivered again: MLflow stores an identical metric row once);
* when the training process is gone (``os.getppid()`` changed) it finishes what was written, ends the
  runs that never got their end as ``KILLED``, and exits; on ``close`` it drains and exits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..records import Artifact, RunEnd, RunStart

log = logging.getLogger("mlflow_er.follower")

CONFIG = "config.json"
STATUS = "status.json"
FAILURES = "failures.jsonl"
CLOSE = "close"
_CHUNK = 20_000


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Replace ``path`` atomically (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Follower:
    """One delivery process's state (see the module docstring)."""

    def __init__(self, root: Path):
        from ..delivery import RetryPolicy
        from ..hookspecs import SinkContext
        from ..pipeline import build
        from ..spool.reader import Position, SpoolReader

        self.root = root
        cfg = json.loads((root / CONFIG).read_text())
        self.parent = int(cfg["parent_pid"])
        contexts = {name: SinkContext(**ctx) for name, ctx in cfg["specs"]}
        self.tracking_uri = cfg.get("tracking_uri")
        self.pipeline = build(list(contexts), contexts.__getitem__, policy=RetryPolicy(cfg["retry_deadline"]),
                              tracking_uri=self.tracking_uri, keep_dir=root)
        self.reader = SpoolReader(root, warn=False)
        status = read_json(root / STATUS) or {}
        where = status.get("position")
        self.pos = Position(*where) if where else None
        self.safe_pos = self.pos  # position up to which every lane has passed (published)
        self.delivered = int(status.get("delivered", 0))  # records of the stream delivered, in order
        self.handed = self.delivered
        self.live: dict[str, None] = {}  # runs started and not ended, in order
        self.failed = int(status.get("failed", 0))
        self._published: dict[str, Any] | None = None
        self._published_at = 0.0

    def _read(self) -> list[Any]:
        from .spill import _from_spool

        items: list[Any] = []
        last = None
        for rec, where in self.reader.records(after=self.pos):
            items.append(self._resolve(_from_spool(rec)))
            last = where
            if len(items) >= _CHUNK:
                break
        if last is not None:
            self.pos = last
        return items

    def _resolve(self, item: Any) -> Any:
        t = type(item)
        if t is Artifact and item.local_path and not os.path.isabs(item.local_path):
            return item._replace(local_path=str(self.root / item.local_path))
        if t is RunStart:
            self.live[item.run_id] = None
        elif t is RunEnd:
            self.live.pop(item.run_id, None)
        return item

    def publish(self) -> None:
        unsent = self.pipeline.unsent()
        failures = self.pipeline.take_failures()
        if failures:
            self.failed += len(failures)
            with open(self.root / FAILURES, "a", encoding="utf-8") as f:
                for x in failures:
                    f.write(json.dumps({"kind": x.kind, "key": x.key, "reason": x.reason, "run_id": x.run_id,
                                        "permanent": x.permanent}) + "\n")
        if unsent == 0:
            self.safe_pos = self.pos
        self.delivered = self.handed - unsent
        where = self.safe_pos
        counters = self.pipeline.stats()
        status = {"delivered": self.delivered, "failed": self.failed, "pid": os.getpid(),
                  "retries": counters["retries"], "batches": counters["batches"], "lanes": counters["lanes"],
                  "position": [where.segment, where.offset, where.count] if where else None}
        now = time.monotonic()
        # Idle, the same status 50 times a second is pure cost on the training box's cores: rewrite
        # it when it changes, and once a second as a heartbeat ("time").
        if status == self._published and now - self._published_at < 1.0:
            return
        write_json(self.root / STATUS, {**status, "time": time.time()})
        self._published, self._published_at = status, now

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent

    def run(self) -> int:
        from ..pipeline import _LIFECYCLE

        last_publish = 0.0
        last_items = time.monotonic()
        while True:
            items = self._read()
            if items:
                self.handed += sum(1 for it in items if type(it) not in _LIFECYCLE)
                self.pipeline.deliver(items)
            now = time.monotonic()
            if items or now - last_publish > 0.02:
                self.publish()
                last_publish = now
            stopping = (self.root / CLOSE).exists() or self.parent_gone()
            if stopping and not items and self.pipeline.unsent() == 0:
                break
            if items:
                last_items = now
            else:
                # 10 ms polls while records flow; after a second without any, 50 ms (the appender
                # writes every 50 ms anyway): an idle delivery process then costs ~1 % of a core.
                time.sleep(0.01 if now - last_items < 1.0 else 0.05)
        orphaned = self.parent_gone() and not (self.root / CLOSE).exists()
        if orphaned and self.live:
            self._end_killed()
        try:
            self.pipeline.close(30.0)
        except Exception as exc:
            log.error("mlflow-er delivery process: %s", exc)
        self.publish()
        return 0

    def _end_killed(self) -> None:
        """The training process died: its runs that never ended are KILLED (the spool says so)."""
        from ..records import RunEnd

        ends = [RunEnd(rid, time.time_ns() // 1_000_000, 2**62, "KILLED") for rid in self.live]
        self.pipeline.deliver(ends)
        self.pipeline.flush(30.0)
        if not self.tracking_uri:
            return
        try:
            from mlflow import MlflowClient

            from ..mlflow_uris import inner_uri

            client = MlflowClient(inner_uri(self.tracking_uri))
            for rid in ends:
                client.set_terminated(rid.run_id, "KILLED")
        except Exception as exc:  # offline, or the server is gone too: `mlflow-er sync` ends them later
            log.error("mlflow-er delivery process: could not mark runs KILLED: %s", exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the delivery process: ``python -m mlflow_er.backends.follower QUEUE_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0])
    logging.basicConfig(filename=str(root / "delivery.log"), level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return Follower(root).run()
    except Exception:
        log.exception("mlflow-er delivery process crashed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
