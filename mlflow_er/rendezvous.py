"""Ranks of one launch meet through the tracking server: no shared folder needed.

With ``ranks="all"`` on several hosts, rank 0 tags the run it resolves with the *launch
identity* — what the launcher sets identically on every rank of one job — and the other
ranks find the run by that tag, polling the server with a bounded backoff. The identity:

=================================  ===========================================================
variable                           meaning
=================================  ===========================================================
``MLFLOW_ER_LAUNCH_ID``            set it yourself for any other launcher (one value per job)
``TORCHELASTIC_RUN_ID``            torchrun's ``--rdzv-id`` (ignored when ``none``)
``SLURM_JOB_ID`` + ``SLURM_STEP_ID``  Slurm
``OMPI_MCA_ess_base_jobid``        Open MPI
``PMIX_NAMESPACE``                 PMIx launchers (MPICH/Intel MPI under Slurm, prrte)
``MASTER_ADDR`` + ``MASTER_PORT``  torchrun's static rendezvous: *weak*, see below
=================================  ===========================================================

The first five are unique per job ("strong"). ``MASTER_ADDR:MASTER_PORT`` alone is reused
by every launch on the same address, so with only it a member takes the newest tagged run
that started at most ``$MLFLOW_ER_RANK_SKEW`` s (default 120) before the member itself,
and rank 0 never resumes a run by this tag on a first attempt; members on rank 0's node
(``GROUP_RANK=0``, or a single-node job) meet through the per-launch file instead, which
the launcher's pid keeps apart from earlier launches. ``TORCHELASTIC_RESTART_COUNT``
is not part of the identity: after an elastic restart rank 0 finds the run it tagged
before and resumes it, and re-tags it with the new restart count; members wait for that
count, so they never join before rank 0 of the same attempt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import RankTimeout

TAG_KEY = "mlflow_er.rendezvous"
TAG_LAUNCH = "mlflow_er.launch"
TAG_RESTART = "mlflow_er.restart"
ENV_LAUNCH = "MLFLOW_ER_LAUNCH_ID"
ENV_SKEW = "MLFLOW_ER_RANK_SKEW"
DEFAULT_SKEW = 120.0
#: When this module was imported: about when the process started (the tracker imports it).
STARTED = time.time()

T = TypeVar("T")


def launch_identity(env: Mapping[str, str] | None = None) -> tuple[str, bool] | None:
    """``(identity, strong)`` of this launch, or ``None`` when the launcher set nothing usable."""
    env = os.environ if env is None else env
    parts = []
    if env.get(ENV_LAUNCH, "").strip():
        parts.append(f"id={env[ENV_LAUNCH].strip()}")
    elastic = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if elastic and elastic.lower() != "none":
        parts.append(f"torchelastic={elastic}")
    if env.get("SLURM_JOB_ID", "").strip():
        parts.append(f"slurm={env['SLURM_JOB_ID'].strip()}.{env.get('SLURM_STEP_ID', '').strip()}")
    for var, name in (("OMPI_MCA_ess_base_jobid", "ompi"), ("PMIX_NAMESPACE", "pmix")):
        if env.get(var, "").strip():
            parts.append(f"{name}={env[var].strip()}")
    if parts:
        return " ".join(parts), True
    addr, port = env.get("MASTER_ADDR", "").strip(), env.get("MASTER_PORT", "").strip()
    if addr and port:
        return f"master={addr}:{port}", False
    return None


def restart_count(env: Mapping[str, str] | None = None) -> str:
    """``TORCHELASTIC_RESTART_COUNT`` (``"0"`` when unset): which attempt of the job this is."""
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_RESTART_COUNT", "").strip() or "0"


def poll(fetch: Callable[[], T | None], timeout: float, on_timeout: Callable[[], str]) -> T:
    """Call ``fetch()`` until it returns something, backing off 0.05 s → 2 s; ``RankTimeout`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        got = fetch()
        if got is not None:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise RankTimeout(on_timeout())
        time.sleep(min(delay, left))
        delay = min(delay * 2, 2.0)


class ServerRendezvous:
    """Find or publish the run of one ``tracker.run()`` block through run tags on the server."""

    def __init__(self, client: Any, identity: str, strong: bool, restart: str, env: Mapping[str, str] | None = None):
        self.client = client
        self.identity = identity
        self.strong = strong
        self.restart = restart
        env = os.environ if env is None else env
        self.skew = float(env.get(ENV_SKEW) or DEFAULT_SKEW)
        #: On rank 0's node: torchrun's node rank is 0, or the whole job runs on one node.
        self.same_node = env.get("GROUP_RANK", "").strip() == "0" or (
            bool(env.get("LOCAL_WORLD_SIZE", "").strip()) and env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"))

    @classmethod
    def detect(cls, client: Any, env: Mapping[str, str] | None = None) -> ServerRendezvous | None:
        """A rendezvous for this launch, or ``None`` without a client or a launch identity."""
        found = launch_identity(env)
        if client is None or found is None:
            return None
        return cls(client, found[0], found[1], restart_count(env), env)

    def key(self, experiment_id: str, run_name: str | None, run_id: str | None, occurrence: int) -> str:
        """The tag value naming one block of this launch (the n-th block with this experiment and name)."""
        raw = json.dumps([self.identity, experiment_id, run_name, run_id, occurrence])
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def _search(self, experiment_id: str, key: str, restart: str | None) -> list[Any]:
        flt = f"tags.`{TAG_KEY}` = '{key}'"
        if restart is not None:
            flt += f" and tags.`{TAG_RESTART}` = '{restart}'"
        return list(self.client.search_runs([experiment_id], filter_string=flt, max_results=10,
                                            order_by=["attributes.start_time DESC"]))

    def previous(self, experiment_id: str, key: str) -> str | None:
        """Rank 0: the run an earlier attempt of this launch tagged (strong identity or a restart), if any."""
        if not self.strong and self.restart == "0":
            return None  # a weak identity is shared by every launch on that address: never resume by it
        runs = self._search(experiment_id, key, None)
        return runs[0].info.run_id if runs else None

    def publish(self, run_id: str, key: str) -> None:
        """Rank 0: tag the run so the other ranks of this attempt find it."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(TAG_KEY, key), RunTag(TAG_LAUNCH, self.identity),
                                            RunTag(TAG_RESTART, self.restart)])

    def find(self, experiment_id: str, key: str) -> str | None:
        """Another rank: the run rank 0 of this attempt tagged, or ``None`` (not yet)."""
        runs = self._search(experiment_id, key, self.restart)
        if not self.strong and self.restart == "0":
            oldest_ok = (STARTED - self.skew) * 1000
            runs = [r for r in runs if (r.info.start_time or 0) >= oldest_ok]
        return runs[0].info.run_id if runs else None

    def hint(self) -> str:
        """What to check when the wait timed out."""
        weak = ("" if self.strong else f" The launch is only identified by {self.identity} (reused by every "
                f"launch there): set {ENV_LAUNCH} to one value per job on every rank, or pass torchrun --rdzv-id.")
        return (f"Rank 0 tags its run {TAG_LAUNCH}={self.identity!r}, {TAG_RESTART}={self.restart!r}: check that "
                f"rank 0 runs with ranks='all', the same experiment and run name, and the same tracking server "
                f"({getattr(self.client, 'tracking_uri', '?')}), and that every rank sees the same launcher "
                f"variables; or export MLFLOW_RUN_ID on every rank.{weak}")
