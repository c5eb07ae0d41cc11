"""``mlflow-er sync``: replay a spool (any fsspec URL) into an MLflow tracking server, exactly once.

State lives beside the segments, per tracking server (``sync/<target>/``, where
``<target>`` is a hash of the credential-free tracking URI), so any host can sync and a
spool can be synced into several servers independently:

* ``runs/<original run id>.json`` — the run each spooled run maps to (written once);
* ``progress/<segment>.json`` — how far the segment is synced: byte offset, record
  count, ``done`` once a sealed segment is complete, and the gaps and failures seen.

Records go in write order through ``MlflowClient.log_batch`` within MLflow's limits
(:func:`~mlflow_er.records.split_batches`), with mlflow-er's retry/bisect policy
(:class:`~mlflow_er.delivery.Deliverer`). Progress is saved after every chunk; a sync
killed mid-chunk re-sends at most that chunk, which MLflow absorbs: it stores a metric
row (key, timestamp, step, value) once, a param re-logged with the same value is
accepted, and tags re-applied in order end at the same last value. A run is matched by
its original id if the server has it, else by the ``mlflow_er.source_run_id`` tag of a
run an earlier (interrupted) sync created, else created — so a crash between creating a
run and recording the mapping never yields a second run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FailedRecord
from ..records import Artifact, Metric, Param, Tag, split_batches
from .errors import SyncError
from .format import SYNC_DIR, RunInfo
from .reader import Position, Segment, SpoolReader, is_local
from .upload import write_atomic

log = logging.getLogger(__name__)

SOURCE_RUN_TAG = "mlflow_er.source_run_id"
DEFAULT_CHUNK = 5000


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
    """What one ``sync`` did."""

    segments: int = 0
    segments_skipped: int = 0
    records: int = 0
    delivered: int = 0
    artifacts: int = 0
    runs_created: list[str] = field(default_factory=list)
    failed: list[FailedRecord] = field(default_factory=list)
    gaps: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"segments": self.segments, "segments_skipped": self.segments_skipped, "records": self.records,
                "delivered": self.delivered, "artifacts": self.artifacts, "runs_created": self.runs_created,
                "failed": [str(f) for f in self.failed], "gaps": [str(g) for g in self.gaps]}


class Replayer:
    """Replays one spool into one tracking server. Use :func:`sync` unless you need the parts."""

    def __init__(self, url: str, tracking_uri: str, *, storage_options: dict[str, Any] | None = None,
                 retry_deadline: float = 60.0, request_timeout: float = 30.0, chunk_records: int = DEFAULT_CHUNK,
                 progress: bool | None = None):
        from mlflow import MlflowClient

        from ..delivery import Deliverer, DeliveryStats, RetryPolicy
        from ..sinks.mlflow import MlflowSink, _redact

        self.reader = SpoolReader(url, storage_options)
        self.fs, self.root = self.reader.fs, self.reader.root.rstrip("/")
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.stats = DeliveryStats()
        self.deliverer = Deliverer(MlflowSink(tracking_uri, request_timeout), RetryPolicy(deadline=retry_deadline),
                                   self.stats)
        self.state = f"{self.root}/{SYNC_DIR}/{target_key(tracking_uri)}"
        self.redacted_uri = _redact(tracking_uri)
        self.chunk_records = max(1, chunk_records)
        self.request_timeout = request_timeout
        self.policy = RetryPolicy(deadline=retry_deadline)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.report = SyncReport()
        self._runs: dict[str, str] = {}
        self._created: set[str] = set()
        self._infos: dict[str, dict[str, Any]] = {}
        self._experiments: dict[str | None, str] = {}
        self._tmp: Path | None = None

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
                       prior: dict[str, Any] | None) -> None:
        # Damage and rejections seen by an earlier (interrupted) sync of this segment are kept.
        old_gaps, old_failed = list((prior or {}).get("gaps", [])), list((prior or {}).get("failed", []))
        data = {"segment": seg.name, "offset": pos.offset if pos else 0, "count": pos.count if pos else 0,
                "done": done, "size": seg.size, "gaps": (old_gaps + [str(g) for g in gaps])[:100],
                "failed": (old_failed + [str(f) for f in failed])[:100]}
        write_atomic(self.fs, f"{self.state}/progress/{seg.name}.json", json.dumps(data).encode())

    # -- the replay ----------------------------------------------------------------------------
    def run(self) -> SyncReport:
        """Replay every segment not yet fully synced; raise :class:`SyncError` if a transient failure persists."""
        with _mlflow_http_policy(self.request_timeout):
            return self._run()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A tracking-server call (lookups, run creation) under the same retry policy as batches."""
        from mlflow.exceptions import MlflowException

        from ..sinks.mlflow import classify_mlflow_exception

        start, attempt = time.monotonic(), 0
        while True:
            try:
                return fn(*args, **kwargs)
            except MlflowException as exc:
                err = classify_mlflow_exception(exc)
                if not err.transient:
                    raise
            except (ConnectionError, TimeoutError, OSError) as exc:
                err = exc  # type: ignore[assignment]
            remaining = self.policy.deadline - (time.monotonic() - start)
            if remaining <= 0:
                raise SyncError(f"tracking server unavailable, sync stopped (progress saved; run it again): "
                                f"{what}: {err}")
            time.sleep(min(self.policy.backoff(attempt, getattr(err, "retry_after", None)), remaining))
            attempt += 1

    def _run(self) -> SyncReport:
        if self._read_json(f"{self.state}/target.json") is None:
            write_atomic(self.fs, f"{self.state}/target.json",
                         json.dumps({"tracking_uri": self.redacted_uri}).encode())
        segments = self.reader.segments()
        work = []
        for seg in segments:
            prog = self.progress_of(seg.name)
            if prog and prog.get("done") and seg.sealed:
                self.report.segments_skipped += 1
                continue
            work.append((seg, prog))
        bar = None
        if self.progress and work:
            from tqdm import tqdm

            bar = tqdm(total=sum(max(0, s.size - int((p or {}).get("offset", 0))) for s, p in work), unit="B",
                       unit_scale=True, desc="mlflow-er sync")
        try:
            for seg, prog in work:
                self._sync_segment(seg, prog, bar)
        finally:
            if bar is not None:
                bar.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        self.report.delivered = self.stats.delivered
        return self.report

    def _sync_segment(self, seg: Segment, prog: dict[str, Any] | None, bar: Any) -> None:
        header = self.reader.header(seg) or {}
        start = Position(seg.name, int(prog["offset"]), int(prog["count"])) if prog and prog.get("offset") else None
        gaps_before = len(self.reader.gaps)
        failed: list[FailedRecord] = []
        chunk: list = []
        pos = start
        last_offset = start.offset if start else 0
        for record, pos in self.reader.iter_segment(seg, start):
            chunk.append(record)
            if len(chunk) >= self.chunk_records:
                failed += self._deliver(chunk, header)
                self._save_progress(seg, pos, False, self.reader.gaps[gaps_before:], failed, prog)
                self.report.records += len(chunk)
                chunk = []
                if bar is not None:
                    bar.update(pos.offset - last_offset)
                    last_offset = pos.offset
        if chunk:
            failed += self._deliver(chunk, header)
            self.report.records += len(chunk)
        gaps = self.reader.gaps[gaps_before:]
        self.report.gaps += gaps
        self.report.failed += failed
        self.report.segments += 1
        if pos is not None or seg.sealed:
            self._save_progress(seg, pos, seg.sealed, gaps, failed, prog)
        if bar is not None and pos is not None:
            bar.update(pos.offset - last_offset)

    def _deliver(self, chunk: list, header: dict[str, Any]) -> list[FailedRecord]:
        failed: list[FailedRecord] = []
        pending: dict[str, list] = {}

        def send() -> None:
            for orig, records in pending.items():
                target = self._target_run(orig, header, records[0].timestamp)
                for batch in split_batches(target, records):
                    failed.extend(self._check(self.deliverer.deliver(batch)))
            pending.clear()

        for r in chunk:
            t = type(r)
            if t is Metric or t is Param or t is Tag:
                pending.setdefault(r.run_id, []).append(r)
                continue
            send()  # keep write order around artifacts and run facts
            if t is Artifact:
                failed.extend(self._check(self._artifact(r, header)))
            elif t is RunInfo:
                self._run_info(r, header)
        send()
        return failed

    @staticmethod
    def _check(failed: list[FailedRecord]) -> list[FailedRecord]:
        transient = [f for f in failed if not f.permanent]
        if transient:
            # Progress is not advanced past this chunk: the next sync re-sends it.
            raise SyncError(f"tracking server unavailable, sync stopped (progress saved; run it again): "
                            f"{transient[0].reason}")
        return failed

    # -- runs and experiments ------------------------------------------------------------------
    def _experiment(self, header: dict[str, Any]) -> str:
        from mlflow.entities import LifecycleStage

        name = header.get("experiment_name")
        if name in self._experiments:
            return self._experiments[name]
        if name:
            exp = self._call("find experiment", self.client.get_experiment_by_name, name)
            if exp is not None and exp.lifecycle_stage == LifecycleStage.DELETED:
                raise SyncError(f"experiment {name!r} is deleted at {self.redacted_uri}; restore it first")
            exp_id = exp.experiment_id if exp is not None else \
                self._call("create experiment", self.client.create_experiment, name)
        else:
            exp_id = self._experiment_by_id(header.get("experiment_id"))
        self._experiments[name] = exp_id
        return exp_id

    def _experiment_by_id(self, experiment_id: Any) -> str:
        """A spool that names no experiment (e.g. spill): its id if the server has it, else the default one."""
        from mlflow.exceptions import MlflowException

        if experiment_id:
            try:
                return self._call("find experiment", self.client.get_experiment, str(experiment_id)).experiment_id
            except MlflowException:
                pass
        return "0"

    def _target_run(self, orig: str, header: dict[str, Any], first_ts: int) -> str:
        if orig in self._runs:
            return self._runs[orig]
        path = f"{self.state}/runs/{orig}.json"
        mapping = self._read_json(path)
        if mapping is None:
            mapping = self._find_or_create(orig, header, first_ts)
            existing = self._read_json(path)
            if existing is None:
                write_atomic(self.fs, path, json.dumps(mapping).encode())
            else:
                mapping = existing  # another sync got there first
        target = str(mapping["run_id"])
        if mapping.get("created"):
            self._created.add(orig)
        self._runs[orig] = target
        return target

    def _find_or_create(self, orig: str, header: dict[str, Any], first_ts: int) -> dict[str, Any]:
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        try:
            run = self._call("look up run", self.client.get_run, orig)
            if run.info.lifecycle_stage == LifecycleStage.ACTIVE:
                return {"run_id": orig, "experiment_id": run.info.experiment_id, "created": False}
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise SyncError(f"cannot look up run {orig} at {self.redacted_uri}: {exc}") from exc
        exp_id = self._experiment(header)
        found = self._call("search runs", self.client.search_runs, [exp_id],
                           filter_string=f"tags.`{SOURCE_RUN_TAG}` = '{orig}'", max_results=1)
        if found:
            return {"run_id": found[0].info.run_id, "experiment_id": exp_id, "created": True}
        info = self._infos.get(orig, {})
        tags = {str(k): str(v) for k, v in (info.get("tags") or {}).items()}
        tags[SOURCE_RUN_TAG] = orig
        if info.get("description"):
            tags["mlflow.note.content"] = str(info["description"])
        parent = info.get("parent_run_id")
        if parent:
            tags["mlflow.parentRunId"] = self._target_run(str(parent), header, first_ts)
        run = self._call("create run", self.client.create_run, exp_id,
                         start_time=int(info.get("start_time") or first_ts), tags=tags, run_name=info.get("run_name"))
        self.report.runs_created.append(run.info.run_id)
        log.info("mlflow-er sync: created run %s for spooled run %s", run.info.run_id, orig)
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "created": True}

    def _run_info(self, info: RunInfo, header: dict[str, Any]) -> None:
        self._infos.setdefault(info.run_id, {}).update(info.fields)
        status = info.fields.get("status")
        if status:
            target = self._target_run(info.run_id, header, info.timestamp)
            if info.run_id in self._created:  # a run the tracker ended itself is left as it is
                self._call("end run", self.client.set_terminated, target, status=str(status),
                           end_time=int(info.fields.get("end_time") or info.timestamp))

    def _artifact(self, a: Artifact, header: dict[str, Any]) -> list[FailedRecord]:
        from .. import artifacts
        from ..backends.base import materialize

        target = self._target_run(a.run_id, header, a.timestamp)
        a = a._replace(run_id=target)
        rendered = a.payload is not None
        if rendered:
            a = materialize(a)
        elif a.local_path and not Path(a.local_path).is_absolute():
            src = f"{self.root}/{a.local_path}"
            if is_local(self.fs):
                a = a._replace(local_path=src)
            else:
                if self._tmp is None:
                    self._tmp = Path(tempfile.mkdtemp(prefix="mlflow-er-sync-"))
                rel = Path(a.local_path)
                dst = self._tmp / rel.parent.name / rel.name  # the snapshot id keeps equal names apart
                dst.parent.mkdir(parents=True, exist_ok=True)
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
        if not failed:
            self.report.artifacts += 1
        return failed


def sync(url: str, tracking_uri: str, **options: Any) -> SyncReport:
    """Replay the spool at ``url`` into ``tracking_uri`` (see :class:`Replayer` for options)."""
    return Replayer(url, tracking_uri, **options).run()
