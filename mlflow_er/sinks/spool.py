"""The ``spool`` sink: a crash-safe local log of every record, shipped to any fsspec URL.

``sinks=["spool"]`` (alone, or beside ``"mlflow"``) appends each batch to segment files
in a local folder (:class:`~mlflow_er.spool.writer.SpoolWriter`: group-committed fsync,
files ``0600``), snapshots artifacts into the same folder, and — with ``upload_url`` —
uploads sealed segments and artifacts in the background, create-only and verified.
``mlflow-er sync URL --tracking-uri URI`` later replays the spool into MLflow exactly once.

Options (``sink_options={"spool": {...}}``):

``path``            local spool folder (default ``$MLFLOW_ER_SPOOL_DIR`` or ``./mlflow-er-spool``)
``upload_url``      fsspec URL to upload to (default ``$MLFLOW_ER_SPOOL_UPLOAD_URL``; none: keep local)
``upload_options``  fsspec storage options for ``upload_url`` (e.g. ``{"endpoint_url": ...}``)
``fsync_interval``  seconds between group commits (default 0.005; 0 = every write)
``segment_bytes``   seal a segment at this size (default 16 MiB)
``segment_age``     ... or at this age in seconds (default 300)
``upload_timeout``  how long ``close()`` may spend on the last uploads (default 60 s)
``exit_timeout``    ... and at interpreter exit, for a sink nobody closed (default 10 s)
``verify``          ``"crc"`` (read back and compare, default) or ``"size"``
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..hookspecs import SinkContext, hookimpl
from ..records import Artifact, Batch
from ..spool.format import ARTIFACTS_DIR, RunInfo
from ..spool.writer import DEFAULT_FSYNC_INTERVAL, DEFAULT_SEGMENT_AGE, DEFAULT_SEGMENT_BYTES, SpoolWriter
from .base import Sink

log = logging.getLogger(__name__)

NAME = "spool"
ENV_DIR = "MLFLOW_ER_SPOOL_DIR"
ENV_UPLOAD_URL = "MLFLOW_ER_SPOOL_UPLOAD_URL"
DEFAULT_DIR = "mlflow-er-spool"


def default_spool_dir() -> Path:
    """``$MLFLOW_ER_SPOOL_DIR``, else ``./mlflow-er-spool``."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


_open_sinks: weakref.WeakSet[SpoolSink] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # Nothing else may close a sink (a tracker keeps its sinks for its next run), so at exit
    # seal the last segment and give uploads a bounded last chance; what is left stays on
    # disk and the next start (or `mlflow-er sync`) picks it up.
    for sink in list(_open_sinks):
        if sink._pid == os.getpid():
            try:
                sink.close(timeout=sink.exit_timeout)
            except Exception as exc:
                log.warning("mlflow-er spool: closing %r at exit failed: %s", sink, exc)


def _freeze(src: str, dst: str, may_link: bool) -> None:
    """Put an immutable copy of ``src`` at ``dst``: a hard link if allowed, else a clone, else a copy."""
    from ..artifacts import _reflink

    if may_link:
        try:
            os.link(src, dst)
            return  # our own private snapshot's inode: never chmod a link to the user's file
        except OSError:
            pass  # another filesystem: clone or copy
    if not _reflink(src, dst):
        shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)  # a copy is made 0666 & ~umask: spool files are this user's alone


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SpoolSink(Sink):
    """Writes records to a local spool and (optionally) uploads it; see the module docstring for options."""

    name = NAME
    needs_server = False
    durable = True  # the pipeline writes it first; a record is acknowledged by the group fsync

    def __init__(self, path: str | os.PathLike[str] | None = None, upload_url: str | None = None, *,
                 experiment_id: str | None = None, experiment_name: str | None = None,
                 fsync_interval: float | None = DEFAULT_FSYNC_INTERVAL, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 segment_age: float | None = DEFAULT_SEGMENT_AGE, upload_options: dict[str, Any] | None = None,
                 upload_timeout: float = 60.0, exit_timeout: float = 10.0, verify: str = "crc",
                 progress: bool | None = None):
        self.path = Path(path if path is not None else default_spool_dir()).expanduser().resolve()
        self.upload_url = upload_url
        self.upload_timeout = upload_timeout
        self.exit_timeout = exit_timeout
        self._pid = os.getpid()
        self.uploader = None
        if upload_url:
            from ..spool.upload import Uploader

            self.uploader = Uploader(self.path, upload_url, upload_options, verify=verify, progress=progress)
        self.writer = SpoolWriter(self.path, experiment_id=experiment_id, experiment_name=experiment_name,
                                  fsync_interval=fsync_interval, segment_bytes=segment_bytes,
                                  segment_age=segment_age, on_seal=self._on_seal)
        self._artifacts = 0
        self._closed = False
        if self.uploader is not None:
            self.uploader.start()  # resumes whatever an earlier process left pending
        _open_sinks.add(self)

    @classmethod
    def from_context(cls, context: SinkContext) -> SpoolSink:
        """Build from a tracker's :class:`SinkContext` (its ``options`` are the keyword arguments)."""
        opts = dict(context.options)
        opts.setdefault("upload_url", os.environ.get(ENV_UPLOAD_URL) or None)
        return cls(experiment_id=context.experiment_id, experiment_name=context.experiment_name, **opts)

    def _on_seal(self, path: Path) -> None:
        if self.uploader is not None:
            self.uploader.notify()

    # -- the sink contract ---------------------------------------------------------------------
    def write_batch(self, batch: Batch) -> None:
        """Append the batch's records in sequence order (raises ``SpoolWriteError``/``SpoolDiskFull``)."""
        self.writer.append(list(batch.records()))

    def write_artifact(self, artifact: Artifact) -> None:
        """Snapshot the file or folder into the spool, then append a record pointing at the snapshot."""
        from ..staging import materialize

        rendered = artifact.payload is not None  # the pipeline renders first; a direct caller may not
        if rendered:
            artifact = materialize(artifact)
        try:
            rel, holder = self._snapshot(artifact)
        finally:
            if rendered:
                from .. import artifacts

                artifacts.discard(artifact.local_path)
        try:
            self.writer.append([artifact._replace(local_path=rel, owned=False, payload=None)])
        except BaseException:
            shutil.rmtree(holder, ignore_errors=True)  # no record points at it: not an orphan upload
            raise
        self._artifacts += 1

    def _snapshot(self, artifact: Artifact) -> tuple[str, Path]:
        assert artifact.local_path is not None, "artifacts reach sinks as local files"
        src = Path(artifact.local_path)
        # A backend's private snapshot (owned, not a hard link to the user's file) can be
        # linked: nobody rewrites it. Anything else is cloned or copied, so a later in-place
        # rewrite by the user can never change what the spool holds.
        private = artifact.owned and not getattr(artifact, "fingerprint", None)
        aid = uuid.uuid4().hex
        root = self.path / ARTIFACTS_DIR
        root.mkdir(exist_ok=True, mode=0o700)
        tmp = root / f".tmp-{aid}"  # the uploader skips dot-names: it never sees a half-made snapshot
        tmp.mkdir(mode=0o700)
        name = src.name if src.name else (artifact.name or "artifact")
        dst = tmp / name

        def take(s: str, d: str) -> str:
            _freeze(s, d, private)
            return d

        try:
            if artifact.is_dir or src.is_dir():
                shutil.copytree(src, dst, copy_function=take)
                for folder in [dst, *(d for d in dst.rglob("*") if d.is_dir())]:
                    os.chmod(folder, 0o700)  # copytree copies the source folders' modes
                files = [f for f in dst.rglob("*") if f.is_file()]
            else:
                take(str(src), str(dst))
                files = [dst]
            for f in files:  # the record is acknowledged by the segment fsync; its content must be durable too
                _fsync_path(f)
            final = root / aid
            os.rename(tmp, final)
            _fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return f"{ARTIFACTS_DIR}/{aid}/{name}", final

    def flush(self) -> None:
        """fsync now: every record written so far is acknowledged when this returns."""
        self.writer.flush()

    def close(self, timeout: float | None = None) -> None:
        """Seal the last segment and upload what is pending within ``timeout`` (default ``upload_timeout``).

        Whatever is not uploaded by then stays on disk: the next sink on this folder resumes it.
        """
        if self._closed:
            return
        self._closed = True
        _open_sinks.discard(self)
        try:
            self.writer.close()
        finally:
            if self.uploader is not None:
                self.uploader.close(self.upload_timeout if timeout is None else timeout)

    # -- run facts (used for offline runs, replayed by `mlflow-er sync`) -------------------------
    def start_run(self, run_id: str, *, run_name: str | None = None, start_time: int | None = None,
                  parent_run_id: str | None = None, description: str | None = None,
                  tags: dict[str, str] | None = None) -> None:
        """Record how the run began, so ``sync`` can create it with its name, parent, description and tags."""
        now = time.time_ns() // 1_000_000
        fields = {"event": "start", "run_name": run_name, "start_time": start_time or now,
                  "parent_run_id": parent_run_id, "description": description, "tags": dict(tags or {})}
        self.writer.append([RunInfo(run_id, now, -1, {k: v for k, v in fields.items() if v is not None})])

    def end_run(self, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
        """Record how the run ended (``sync`` ends a run it created with this status); fsyncs."""
        now = time.time_ns() // 1_000_000
        self.writer.append([RunInfo(run_id, now, -1, {"event": "end", "status": status,
                                                       "end_time": end_time or now})])
        self.writer.flush()

    # -- health --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """``appended``, ``acknowledged``, ``segments_sealed``, ``uploaded_segments``, ``pending_uploads``..."""
        out: dict[str, Any] = {"path": str(self.path), **self.writer.stats(), "artifacts": self._artifacts}
        if self.uploader is not None:
            u = self.uploader.stats
            arts, segs = self.uploader.pending()
            out.update(uploaded_segments=u.segments, uploaded_artifacts=u.artifacts, uploaded_bytes=u.bytes,
                       upload_errors=u.errors, upload_last_error=u.last_error,
                       pending_uploads=len(arts) + len(segs))
        return out

    def __repr__(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.upload_url or "")
        shown = parts._replace(netloc=f"***@{parts.hostname}").geturl() if parts.password else self.upload_url
        dest = f" -> {shown}" if self.upload_url else ""
        return f"<SpoolSink {str(self.path)!r}{dest}>"


# -- plugin hooks ------------------------------------------------------------------------------
@hookimpl
def mlflow_er_sink_names() -> list[str]:
    return [NAME]


@hookimpl
def mlflow_er_sink_needs_server(name: str) -> bool | None:
    return SpoolSink.needs_server if name == NAME else None


@hookimpl
def mlflow_er_make_sink(name: str, context: SinkContext) -> Sink | None:
    if name != NAME:
        return None
    return SpoolSink.from_context(context)
