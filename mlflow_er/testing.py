"""Test helpers for mlflow-er users and plugin authors.

* :class:`MemorySink` — a sink (name ``"memory"``) that keeps every :class:`~mlflow_er.records.Batch`
  and every artifact's *content* in memory, thread-safe, with scripted failures
  (:meth:`MemorySink.fail_next`, :meth:`MemorySink.fail_when`) so a backend can be tested
  against transient and permanent errors.
* :func:`capture` — a context manager yielding a :class:`Capture`: an
  :class:`~mlflow_er.ExperimentTracker` wired to a fresh :class:`MemorySink` (or a
  ``MemorySink`` attached to a tracker you already have), and what reached it.
* :data:`memory_sink_plugin` — a pluggy plugin that makes ``"memory"`` selectable by
  name (``sinks=["memory"]``) once registered with :func:`register_memory_sink`. It is not
  an entry point of mlflow-er, so it never shows up unless a test asks for it.
* :func:`write_fake_distribution` — write a ``*.dist-info`` folder with entry points and
  modules into a directory, so a test can exercise the real entry-point door without
  ``pip install``.

Example::

    from mlflow_er.testing import capture

    def test_my_training_loop(tmp_path):
        with capture("exp", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db") as cap:
            with cap.tracker.run(run_name="r") as run:
                run.log_metric("loss", 0.5, step=1)
        assert [(m.key, m.value, m.step) for m in cap.sink.metrics] == [("loss", 0.5, 1)]
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SinkError
from .hookspecs import SinkContext, hookimpl
from .records import Artifact, Batch, Metric, Param, Tag
from .sinks.base import Sink

if TYPE_CHECKING:
    import pluggy

    from .backends.base import Backend
    from .tracker import ExperimentTracker

__all__ = [
    "Capture", "MemorySink", "MemorySinkPlugin", "StoredArtifact", "capture", "memory_sink_plugin",
    "prefill_sqlite_store", "register_memory_sink", "unregister_memory_sink", "write_fake_distribution",
]

#: The name under which :data:`memory_sink_plugin` provides :class:`MemorySink`.
MEMORY_SINK_NAME = "memory"


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact as a :class:`MemorySink` received it, with its content copied into memory.

    ``files`` maps each file's destination path inside the run (``artifact_path`` joined
    with the file name, ``/``-separated, as MLflow would store it) to its bytes. A single
    file artifact has exactly one entry; a directory (``log_artifacts``) has one per file.
    """

    run_id: str
    artifact_path: str | None
    record: Artifact
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """Destination paths of the stored files, sorted."""
        return sorted(self.files)

    @property
    def content(self) -> bytes:
        """The bytes of a single-file artifact (``ValueError`` for a directory of several files)."""
        if len(self.files) != 1:
            raise ValueError(f"artifact has {len(self.files)} files; use .files")
        return next(iter(self.files.values()))


@dataclass
class _FailureRule:
    remaining: int | None  # None: for as long as the predicate matches
    transient: bool
    exc: BaseException | None
    predicate: Callable[[Batch | Artifact], bool] | None = None
    retry_after: float | None = None


class MemorySink(Sink):
    """A sink that stores everything it receives in memory, in arrival order.

    Thread-safe: a backend may call it from its writer thread while the test reads it.
    ``delay`` (seconds) is slept before each write, to model a slow destination.
    Artifacts are read into memory at once (backends delete snapshots after upload).

    Scripted failures, checked before a write is stored (the failed write stores nothing):

    * :meth:`fail_next` — the next ``n`` writes raise;
    * :meth:`fail_when` — every write whose batch/artifact matches a predicate raises.

    A failure is a :class:`~mlflow_er.errors.SinkError` with ``transient`` as asked,
    unless an explicit exception was given. ``attempts`` counts every write call,
    ``failures`` the ones that raised.
    """

    name = MEMORY_SINK_NAME

    def __init__(self, delay: float = 0.0):
        self.delay = float(delay)
        self._lock = threading.Lock()
        self._batches: list[Batch] = []
        self._artifacts: list[StoredArtifact] = []
        self._rules: list[_FailureRule] = []
        self.attempts = 0
        self.failures = 0
        self.flushes = 0
        self.closed = False

    # -- scripted failures ---------------------------------------------------------------
    def fail_next(self, n: int = 1, transient: bool = True, exc: BaseException | None = None,
                  retry_after: float | None = None) -> MemorySink:
        """Make the next ``n`` writes (batches or artifacts) raise.

        ``transient=True`` raises ``SinkError(transient=True)`` (a backend retries it),
        ``False`` a permanent ``SinkError`` (a backend bisects the batch). ``exc``, if given,
        is raised instead (the same instance each time). ``retry_after`` is passed on as the
        error's ``retry_after`` hint. Returns the sink, for chaining.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._rules.append(_FailureRule(n, transient, exc, None, retry_after))
        return self

    def fail_when(self, predicate: Callable[[Batch | Artifact], bool], transient: bool = False,
                  exc: BaseException | None = None) -> MemorySink:
        """Make every write whose :class:`Batch` or :class:`Artifact` satisfies ``predicate`` raise.

        Permanent by default, e.g. to check that a backend isolates one bad record::

            sink.fail_when(lambda b: isinstance(b, Batch) and any(m.key == "bad" for m in b.metrics))

        Returns the sink, for chaining. :meth:`clear_failures` removes every rule.
        """
        with self._lock:
            self._rules.append(_FailureRule(None, transient, exc, predicate))
        return self

    def clear_failures(self) -> None:
        """Forget every scripted failure."""
        with self._lock:
            self._rules.clear()

    def _check(self, item: Batch | Artifact) -> None:
        # Called with the lock held.
        self.attempts += 1
        for rule in self._rules:
            if rule.predicate is not None:
                hit = bool(rule.predicate(item))
            else:
                hit = bool(rule.remaining)
                if hit:
                    rule.remaining -= 1  # type: ignore[operator]
            if hit:
                self.failures += 1
                if rule.exc is not None:
                    raise rule.exc
                what = f"batch of {len(item)} record(s)" if isinstance(item, Batch) else "artifact"
                raise SinkError(f"memory sink: scripted {'transient' if rule.transient else 'permanent'} "
                                f"failure of a {what}", transient=rule.transient, retry_after=rule.retry_after)
        self._rules = [r for r in self._rules if r.predicate is not None or r.remaining]

    # -- the Sink contract ---------------------------------------------------------------
    def write_batch(self, batch: Batch) -> None:
        """Store ``batch`` (a copy of its lists), or raise a scripted failure."""
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self._check(batch)
            self._batches.append(Batch(batch.run_id, list(batch.metrics), list(batch.params), list(batch.tags)))

    def write_artifact(self, artifact: Artifact) -> None:
        """Read the artifact's file(s) into memory, or raise a scripted failure."""
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self._check(artifact)
        files = _read_artifact(artifact)
        with self._lock:
            self._artifacts.append(StoredArtifact(artifact.run_id, artifact.artifact_path, artifact, files))

    def flush(self) -> None:
        """Count the call (nothing to make durable)."""
        with self._lock:
            self.flushes += 1

    def close(self) -> None:
        """Mark the sink closed; what it stored stays readable."""
        self.closed = True

    # -- what arrived --------------------------------------------------------------------
    @property
    def batches(self) -> list[Batch]:
        """Every batch stored, in arrival order."""
        with self._lock:
            return list(self._batches)

    @property
    def records(self) -> list[Metric | Param | Tag]:
        """Every metric, param and tag, in arrival order (call order within a batch)."""
        return [r for b in self.batches for r in b.records()]

    @property
    def metrics(self) -> list[Metric]:
        """Every metric record, in arrival order."""
        return [m for b in self.batches for m in b.metrics]

    @property
    def params(self) -> list[Param]:
        """Every param record, in arrival order."""
        return [p for b in self.batches for p in b.params]

    @property
    def tags(self) -> list[Tag]:
        """Every tag record, in arrival order."""
        return [t for b in self.batches for t in b.tags]

    @property
    def artifacts(self) -> list[StoredArtifact]:
        """Every artifact stored, in arrival order, with its content."""
        with self._lock:
            return list(self._artifacts)

    def metric_history(self, key: str, run_id: str | None = None) -> list[tuple[int, float]]:
        """``(step, value)`` of every value logged for ``key``, in arrival order."""
        return [(m.step, m.value) for m in self.metrics if m.key == key and run_id in (None, m.run_id)]

    def param_dict(self, run_id: str | None = None) -> dict[str, str]:
        """Params as a dict (of one run if ``run_id`` is given)."""
        return {p.key: p.value for p in self.params if run_id in (None, p.run_id)}

    def tag_dict(self, run_id: str | None = None) -> dict[str, str]:
        """Tags as a dict, last write winning (of one run if ``run_id`` is given)."""
        return {t.key: t.value for t in self.tags if run_id in (None, t.run_id)}

    def files(self, run_id: str | None = None) -> dict[str, bytes]:
        """Every artifact file as ``{destination path: bytes}`` (later uploads win)."""
        out: dict[str, bytes] = {}
        for a in self.artifacts:
            if run_id in (None, a.run_id):
                out.update(a.files)
        return out

    def clear(self) -> None:
        """Forget everything stored (scripted failures and counters stay)."""
        with self._lock:
            self._batches.clear()
            self._artifacts.clear()

    def __repr__(self) -> str:
        return f"<MemorySink batches={len(self._batches)} artifacts={len(self._artifacts)}>"


def _read_artifact(artifact: Artifact) -> dict[str, bytes]:
    """Copy an artifact's content into memory, keyed by its destination path in the run."""
    prefix = f"{artifact.artifact_path.strip('/')}/" if artifact.artifact_path else ""
    if artifact.local_path is None:
        # The pipeline renders payloads before any sink sees them.
        raise SinkError("memory sink: artifact has no local file (was it handed in without the pipeline?)")
    src = Path(artifact.local_path)
    if artifact.is_dir:
        return {prefix + f.relative_to(src).as_posix(): f.read_bytes() for f in sorted(src.rglob("*")) if f.is_file()}
    return {prefix + src.name: src.read_bytes()}


# -- the "memory" sink as a plugin -----------------------------------------------------------
class MemorySinkPlugin:
    """A pluggy plugin providing the sink name ``"memory"``.

    Every :class:`MemorySink` it builds is appended to :attr:`instances`, so a test that
    selected the sink by name can still read it (:attr:`last`). Sink options
    (``sink_options={"memory": {"delay": 0.01}}``) go to the constructor.
    """

    def __init__(self) -> None:
        self.instances: list[MemorySink] = []

    @property
    def last(self) -> MemorySink | None:
        """The most recently built sink, or ``None`` if none was built yet.

        Never raises: pluggy reads every attribute of a plugin when it is registered.
        """
        return self.instances[-1] if self.instances else None

    @hookimpl
    def mlflow_er_sink_names(self) -> list[str]:
        """Provides ``"memory"``."""
        return [MEMORY_SINK_NAME]

    @hookimpl
    def mlflow_er_make_sink(self, name: str, context: SinkContext) -> Sink | None:
        """Build a :class:`MemorySink` for ``"memory"``; defer on any other name."""
        if name != MEMORY_SINK_NAME:
            return None
        sink = MemorySink(**context.options)
        self.instances.append(sink)
        return sink


#: The process-wide ``"memory"`` sink plugin; register it with :func:`register_memory_sink`.
memory_sink_plugin = MemorySinkPlugin()


def register_memory_sink(pm: pluggy.PluginManager | None = None) -> MemorySinkPlugin:
    """Register :data:`memory_sink_plugin` (idempotent) so ``sinks=["memory"]`` works; return it.

    ``pm`` defaults to mlflow-er's plugin manager. Note that
    :func:`mlflow_er.plugins.reset_plugin_manager` forgets the registration.
    """
    from .plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    if not pm.is_registered(memory_sink_plugin):
        pm.register(memory_sink_plugin, name="mlflow_er.testing:memory")
    return memory_sink_plugin


def unregister_memory_sink(pm: pluggy.PluginManager | None = None) -> None:
    """Undo :func:`register_memory_sink` (no error if it was not registered)."""
    from .plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    if pm.is_registered(memory_sink_plugin):
        pm.unregister(memory_sink_plugin)


# -- capture() -------------------------------------------------------------------------------
@dataclass
class Capture:
    """What :func:`capture` yields: the tracker and the :class:`MemorySink` it writes to.

    The shortcuts ``metrics``, ``params``, ``tags``, ``artifacts`` and ``records`` read
    the sink.
    """

    tracker: ExperimentTracker
    sink: MemorySink

    @property
    def batches(self) -> list[Batch]:
        """Batches that reached the sink."""
        return self.sink.batches

    @property
    def records(self) -> list[Metric | Param | Tag]:
        """Metrics, params and tags that reached the sink, in arrival order."""
        return self.sink.records

    @property
    def metrics(self) -> list[Metric]:
        """Metric records that reached the sink."""
        return self.sink.metrics

    @property
    def params(self) -> list[Param]:
        """Param records that reached the sink."""
        return self.sink.params

    @property
    def tags(self) -> list[Tag]:
        """Tag records that reached the sink."""
        return self.sink.tags

    @property
    def artifacts(self) -> list[StoredArtifact]:
        """Artifacts (with content) that reached the sink."""
        return self.sink.artifacts


@contextmanager
def capture(experiment_name: str | None = "mlflow-er-capture", *, tracking_uri: str | None = None,
            backend: str | Backend | None = "sync", sinks: Sequence[str | Sink] = (),
            tracker: ExperimentTracker | None = None, sink: MemorySink | None = None,
            sink_options: Mapping[str, dict[str, Any]] | None = None, **tracker_kwargs: Any) -> Iterator[Capture]:
    """Capture what a tracker delivers, in a :class:`MemorySink`.

    Without ``tracker``: build an :class:`~mlflow_er.ExperimentTracker` for
    ``experiment_name`` on ``tracking_uri`` (MLflow still resolves the experiment and
    the runs there) whose sinks are the memory sink plus any extra ``sinks`` (e.g.
    ``["mlflow"]`` to also write to MLflow). ``backend`` defaults to ``"sync"`` so
    records are there as soon as a log call returns; other keyword arguments go to the
    tracker.

    With ``tracker``: attach the memory sink to that tracker for the duration of the
    block (no run of it may be open, since a backend takes its sinks when a run opens)
    and detach it afterwards.

    ``sink`` may be a ready :class:`MemorySink` (e.g. with scripted failures).
    """
    from .tracker import ExperimentTracker

    mem = sink if sink is not None else MemorySink()
    if tracker is None:
        built = ExperimentTracker(experiment_name, tracking_uri=tracking_uri, backend=backend,
                                  sinks=[mem, *sinks], sink_options=dict(sink_options or {}), **tracker_kwargs)
        yield Capture(built, mem)
        return
    if getattr(tracker, "_open_runs", 0):
        raise RuntimeError("capture(tracker=...) needs a tracker without an open run")
    before = list(tracker._spec)
    tracker._set_sinks([*before, mem])
    try:
        yield Capture(tracker, mem)
    finally:
        tracker._set_sinks(before)


# -- fake distributions ----------------------------------------------------------------------
def write_fake_distribution(root: str | os.PathLike[str], name: str, version: str = "1.0",
                            entry_points: Mapping[str, Mapping[str, str]] | None = None,
                            modules: Mapping[str, str] | None = None) -> Path:
    """Write an installed-looking distribution into ``root``; return its ``.dist-info`` folder.

    ``entry_points`` maps a group (``"mlflow_er.sinks"``) to ``{entry name: "module[:attr]"}``;
    ``modules`` maps a module name to its source, written as ``root/<module>.py``. Put
    ``root`` on ``sys.path`` (``monkeypatch.syspath_prepend(root)``, which also clears
    import caches) and call :func:`mlflow_er.plugins.reset_plugin_manager` so the next
    tracker loads it through the same entry-point door as a pip-installed plugin.
    Remember to drop the modules from ``sys.modules`` afterwards if another test writes
    modules of the same name.
    """
    root = Path(root)
    safe = name.replace("-", "_")
    info = root / f"{safe}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines: list[str] = []
    for group, entries in (entry_points or {}).items():
        lines.append(f"[{group}]")
        lines.extend(f"{ep} = {value}" for ep, value in entries.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    for mod, source in (modules or {}).items():
        (root / f"{mod}.py").write_text(source, encoding="utf-8")
    return info


# -- a fast SQLite tracking store ------------------------------------------------------------
_template_lock = threading.Lock()
_template: Path | None = None


def _sqlite_template() -> Path:
    global _template
    with _template_lock:
        if _template is None or not _template.exists():
            import tempfile

            from mlflow import MlflowClient

            folder = Path(tempfile.mkdtemp(prefix="mlflow-er-sqlite-template-"))
            db = folder / "mlflow.db"
            MlflowClient(f"sqlite:///{db}").search_experiments()  # runs the schema migrations once
            _template = db
        return _template


def prefill_sqlite_store(uri: str) -> str:
    """Create the SQLite file of ``uri`` (``sqlite:///path``) from an already migrated template.

    A new MLflow SQLite store spends about a second in schema migrations; tests that
    each want a fresh store pay that once per process instead. Does nothing if the file
    already exists. Returns ``uri``.
    """
    import shutil

    if not uri.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite:/// URI: {uri!r}")
    target = Path(uri[len("sqlite:///"):])
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_sqlite_template(), target)
    return uri
