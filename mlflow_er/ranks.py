"""Distributed training: which ranks log, and how several ranks share one run.

Launchers tell each process its rank through environment variables; mlflow-er reads them
once, when an ``ExperimentTracker`` is built, and never imports torch (or MPI). The rank
comes from the first variable found, the world size from the variable of the same family:

=========================  =========================  ==========================================
rank                       world size                 set by
=========================  =========================  ==========================================
``RANK``                   ``WORLD_SIZE``             torchrun, ``torch.distributed.launch``,
                                                      DeepSpeed, Accelerate, Lightning
``OMPI_COMM_WORLD_RANK``   ``OMPI_COMM_WORLD_SIZE``   Open MPI ``mpirun``
``PMI_RANK``               ``PMI_SIZE``               MPICH, Intel MPI
``SLURM_PROCID``           ``SLURM_NTASKS``           Slurm ``srun``
``LOCAL_RANK``             ``LOCAL_WORLD_SIZE``       single-node launchers that set only it
=========================  =========================  ==========================================

``RANK`` comes first because ``srun torchrun ...`` sets both: torchrun's is the real one.
No variable means a single process (rank 0 of 1) and ``ranks=`` changes nothing.

``ranks="zero"`` (the default)
    Rank 0 logs as a single process would. Every other rank is *inactive*: its tracker
    builds no client, store, backend thread or sink, resolves nothing and contacts no
    server; its ``Run`` validates every call (so a bad key fails on every rank) and then
    discards the record. ``stats()`` says ``{"rank": r, "role": "inactive", ...}``,
    ``run_id`` is ``""``, ``background_worker`` does not run the job (it is a logging job,
    and its fluent MLflow calls would reach the server), ``tracker.client``, ``run.info``,
    ``find_run`` and ``get_all_runs`` raise :class:`~mlflow_er.errors.MlflowErError`.

``ranks="all"``
    Every rank logs into one run. Rank 0 resolves (finds or creates) the experiment and
    the run as usual and shares them; the other ranks wait (up to
    ``$MLFLOW_ER_RANK_TIMEOUT`` s, default 300, then :class:`~mlflow_er.errors.RankTimeout`
    saying what to check). How they meet, first that applies: ``MLFLOW_RUN_ID`` in the
    environment names the run for every rank (rank 0 resumes it, nobody waits);
    ``$MLFLOW_ER_RANK_DIR`` set: a small JSON file there (below); a tracking server and a
    launch identity (torchrun, Slurm, MPI): rank 0 tags the run with the launch and the
    others find it by that tag on the server, so hosts share no folder and an elastic
    restart resumes the same run (:mod:`mlflow_er.rendezvous`); else a file in a per-launch
    folder of the temp dir, which only one node's ranks see. Metric keys get the
    suffix ``/rank{r}`` on every rank, rank 0 included (``loss`` → ``loss/rank0``,
    ``loss/rank1`` ...): MLflow metrics have no labels, and the UI groups keys by their
    first segment, so all ranks' ``loss`` lines land in one ``loss`` section. Params,
    tags and artifacts are logged by rank 0 only; on other ranks they are validated
    (a param re-logged with another value still raises) and discarded, so identical
    ``log_params(config)`` calls on every rank cost nothing and never conflict. Only rank
    0 starts and ends the MLflow run (the others flush their records and stop), and only
    there is the run MLflow's active run for fluent ``mlflow.log_*`` calls.

``ranks="each"``
    Ranks are ignored: every process logs its own runs, as without a launcher. For
    ``srun``/``mpirun`` jobs whose tasks are independent (a sweep), not one training.
    ``ranks="zero"`` warns once on an inactive rank found through ``SLURM_PROCID``,
    ``OMPI_COMM_WORLD_RANK`` or ``PMI_RANK``, as those launchers also run such sweeps.

Where the rank file lives (no server rendezvous): ``$MLFLOW_ER_RANK_DIR`` if set — it must be shared by all
ranks, so on several nodes point it at a shared filesystem, one folder per job (e.g.
``$SCRATCH/mlflow-er/$SLURM_JOB_ID``) — else a folder under the temp dir named after the
launch (``TORCHELASTIC_RUN_ID``, ``MASTER_ADDR``/``MASTER_PORT``, the restart count,
``SLURM_JOB_ID``/``SLURM_STEP_ID`` and the launcher's pid), which one node's ranks share.
Ranks find their file by experiment, run name and how many ``tracker.run()`` blocks
with those came before in the process: every rank is expected to run the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .errors import ExperimentNotFound, MlflowErError, RankTimeout
from .rank_runs import InactiveBackend, InactiveClient, InactiveRun, RankedRun
from .rendezvous import ServerRendezvous, poll
from .run import Run

log = logging.getLogger(__name__)

MODES = ("zero", "all", "each")
#: Launchers that also run independent tasks (sweeps): an inactive rank found through them warns.
SWEEP_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
ENV_DIR = "MLFLOW_ER_RANK_DIR"
ENV_TIMEOUT = "MLFLOW_ER_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
#: (rank variable, world-size variable), in the order they are looked at.
RANK_VARS = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
             ("SLURM_PROCID", "SLURM_NTASKS"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
#: What identifies one launch of a job; the rank files of different launches never mix.
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
               "SLURM_STEP_ID", "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise MlflowErError(f"{name}={raw!r} is not an integer; cannot tell this process's rank") from None
    if value < 0:
        raise MlflowErError(f"{name}={raw!r} is negative; cannot tell this process's rank")
    return value


@dataclass(frozen=True)
class RankPlan:
    """This process's rank and what the ``ranks`` mode makes of it (see the module docstring)."""

    mode: str = "zero"
    rank: int = 0
    world_size: int | None = 1
    #: The variable the rank was read from; ``None`` for a single process.
    source: str | None = None

    @classmethod
    def detect(cls, mode: str = "zero", env: Mapping[str, str] | None = None) -> RankPlan:
        """Read the rank from ``env`` (default ``os.environ``); raise ``ValueError`` for an unknown mode."""
        if mode not in MODES:
            raise ValueError(f"ranks must be one of {MODES}, got {mode!r}")
        env = os.environ if env is None else env
        for rank_var, size_var in RANK_VARS:
            rank = _int_env(env, rank_var)
            if rank is not None:
                size = _int_env(env, size_var)
                if size is not None and rank >= size:
                    raise MlflowErError(f"{rank_var}={rank} is not below {size_var}={size}")
                plan = cls(mode, rank, size, rank_var)
                if plan.inactive and rank_var in SWEEP_VARS and not _warned:
                    _warned.append(True)
                    log.warning("mlflow-er: %s is inactive (ranks='zero'): only rank 0 logs. If the tasks of this "
                                "job are independent (a sweep), pass ranks='each'", plan.describe())
                return plan
        return cls(mode)

    @property
    def distributed(self) -> bool:
        """A rank variable is set, the world is not known to be a single process, and ranks are not ignored."""
        return self.source is not None and self.mode != "each" and (self.world_size is None or self.world_size > 1)

    @property
    def inactive(self) -> bool:
        """``ranks="zero"`` on a rank other than 0: log nothing, contact nothing."""
        return self.distributed and self.mode == "zero" and self.rank != 0

    @property
    def shared(self) -> bool:
        """``ranks="all"`` with several ranks: one run, metric keys suffixed by rank."""
        return self.distributed and self.mode == "all"

    @property
    def role(self) -> str:
        """``single``, ``leader`` (rank 0), ``member`` (another rank of ``"all"``) or ``inactive``."""
        if not self.distributed:
            return "single"
        if self.inactive:
            return "inactive"
        return "leader" if self.rank == 0 else "member"

    @property
    def owns_runs(self) -> bool:
        """Whether this process starts and ends MLflow runs (members and inactive ranks do not)."""
        return self.role in ("single", "leader")

    def describe(self) -> str:
        """``rank 2 of 4 (RANK)``."""
        size = "?" if self.world_size is None else self.world_size
        return f"rank {self.rank} of {size} ({self.source})"

    def info(self) -> dict[str, Any]:
        """What ``stats()`` reports about the rank."""
        return {"rank": self.rank, "world_size": self.world_size, "role": self.role, "ranks": self.mode}

    # -- experiment and run resolution ---------------------------------------------------------
    def resolve_experiment(self, resolve: Callable[..., Any], args: dict[str, Any], offline: bool) -> Any:
        """Call ``resolve(**args)`` (the resolve-experiment hook) as this rank should.

        Only rank 0 may create the experiment: several ranks creating it at once would
        race. Another rank first looks without creating, and if it is not there yet waits
        for rank 0 to publish its id.
        """
        if self.inactive:
            from .resolve import offline_experiment

            return offline_experiment(args.get("experiment_name"), args.get("experiment_id"), args.get("tags"))
        if not self.shared or offline:  # offline resolution is local: nothing to race for
            return resolve(**args)
        meet = self._server(args)
        path = self._path("experiment", args.get("experiment_name"), args.get("experiment_id"))
        if self.rank == 0:
            exp = resolve(**args)
            if exp is not None and meet is None:
                _publish(path, {"experiment_id": exp.experiment_id, "rank": self.rank, "pid": os.getpid()})
            return exp
        what = f"the experiment {args.get('experiment_name') or args.get('experiment_id')!r}"

        def lookup() -> Any:
            try:
                return resolve(**{**args, "create_new": False})
            except ExperimentNotFound:
                return None  # rank 0 has not created it yet

        if meet is not None:  # the server is where rank 0 creates it: ask it again until it is there
            return poll(lookup, _timeout(), lambda: f"{self.describe()}: rank 0 did not create {what} within "
                        f"{_timeout():.0f}s. {meet.hint()} {ENV_TIMEOUT} sets the wait")
        found = lookup()
        if found is not None:
            return found
        shared = self._wait(path, what)
        return resolve(**{**args, "experiment_id": shared["experiment_id"], "create_new": False})

    def resolve_run(self, resolve: Callable[..., str | None], args: dict[str, Any]) -> str | None:
        """The run id for a ``tracker.run()`` block: rank 0 resolves and publishes it, other ranks wait for it."""
        if self.inactive:
            return ""
        if not self.shared:
            return resolve(**args)
        env_id = os.environ.get("MLFLOW_RUN_ID", "").strip() if args.get("parent_run_id") is None else ""
        if not args.get("run_id") and env_id:
            # The launcher named the run: everyone uses it; rank 0 resumes it by id alone,
            # as a run found by name first could be another one.
            return resolve(**{**args, "run_id": env_id, "run_name": None}) if self.rank == 0 else env_id
        # Not keyed by the parent run: only rank 0 has one (the others start no MLflow run).
        path = self._path("run", args.get("experiment_id"), args.get("run_name"), args.get("run_id"),
                          occurrence=True)
        meet = self._server(args)
        if meet is not None:
            return self._meet_run(meet, resolve, args, path)
        if self.rank == 0:
            rid = resolve(**args)
            if rid:
                _publish(path, {"run_id": rid, "experiment_id": args.get("experiment_id"), "rank": self.rank,
                                "pid": os.getpid()})
            return rid
        return str(self._wait(path, f"the run {args.get('run_name') or args.get('run_id') or '(unnamed)'!r}")["run_id"])

    def make_run(self, run_id: str, backend: Backend, client: Any, params: Mapping[str, str] | None,
                 tracker: Any) -> Run:
        """The handle for this rank: a plain :class:`Run` unless this rank discards or suffixes."""
        if self.inactive:
            return InactiveRun(run_id, backend, None, params, tracker=tracker, plan=self)
        if self.shared:
            return RankedRun(run_id, backend, client, params, tracker=tracker, plan=self)
        return Run(run_id, backend, client, params, tracker=tracker)

    # -- meeting through the tracking server ---------------------------------------------------
    @staticmethod
    def _server(args: Mapping[str, Any]) -> ServerRendezvous | None:
        """The server rendezvous, unless ``$MLFLOW_ER_RANK_DIR`` asks for files (or there is no server/identity)."""
        if os.environ.get(ENV_DIR):
            return None
        return ServerRendezvous.detect(args.get("client"))

    def _meet_run(self, meet: ServerRendezvous, resolve: Callable[..., str | None], args: dict[str, Any],
                  path: Path) -> str | None:
        exp_id = str(args.get("experiment_id"))
        occurrence = int(path.stem.rsplit("-", 1)[1])  # the n of "run-<key>-<n>": same on every rank
        key = meet.key(exp_id, args.get("run_name"), args.get("run_id"), occurrence)
        name = args.get("run_name") or args.get("run_id") or "(unnamed)"
        if self.rank == 0:
            earlier = meet.previous(exp_id, key)
            # An earlier attempt of this launch (an elastic restart) made the run: resume it by id.
            rid = resolve(**{**args, "run_id": earlier, "run_name": None}) if earlier else resolve(**args)
            if rid:
                meet.publish(rid, key)
                if not meet.strong:  # rank 0's own node meets through the file (see below)
                    _publish(path, {"run_id": rid, "experiment_id": exp_id, "rank": self.rank, "pid": os.getpid()})
            return rid
        if not meet.strong and meet.same_node:
            # A weak identity is shared with earlier launches on that address; on rank 0's node
            # the per-launch file (keyed by the launcher's pid) tells this launch apart for sure.
            return str(self._wait(path, f"the run {name!r}")["run_id"])
        return poll(lambda: meet.find(exp_id, key), _timeout(),
                    lambda: f"{self.describe()}: rank 0 did not tag the run {name!r} (block {occurrence}) in "
                            f"experiment {exp_id} within {_timeout():.0f}s. {meet.hint()} {ENV_TIMEOUT} sets the wait")

    # -- the rank files ------------------------------------------------------------------------
    def _path(self, kind: str, *parts: Any, occurrence: bool = False) -> Path:
        key = hashlib.sha256(json.dumps([kind, *parts], default=str).encode()).hexdigest()[:24]
        if occurrence:  # the n-th block with the same name gets the n-th file, on every rank
            with _lock:
                _occurrences[key] = n = _occurrences.get(key, 0) + 1
            key = f"{key}-{n}"
        return rank_dir() / f"{kind}-{key}.json"

    def _wait(self, path: Path, what: str) -> dict[str, Any]:
        timeout = _timeout()
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                pass
            except ValueError:
                pass  # written by os.replace, so never torn locally; a network filesystem may lag
            if time.monotonic() >= deadline:
                raise RankTimeout(
                    f"{self.describe()}: rank 0 did not share {what} within {timeout:.0f}s (waited for {path}). "
                    f"Is rank 0 running with ranks='all' and the same experiment and run name? On several "
                    f"nodes set {ENV_DIR} to a folder every node sees (one per job), or export MLFLOW_RUN_ID; "
                    f"{ENV_TIMEOUT} sets the wait")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _timeout() -> float:
    return float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT)


_lock = threading.Lock()
_occurrences: dict[str, int] = {}
_warned: list[bool] = []  # the sweep warning is given once per process


def rank_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where ranks exchange ids: ``$MLFLOW_ER_RANK_DIR``, else a per-launch folder in the temp dir."""
    env = os.environ if env is None else env
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR]).expanduser()
    # The launcher's pid tells two launches apart when the variables do not (torchrun's
    # default rendezvous id is "none"); it is only used here, where one node's ranks, all
    # children of the same launcher, are the only readers.
    launch = [env.get(v, "") for v in LAUNCH_VARS] + [str(os.getppid())]
    digest = hashlib.sha256("\0".join(launch).encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"mlflow-er-ranks-{uid}" / digest


def _publish(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)  # readers see the whole file or none of it


__all__ = ["InactiveBackend", "InactiveClient", "InactiveRun", "RankedRun", "RankPlan", "rank_dir"]
