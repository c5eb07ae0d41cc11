"""``mlflow-er sync``: replay a spool (any fsspec URL) into an MLflow tracking server, exactly once.

State lives beside the segments, per tracking server (``sync/<target>/``, where
``<target>`` is a hash of the credential-free tracking URI), so any host can sync and a
spool can be synced into several servers independently:

* ``lease.json`` — held by the one sync running (:mod:`~mlflow_er.spool.lease`); a second
  sync waits (``wait``) or stops with a message naming the holder;
* ``runs/<original run id>.json`` — the run each spooled run maps to (:mod:`.runs`);
* ``progress/<segment>.json`` — how far the segment is synced: byte offset, record
  count, frame index, ``done`` once a sealed segment is complete, the gaps and failures
  seen, and the ``intent`` of the chunk being sent.

The exactly-once rule (:mod:`~mlflow_er.spool.presence`): records go in write order, in
chunks; before a chunk is sent its intent is saved, after it is delivered the progress
moves past it. Nothing is ever re-sent without first asking the store what it already
holds — after an interrupted sync (the intent is still there) and before retrying a
request that failed in a way that may have reached the store — so a store that appends
duplicates (``file:``) still ends with every record once.

A batch the store keeps answering with its own ``INTERNAL_ERROR`` past the retry
deadline, while the server answers other requests, does not stop every future sync at
it: it is bisected down to the record(s) the store refuses, those are reported failed
(exit code 1) and the sync moves on. A server that does not answer stops the sync
(progress saved, exit code 3). Artifact records may only name files inside the spool's
own ``artifacts/`` folder; anything else (absolute path, ``..``, a symlink out) is
reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FailedRecord
from ..records import Artifact, Batch, Metric, Param, Tag, split_batches
from .errors import SyncError, UnsupportedSpool
from .format import SYNC_DIR, RunInfo
from .lease import DEFAULT_TTL, Lease
from .paths import check_spool, unsafe_artifact
from .reader import Position, Segment, SpoolReader, is_local
from .runs import SOURCE_RUN_TAG, RunMap, call_with_retry
from .upload import write_atomic

log = logging.getLogger(__name__)

__all__ = ["SOURCE_RUN_TAG", "Replayer", "SyncReport", "check_spool", "sync", "target_key"]

DEFAULT_CHUNK = 5000
#: Retries of one record being isolated after its batch kept failing (the batch already had the full deadline).
ISOLATE_DEADLINE = 2.0


@contextmanager
def _mlflow_http_policy(timeout: float) -> Iterator[None]:
    """No MLflow-level HTTP retries while syncing: ours are the only ones, so they never stack.

    MLflow reads these variables per request; they are process-wide, so they are set only
    for the duration of a sync and restored after.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout)))}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def target_key(tracking_uri: str) -> str:
    """The folder name of a tracking server's sync state: a hash of its URI without credentials."""
    from ..sinks.mlflow import _redact

    return hashlib.sha256(_redact(tracking_uri).encode()).hexdigest()[:16]


@dataclass
class SyncReport:
    """What one ``sync`` did (or, with ``dry_run``, would do: see ``plan``)."""

    segments: int = 0
    segments_skipped: int = 0
    records: int = 0
    delivered: int = 0
    artifacts: int = 0
    runs_created: list[str] = field(default_factory=list)
    failed: list[FailedRecord] = field(default_factory=list)
    gaps: list[Any] = field(default_factory=list)
    plan: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"segments": self.segments, "segments_skipped": self.segments_skipped, "records": self.records,
                "delivered": self.delivered, "artifacts": self.artifacts, "runs_created": self.runs_created,
                "failed": [str(f) for f in self.failed], "gaps": [str(g) for g in self.gaps]}


class Replayer:
    """Replays one spool into one tracking server. Use :func:`sync` unless you need the parts.

    ``progress``: ``None`` = a bar on a terminal, else a line every ~10 s / 10 %;
    ``False`` = silent; ``True`` = the bar. ``wait``: seconds to wait for another sync's
    lease. ``dry_run``: list what is not synced yet (``report.plan``), send and write nothing.
    """

    def __init__(self, url: str, tracking_uri: str, *, storage_options: dict[str, Any] | None = None,
                 retry_deadline: float = 60.0, request_timeout: float = 30.0, chunk_records: int = DEFAULT_CHUNK,
                 progress: bool | None = None, wait: float = 0.0, lease_ttl: float = DEFAULT_TTL,
                 dry_run: bool = False):
        from ..sinks.mlflow import _redact

        self.url = url
        self.storage_options = storage_options
        self.reader = SpoolReader(url, storage_options)
        self.fs, self.root = self.reader.fs, self.reader.root.rstrip("/")
        check_spool(self.fs, self.root, url)  # before anything can be created, here or in the store
        self.tracking_uri = tracking_uri
        self.redacted_uri = _redact(tracking_uri)
        self.state = f"{self.root}/{SYNC_DIR}/{target_key(tracking_uri)}"
        self.chunk_records = max(1, chunk_records)
        self.request_timeout = request_timeout
        self.retry_deadline = retry_deadline
        self.progress = progress
        self.wait, self.lease_ttl, self.dry_run = wait, lease_ttl, dry_run
        self.report = SyncReport()
        self.lease: Lease | None = None
        self._tmp: Path | None = None
        self._bar: Any = None

    def _connect(self) -> None:
        from mlflow import MlflowClient

        from ..delivery import Deliverer, DeliveryStats, RetryPolicy
        from ..sinks.mlflow import MlflowSink
        from .presence import CheckedSink

        self.client = MlflowClient(self.tracking_uri)
        self.stats = DeliveryStats()
        self.policy = RetryPolicy(deadline=self.retry_deadline)
        self.sink = CheckedSink(MlflowSink(self.tracking_uri, self.request_timeout), self.client)
        self.deliverer = Deliverer(self.sink, self.policy, self.stats)
        self.isolator = Deliverer(self.sink, RetryPolicy(deadline=min(ISOLATE_DEADLINE, self.retry_deadline)),
                                  self.stats)
        self.runs = RunMap(self.client, self.fs, self.state, self.policy, self.redacted_uri, self._read_json,
                           self.report.runs_created)

    # -- state beside the segments -------------------------------------------------------------
    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("mlflow-er sync: ignoring unreadable state file %s", path)
            return None
        return value if isinstance(value, dict) else None

    def progress_of(self, segment: str) -> dict[str, Any] | None:
        """The saved progress of ``segment`` for this tracking server, if any."""
        return self._read_json(f"{self.state}/progress/{segment}.json")

    def _save_progress(self, seg: Segment, pos: Position | None, done: bool, gaps: list, failed: list,
                       prior: dict[str, Any] | None, intent: dict[str, int] | None = None) -> None:
        if self.lease is not None:
            self.lease.check()  # never write progress (or send) after losing the lease
        # Damage and rejections seen by an earlier (interrupted) sync of this segment are kept.
        old_gaps, old_failed = list((prior or {}).get("gaps", [])), list((prior or {}).get("failed", []))
        data: dict[str, Any] = {
            "segment": seg.name, "offset": pos.offset if pos else 0, "count": pos.count if pos else 0,
            "index": pos.index if pos else -1, "done": done, "size": seg.size,
            "gaps": (old_gaps + [str(g) for g in gaps])[:100], "failed": (old_failed + [str(f) for f in failed])[:100]}
        if intent is not None:
            data["intent"] = intent
        write_atomic(self.fs, f"{self.state}/progress/{seg.name}.json", json.dumps(data).encode())

    @staticmethod
    def _start(seg: Segment, prog: dict[str, Any] | None) -> Position | None:
        if not prog or not prog.get("offset"):
            return None
        return Position(seg.name, int(prog["offset"]), int(prog.get("count", 0)), int(prog.get("index", -1)))

    def _work(self) -> list[tuple[Segment, dict[str, Any] | None]]:
        work = []
        self.report.segments_skipped = 0
        for seg in self.reader.segments():
            prog = self.progress_of(seg.name)
            if prog and prog.get("done") and seg.sealed:
                self.report.segments_skipped += 1
                continue
            work.append((seg, prog))
        return work

    # -- the replay ----------------------------------------------------------------------------
    def run(self) -> SyncReport:
        """Replay every segment not yet fully synced; raise :class:`SyncError` if a transient failure persists."""
        work = self._work()
        newer = {seg.name: self.reader.header_info(seg).version for seg, _ in work
                 if self.reader.header_info(seg).unsupported}
        if newer:
            from .. import __version__

            listed = ", ".join(f"{name} (format version {v})" for name, v in newer.items())
            raise UnsupportedSpool(f"segment(s) {listed} of {self.url} were written by a newer mlflow-er than this "
                                   f"one ({__version__}, reads format versions 1-2): upgrade mlflow-er "
                                   f"(pip install -U mlflow-er) and sync again; nothing was synced")
        if self.dry_run:
            from .progress import count_pending, format_plan

            pending = count_pending(self.url, self.storage_options, [(s, self._start(s, p)) for s, p in work])
            mapped = {}
            for run in pending.runs:
                m = self._read_json(f"{self.state}/runs/{run}.json")
                mapped[run] = str(m["run_id"]) if m and "run_id" in m else None
            self.report.plan = format_plan(pending, mapped, self.redacted_uri)
            self.report.records = pending.records
            return self.report
        with _mlflow_http_policy(self.request_timeout):
            self._connect()
            with Lease(self.fs, f"{self.state}/lease.json", ttl=self.lease_ttl, wait=self.wait,
                       what=f"{self.url} into {self.redacted_uri}") as lease:
                self.lease = lease
                try:
                    return self._run()
                finally:
                    self.lease = None

    def _run(self) -> SyncReport:
        if self._read_json(f"{self.state}/target.json") is None:
            write_atomic(self.fs, f"{self.state}/target.json",
                         json.dumps({"tracking_uri": self.redacted_uri}).encode())
        work = self._work()  # again, under the lease: a sync that held it before may have moved on
        mode = None if self.progress is False else ("bar" if self.progress or sys.stderr.isatty() else "lines")
        if mode is not None and work:
            from .progress import SyncProgress, count_pending

            self._bar = SyncProgress(count_pending(self.url, self.storage_options,
                                                   [(s, self._start(s, p)) for s, p in work]), mode)
        try:
            for seg, prog in work:
                self._sync_segment(seg, prog)
        finally:
            if self._bar is not None:
                self._bar.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        self.report.delivered = self.stats.delivered
        return self.report

    def _sync_segment(self, seg: Segment, prog: dict[str, Any] | None) -> None:
        header = self.reader.header(seg) or {}
        start = self._start(seg, prog)
        intent = (prog or {}).get("intent")
        # Records up to this offset may have been sent by an interrupted sync: checked before re-sending.
        suspect_until = int(intent["end"]) if isinstance(intent, dict) and "end" in intent else -1
        failed: list[FailedRecord] = []
        chunk: list = []
        pos = chunk_start = start
        for record, pos in self.reader.iter_segment(seg, start):
            chunk.append(record)
            if len(chunk) >= self.chunk_records or pos.offset == suspect_until:
                failed += self._send_chunk(seg, chunk, chunk_start, pos, header, prog, failed, suspect_until)
                chunk, chunk_start = [], pos
        if chunk:
            assert pos is not None
            failed += self._send_chunk(seg, chunk, chunk_start, pos, header, prog, failed, suspect_until)
        gaps = [g for g in self.reader.gaps if g.segment == seg.name]  # its header's damage included
        self.report.gaps += gaps
        self.report.failed += failed
        self.report.segments += 1
        if pos is not None or seg.sealed:
            self._save_progress(seg, pos, seg.sealed, gaps, failed, prog)

    def _send_chunk(self, seg: Segment, chunk: list, first: Position | None, last: Position, header: dict[str, Any],
                    prog: dict[str, Any] | None, failed_so_far: list, suspect_until: int) -> list[FailedRecord]:
        begin = first.offset if first is not None else 0
        gaps = [g for g in self.reader.gaps if g.segment == seg.name]
        self._save_progress(seg, first, False, [], failed_so_far, prog, intent={"start": begin, "end": last.offset})
        failed = self._deliver(chunk, header, check=begin < suspect_until)
        self._save_progress(seg, last, False, gaps, failed_so_far + failed, prog)
        self.report.records += len(chunk)
        if self._bar is not None:
            self._bar.update(len(chunk), sum(1 for r in chunk if type(r) is Artifact))
        return failed

    def _deliver(self, chunk: list, header: dict[str, Any], check: bool) -> list[FailedRecord]:
        failed: list[FailedRecord] = []
        pending: dict[str, list] = {}

        def send() -> None:
            from .presence import missing

            for orig, records in pending.items():
                target = self.runs.target(orig, header, records[0].timestamp)
                for batch in split_batches(target, records):
                    if check:
                        batch = call_with_retry(self.policy, "check what is stored", missing, self.client, batch)
                        if not len(batch):
                            continue
                    failed.extend(self._deliver_batch(batch))
            pending.clear()

        for r in chunk:
            t = type(r)
            if t is Metric or t is Param or t is Tag:
                pending.setdefault(r.run_id, []).append(r)
                continue
            send()  # keep write order around artifacts and run facts
            if t is Artifact:
                failed.extend(self._artifact(r, header))
            elif t is RunInfo:
                self.runs.run_info(r, header)
        send()
        return failed

    # -- failures: stop when the server is away, skip what the store alone keeps refusing ---------
    def _store_refuses(self, run_id: str) -> bool:
        """True when the last failure is the store's own INTERNAL_ERROR and the server answers otherwise."""
        err = self.sink.last_error
        if err is None or "INTERNAL_ERROR" not in str(err):
            return False
        try:
            self.client.get_run(run_id)
        except Exception:
            return False
        return True

    def _stop(self, failed: list[FailedRecord]) -> SyncError:
        # Progress is not advanced past this chunk: the next sync checks, then sends what is missing.
        return SyncError(f"tracking server unavailable, sync stopped (progress saved; run it again): "
                         f"{failed[0].reason}")

    def _deliver_batch(self, batch: Batch) -> list[FailedRecord]:
        from .presence import missing

        failed = self.deliverer.deliver(batch)
        transient = [f for f in failed if not f.permanent]
        if not transient:
            return failed
        if not self._store_refuses(batch.run_id):
            raise self._stop(transient)
        log.warning("mlflow-er sync: the store keeps refusing a batch of run %s (%s); isolating the record(s)",
                    batch.run_id, self.sink.last_error)
        rest = call_with_retry(self.policy, "check what is stored", missing, self.client, batch)
        return [f for f in failed if f.permanent] + self._isolate(list(rest.records()), batch.run_id)

    def _isolate(self, records: list, run_id: str) -> list[FailedRecord]:
        if not records:
            return []
        if len(records) > 1:
            try:
                self.sink.write_batch(Batch.of(run_id, records))
                self.stats.delivered += len(records)
                return []
            except Exception:
                mid = len(records) // 2
                return self._isolate(records[:mid], run_id) + self._isolate(records[mid:], run_id)
        out = []
        for f in self.isolator.deliver(Batch.of(run_id, records)):
            if f.permanent:
                out.append(f)
            elif self._store_refuses(run_id):
                out.append(FailedRecord(f.kind, f.key, f"the store kept refusing it past the retry deadline "
                                        f"({self.sink.last_error}); skipped, the records behind it were delivered",
                                        run_id, permanent=True))
            else:
                raise self._stop([f])
        return out

    # -- artifacts -----------------------------------------------------------------------------
    def _artifact(self, a: Artifact, header: dict[str, Any]) -> list[FailedRecord]:
        from .. import artifacts
        from ..backends.base import materialize

        target = self.runs.target(a.run_id, header, a.timestamp)
        a = a._replace(run_id=target)
        rendered = a.payload is not None
        if rendered:
            a = materialize(a)
        else:
            unsafe = unsafe_artifact(self.root, a.local_path, is_local(self.fs))
            name = a.name or str(a.local_path)
            if unsafe is not None:
                log.warning("mlflow-er sync: skipped artifact %r of run %s: its record %s", name, target, unsafe)
                return [FailedRecord("artifact", name, f"skipped: the record {unsafe}", target)]
            assert a.local_path is not None
            src = f"{self.root}/{a.local_path}"
            if is_local(self.fs):
                a = a._replace(local_path=src)
            else:
                if self._tmp is None:
                    self._tmp = Path(tempfile.mkdtemp(prefix="mlflow-er-sync-"))
                rel = Path(str(a.local_path))
                dst = self._tmp / rel.parent.name / rel.name  # the snapshot id keeps equal names apart
                dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                try:
                    self.fs.get(src, str(dst), recursive=a.is_dir)
                except FileNotFoundError:
                    return [FailedRecord("artifact", a.name or rel.name, f"snapshot {src} is missing", target)]
                a = a._replace(local_path=str(dst))
        if not a.local_path or not Path(a.local_path).exists():
            return [FailedRecord("artifact", a.name or str(a.local_path), "snapshot is missing", target)]
        try:
            failed = self.deliverer.deliver_artifact(a)
        finally:
            if rendered:
                artifacts.discard(a.local_path)
        transient = [f for f in failed if not f.permanent]
        if transient and not self._store_refuses(target):
            raise self._stop(transient)
        if not failed:
            self.report.artifacts += 1
        return [f if f.permanent else FailedRecord(f.kind, f.key, f"the store kept refusing it: {f.reason}; skipped",
                                                   f.run_id, permanent=True) for f in failed]


def sync(url: str, tracking_uri: str, **options: Any) -> SyncReport:
    """Replay the spool at ``url`` into ``tracking_uri`` (see :class:`Replayer` for options)."""
    return Replayer(url, tracking_uri, **options).run()
