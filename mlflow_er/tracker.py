"""``ExperimentTracker``: the original helper's API, on pluggable backends and sinks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage

from . import health, options, plugins, recap, run_end, runblock, strategies
from .backends.base import Backend
from .errors import DeliveryError, MlflowErError, Terminated
from .hookspecs import SinkContext
from .jobs import JobRunner
from .named_sinks import build as build_pipeline
from .pipeline import Pipeline
from .probe import PROBE_TIMEOUT as PROBE_TIMEOUT  # re-exported: 0.2 had these here
from .probe import normalize_tracking_uri as normalize_tracking_uri
from .probe import probe_server as probe_server
from .ranks import InactiveBackend, InactiveClient, RankPlan
from .redact import redact
from .run import Run
from .sinks.base import Sink
from .strategies import DEFAULT_BACKEND as DEFAULT_BACKEND  # re-exported: 0.2 had these here
from .strategies import DEFAULT_SINKS as DEFAULT_SINKS

log = logging.getLogger(__name__)



def git_commit() -> str:
    """The current git commit, or ``""`` outside a repository or without git (never raises)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.decode("ascii", "replace").strip() if out.returncode == 0 else ""


class ExperimentTracker:
    """Find or create an MLflow experiment and log runs into it.

    Arguments are those of the original helper — ``experiment_name``, ``experiment_id``,
    ``tracking_uri``, ``artifact_location``, ``create_new``, ``**experiment_tags`` — plus
    ``backend`` (a name such as ``"sync"``/``"threaded"`` or a :class:`Backend` instance;
    ``MLFLOW_ER_BACKEND`` sets the default), ``sinks`` (names or :class:`Sink` instances;
    ``MLFLOW_ER_SINKS`` sets the default, comma-separated), ``backend_options`` (keyword
    arguments for a backend chosen by name), ``sink_options`` (per sink name, a dict of
    options) and ``close_timeout`` (seconds a run's end may wait for
    delivery). ``ranks``: ``"zero"`` (only rank 0 of a distributed job logs; the others
    contact nothing) or ``"all"`` (every rank logs into one run, metric keys suffixed
    ``/rank{r}``) or ``"each"`` (ignore ranks) — see :mod:`mlflow_er.ranks`. ``health_interval``: seconds between
    samples of ``run.stats()`` logged into the run as ``mlflow_er.*`` metrics
    (default ``$MLFLOW_ER_HEALTH_INTERVAL``, else off) — see :mod:`mlflow_er.health`.
    """

    def __init__(self, experiment_name: str | None = None, experiment_id: str | None = None,
                 tracking_uri: str | None = None, artifact_location: str | None = None, create_new: bool = True,
                 *, backend: str | Backend | None = None, sinks: Sequence[str | Sink] | str | None = None,
                 backend_options: dict[str, Any] | None = None, sink_options: dict[str, dict[str, Any]] | None = None,
                 close_timeout: float | None = 300.0, ranks: str = "zero", health_interval: float | None = None,
                 quiet: bool | None = None, **experiment_tags: Any):
        self.background_workers: dict[str, Any] = {}  # the seed exposed this attribute
        #: This process's rank in a distributed job (from the launcher's environment) and its role.
        self.rank = RankPlan.detect(ranks)
        inactive = self.rank.inactive  # ranks="zero" on rank > 0: build nothing that reaches a store
        pm = plugins.get_plugin_manager()
        spec = strategies.sink_names(sinks)
        # Before anything is built or resolved: a typo in an option names the valid ones.
        options.check_sinks([s for s in spec if isinstance(s, str)], sink_options or {})
        if not isinstance(backend, Backend):
            options.check_backend(strategies.backend_name(backend), backend_options or {})
        #: True silences the recap at each run's end (default: ``$MLFLOW_ER_QUIET``); see :mod:`mlflow_er.recap`.
        self.quiet = recap.quiet(quiet)
        self._given_uri = os.fspath(tracking_uri) if tracking_uri is not None else None
        #: True when every sink works without a server: nothing here contacts the tracking server.
        self.offline = inactive or all(not strategies.needs_server(pm, s) for s in spec)
        uri = tracking_uri if inactive else normalize_tracking_uri(tracking_uri, probe=not self.offline)
        if uri is not None and not self.offline:
            mlflow.set_tracking_uri(uri)  # as the seed did: fluent calls inside a run go there too
        self._uri = os.fspath(uri) if uri else mlflow.get_tracking_uri()
        # Built on first use: a client sends no request, but on a sqlite URI it creates the
        # database, which an offline tracker must not do.
        self._client: Any = InactiveClient(self.rank) if inactive else None
        resolver_client = None if self.offline else self.client
        self.health_interval = None if inactive else health.interval(health_interval)
        self.close_timeout = close_timeout
        tags = {k: str(v) for k, v in experiment_tags.items()}
        commit = git_commit()
        tags.setdefault("git_commit", commit)
        self._experiment = self.rank.resolve_experiment(pm.hook.mlflow_er_resolve_experiment, dict(
            client=resolver_client, experiment_name=experiment_name, experiment_id=experiment_id,
            artifact_location=artifact_location, create_new=create_new, tags=tags), offline=self.offline)
        if self._experiment is None:
            raise MlflowErError("no plugin resolved the experiment")
        self.git_commit = (self._experiment.tags or {}).get("git_commit", commit)
        self._backend = (InactiveBackend(self.rank) if inactive
                         else strategies.make_backend(backend, backend_options or {}))
        self._sink_options = sink_options or {}
        self._spec: list[str | Sink] = [] if inactive else spec
        # Built now so a bad name or option fails here, not at the first run; rebuilt per outermost run.
        self._pipeline: Pipeline | None = self._new_pipeline() if not inactive else None
        self._pipeline_fresh = True
        self._runs_lock = threading.Lock()  # opening/closing the shared backend, from any thread
        self._open_runs = 0
        self._jobs = JobRunner()
        self._active: list[Run] = []
        log.info("%r", self)

    # -- strategies ------------------------------------------------------------------------
    def _sink_context(self, name: str) -> SinkContext:
        return SinkContext(self._uri, self.id, self._experiment.name, dict(self._sink_options.get(name, {})))

    def _set_sinks(self, spec: list[str | Sink]) -> None:
        """Change the sinks between runs (``testing.capture``): the next run delivers to these."""
        with self._runs_lock:
            if self._open_runs:
                raise MlflowErError("the sinks of a tracker can change only while none of its runs is open")
            if self._pipeline is not None and not self._pipeline.closed:
                self._pipeline.close(0)
            self._spec = list(spec)
            self._pipeline = self._new_pipeline()
            self._pipeline_fresh = True

    def _new_pipeline(self) -> Pipeline:
        return build_pipeline(self._spec, self._sink_context, tracking_uri=self._uri)

    @property
    def client(self) -> MlflowClient:
        """The tracker's own ``MlflowClient`` on its tracking URI (built on first use)."""
        if self._client is None:
            self._client = MlflowClient(self._uri)
        return self._client

    @property
    def backend(self) -> Backend:
        """The backend carrying this tracker's records."""
        return self._backend

    @property
    def sinks(self) -> list[Sink]:
        """The sinks this tracker's records land in (durable ones first)."""
        return self._pipeline.sinks if self._pipeline is not None else []

    # -- the seed's properties -------------------------------------------------------------
    def _fresh(self):
        # Offline, the experiment resolved at construction is all there is.
        return self._experiment if self.offline else self.client.get_experiment(self.id)

    def _online(self, what: str) -> None:
        if self.offline:
            why = f"{self.rank.describe()} is inactive, ranks='zero'" if self.rank.inactive else "spool-only sinks"
            raise MlflowErError(f"{what} needs the tracking server; this tracker is offline ({why})")

    @property
    def id(self) -> str:
        """The experiment id."""
        return self._experiment.experiment_id

    @property
    def name(self) -> str:
        """The experiment name as the store has it now (it can be renamed in the UI)."""
        return self._fresh().name

    @property
    def uri(self) -> str:
        """The tracking URI."""
        return self._uri

    @property
    def artifact_location(self) -> str:
        """Where the experiment's artifacts are stored."""
        return self._fresh().artifact_location

    @property
    def lifecycle_stage(self) -> str:
        """``active`` or ``deleted``."""
        try:
            return self._fresh().lifecycle_stage
        except Exception:
            return LifecycleStage.DELETED

    @property
    def last_update_time(self) -> int | None:
        """Last update time of the experiment (ms)."""
        return self._fresh().last_update_time

    @property
    def tags(self) -> dict[str, str]:
        """The experiment's tags."""
        return self._fresh().tags

    @property
    def creation_time(self) -> int | None:
        """Creation time of the experiment (ms)."""
        return self._experiment.creation_time

    def __repr__(self) -> str:
        e = self._experiment
        return (f"ExperimentTracker(name={e.name!r}, id={e.experiment_id!r}, uri={redact(self._uri)!r}, "
                f"artifact_location={e.artifact_location!r}, git_commit={self.git_commit!r}, "
                f"backend={self._backend.name!r}, sinks={[s.name for s in self.sinks]!r})")

    # -- runs ------------------------------------------------------------------------------
    def get_all_runs(self):
        """Every run of the experiment as a pandas DataFrame (``mlflow.search_runs``)."""
        self._online("get_all_runs")
        return mlflow.search_runs([self.id])

    def find_run(self, run_name: str | None = None, run_id: str | None = None) -> tuple[str | None, str | None]:
        """``(run_name, run_id)`` of a run found by name (newest first), else by id; ``(None, None)``."""
        from .resolve import find_run_id

        self._online("find_run")
        return find_run_id(self.client, self.id, run_name, run_id)

    def background_worker(self, name: str, logger: Callable[..., Any], use_process: bool = False,
                          *args: Any, **kwargs: Any) -> None:
        """Run ``logger(*args, **kwargs)`` in the background, as the original helper did.

        A job with the same ``name`` first waits for the previous one. ``use_process=True``
        runs it in a fresh interpreter with the active run passed explicitly (never a
        ``fork()`` of this process). All jobs are joined, with a bound, when the run ends;
        failures are raised there as :class:`DeliveryError`.
        """
        if self.rank.inactive:  # a logging job: only rank 0 logs (and its fluent calls would reach the server)
            log.debug("background_worker %r not run: %s is inactive (ranks='zero')", name, self.rank.describe())
            return
        active = self._active[-1].run_id if self._active else None
        self._jobs.submit(name, logger, use_process, args, kwargs, self._uri, active, self.close_timeout)

    def run(self, run_name: str | None = None, run_id: str | None = None, description: str | None = None,
            nested: bool = False, resume: bool = True, **run_tags: Any) -> runblock.RunBlock:
        """Resume a run found by name (first) or id, else start one: ``with tracker.run(...) as run:``.

        The block yields a :class:`Run`. It is MLflow's active run inside the block, so fluent
        ``mlflow.log_*`` calls keep working. Leaving the block flushes, ends the run (FINISHED,
        or FAILED if the block raised), logs a recap (:mod:`mlflow_er.recap`) and raises
        :class:`DeliveryError` for anything not delivered. A resumed run is announced in one
        line; ``resume=False`` always starts a new run, even if one has this ``run_name``.
        """
        return runblock.RunBlock(self._run_block(run_name, run_id, description, nested, resume, run_tags), run_name)

    @contextmanager
    def _run_block(self, run_name: str | None, run_id: str | None, description: str | None, nested: bool,
                   resume: bool, run_tags: dict[str, Any]) -> Iterator[Run]:
        if self.offline:
            parent_id = self._active[-1].run_id if (nested and self._active) else None
        else:
            parent = mlflow.active_run()
            parent_id = parent.info.run_id if (nested and parent) else None
        tags = {k: str(v) for k, v in run_tags.items()}
        pm = plugins.get_plugin_manager()
        client = None if self.offline or not self.rank.owns_runs else self.client
        before = runblock.previous_run(client, self.id, run_name, run_id) if resume else None
        rid = self.rank.resolve_run(pm.hook.mlflow_er_resolve_run if resume else runblock.new_run, dict(
            client=None if self.offline else self.client, experiment_id=self.id, run_name=run_name, run_id=run_id,
            description=description, parent_run_id=parent_id, tags=tags))
        if rid is None:
            raise MlflowErError("no plugin resolved the run")
        resumed = before is not None and before.info.run_id == rid
        by_name = bool(resumed and run_name and before is not None and before.info.run_name == run_name)
        if resumed and before is not None:
            recap.show([runblock.resume_line(before, by_name)], self.quiet)
        params: dict[str, str] = {}
        # Offline there is no MLflow run to make active (fluent calls are not routed); with
        # ranks="all" only rank 0 starts (and ends) it.
        if not self.offline and self.rank.owns_runs:
            active = mlflow.start_run(run_id=rid, nested=nested, tags=tags or None, description=description)
            params = active.data.params if active.data else {}
        self._open_backend()
        handle = self.rank.make_run(rid, self._backend, None if self.offline else self.client, params, tracker=self)
        if self.rank.owns_runs:
            handle._begin(run_name=run_name, parent_run_id=parent_id, description=description, tags=tags)
        if resumed:
            runblock.explain_param_conflicts(handle, run_name, by_name)
        handle._recap_facts = (run_name, resumed)  # type: ignore[attr-defined]
        handle.recap = None  # type: ignore[attr-defined]
        spool = self._spool_path()
        if spool is not None and not self.rank.inactive:
            recap.announce_spool(rid, run_name, spool, self._sync_uri(), self.offline, self.quiet)
        self._active.append(handle)
        exporter = health.start(handle, self.health_interval)
        status = "FINISHED"
        block_error: BaseException | None = None
        try:
            yield handle
        except (KeyboardInterrupt, Terminated) as exc:
            status, block_error = "KILLED", exc
            raise
        except BaseException as exc:
            status, block_error = "FAILED", exc
            raise
        finally:
            if handle in self._active:
                self._active.remove(handle)  # blocks may end in any order
            if exporter is not None:
                exporter.stop()  # a last sample, before the final flush delivers it
            self._finish(handle, status, block_error)

    def _open_backend(self) -> None:
        with self._runs_lock:
            if self._open_runs == 0 and self._pipeline is not None:
                if not self._pipeline_fresh:  # the previous outermost run closed it: sinks by name are rebuilt
                    self._pipeline = self._new_pipeline()
                self._pipeline_fresh = False
                self._backend.open(self._pipeline)
            self._open_runs += 1

    def _finish(self, handle: Run, status: str, block_error: BaseException | None) -> None:
        """End a run block within ``close_timeout``, whatever happens meanwhile (Ctrl-C, SIGTERM).

        Its end record follows its records; then this thread waits for delivery (the last run
        of the backend closes it). What is unsent when time runs out — or when a second Ctrl-C
        or a SIGTERM arrives — is kept on disk, with the ``mlflow-er sync`` command logged.
        """
        if sys.is_finalizing():
            # A block left open until the interpreter shuts down: the atexit drain already delivered
            # or kept its records; no thread can start now, so there is nothing more to do safely.
            return
        budget = self.close_timeout
        deadline = None if budget is None else time.monotonic() + budget
        failures = self._jobs.join_all(budget)
        if self.rank.owns_runs:
            handle._end(status)
        else:
            handle.ended = status
        problem: DeliveryError | None = None
        interrupted: BaseException | None = None
        try:
            problem = self._deliver_run(deadline, status)
        except (KeyboardInterrupt, Terminated) as exc:  # stop now: unsent records were kept on disk
            interrupted, status = exc, "KILLED"
        facts: recap.Recap | None = None
        try:  # before the run's status is stored: a SIGTERM here still ends it KILLED
            facts = self._recap(handle, status, problem, len(failures))
        except (KeyboardInterrupt, Terminated) as exc:
            interrupted, status = interrupted or exc, "KILLED"
        if not self.offline and self.rank.owns_runs:
            left = 5.0 if deadline is None else max(1.0, deadline - time.monotonic())
            try:
                run_end.end_mlflow_run(self.client, self._uri, handle.run_id, status, left)
            except (KeyboardInterrupt, Terminated) as exc:
                # Stopped while the status was being stored: the process is going away, so the run
                # ends KILLED (bounded; a further Ctrl-C stops at once).
                interrupted, status = interrupted or exc, "KILLED"
                run_end.set_status(self.client, self._uri, handle.run_id, status, 5.0)
        if facts is not None:
            facts.status = status
            recap.show(facts.lines(), self.quiet)
        if interrupted is not None:
            raise interrupted
        error = run_end.run_error(failures, problem)
        if error is not None:
            if block_error is not None:
                # Never mask the block's own exception: attach the delivery problem to it.
                log.error("run %s: %s", handle.run_id, error)
                if hasattr(block_error, "add_note"):
                    block_error.add_note(f"mlflow-er: {error}")
                return
            raise error from problem

    def _deliver_run(self, deadline: float | None, status: str) -> DeliveryError | None:
        with self._runs_lock:
            self._open_runs -= 1
            last = self._open_runs == 0
        return run_end.deliver(self._backend, last, deadline, status, redact(self._uri), self._keep_location)

    def _spool_path(self) -> str | None:
        """The folder of this tracker's durable sink (the spool), if it has one."""
        pipeline = self._pipeline
        for lane in pipeline.lanes if pipeline is not None else ():
            if lane.durable:
                return str(getattr(lane.sink, "path", lane.name))
        return None

    def _sync_uri(self) -> str | None:
        return self._given_uri if self.offline else self._uri

    def _recap(self, handle: Run, status: str, problem: DeliveryError | None, job_failures: int) -> recap.Recap | None:
        """Keep the run's recap on the handle (``run.recap``) and return it (None on a silent rank)."""
        if self.rank.inactive:
            return None
        try:
            run_name, resumed = getattr(handle, "_recap_facts", (None, False))
            kept = problem.kept_in if problem is not None else None
            facts = recap.build(run_id=handle.run_id, run_name=run_name, status=status, experiment_id=self.id,
                                tracking_uri=self._uri, sync_uri=self._sync_uri(), stats=self._backend.stats(),
                                offline=self.offline, spool=kept or self._spool_path(), problem=problem,
                                resumed=resumed)
            facts.failed += job_failures
        except Exception as exc:  # a recap must never turn a finished run into an error
            log.debug("mlflow-er: no recap for run %s: %s", handle.run_id, exc)
            return None
        handle.recap = facts  # type: ignore[attr-defined]
        return facts

    def _keep_location(self) -> str:
        pipeline = getattr(self._backend, "pipeline", None)
        return pipeline.keep_location() if isinstance(pipeline, Pipeline) else "a folder under the staging directory"
