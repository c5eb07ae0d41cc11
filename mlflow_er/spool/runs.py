"""Which MLflow run each spooled run becomes, for ``mlflow-er sync``.

A run is matched by its original id if the server has it, else by the
``mlflow_er.source_run_id`` tag of a run an earlier (interrupted) sync created, else
created — so a crash between creating a run and recording the mapping
(``sync/<target>/runs/<id>.json``) never yields a second run. A created run carries the
tags the live run would have had: the run's own start record (name, parent, description,
tags), over the run context the writer recorded in the segment header
(:mod:`~mlflow_er.spool.context`: user, source, git commit).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .context import GIT_COMMIT
from .errors import SyncError
from .format import RunInfo
from .upload import write_atomic

log = logging.getLogger(__name__)

SOURCE_RUN_TAG = "mlflow_er.source_run_id"


def call_with_retry(policy: Any, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A tracking-server call (lookups, run creation) under the same retry policy as batches."""
    from mlflow.exceptions import MlflowException

    from ..sinks.mlflow import classify_mlflow_exception

    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            err: Any = classify_mlflow_exception(exc)
            if not err.transient:
                raise
        except (ConnectionError, TimeoutError, OSError) as exc:
            err = exc
        remaining = policy.deadline - (time.monotonic() - start)
        if remaining <= 0:
            raise SyncError(f"tracking server unavailable, sync stopped (progress saved; run it again): "
                            f"{what}: {err}")
        time.sleep(min(policy.backoff(attempt, getattr(err, "retry_after", None)), remaining))
        attempt += 1


class RunMap:
    """Finds or creates the target run of each spooled run; remembers run facts seen in the stream."""

    def __init__(self, client: Any, fs: Any, state: str, policy: Any, redacted_uri: str,
                 read_json: Callable[[str], dict[str, Any] | None], created: list[str]):
        self.client, self.fs, self.state, self.policy = client, fs, state, policy
        self.redacted_uri = redacted_uri
        self._read_json = read_json
        self.runs_created = created
        self._runs: dict[str, str] = {}
        self._created: set[str] = set()
        self._infos: dict[str, dict[str, Any]] = {}
        self._experiments: dict[str | None, str] = {}

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call_with_retry(self.policy, what, fn, *args, **kwargs)

    def experiment(self, header: dict[str, Any]) -> str:
        """The experiment id for a segment's header: by name (created, tagged like the tracker does), else by id."""
        from mlflow.entities import LifecycleStage

        name = header.get("experiment_name")
        if name in self._experiments:
            return self._experiments[name]
        if name:
            exp = self._call("find experiment", self.client.get_experiment_by_name, name)
            if exp is not None and exp.lifecycle_stage == LifecycleStage.DELETED:
                raise SyncError(f"experiment {name!r} is deleted at {self.redacted_uri}; restore it first")
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                commit = (header.get("context") or {}).get(GIT_COMMIT)
                tags = {"git_commit": str(commit)} if commit else None  # as ExperimentTracker tags a new one
                exp_id = self._call("create experiment", self.client.create_experiment, name, tags=tags)
        else:
            exp_id = self._by_id(header.get("experiment_id"))
        self._experiments[name] = exp_id
        return exp_id

    def _by_id(self, experiment_id: Any) -> str:
        """A spool that names no experiment (e.g. spill): its id if the server has it, else the default one."""
        from mlflow.exceptions import MlflowException

        if experiment_id:
            try:
                return self._call("find experiment", self.client.get_experiment, str(experiment_id)).experiment_id
            except MlflowException:
                pass
        return "0"

    def known(self, orig: str) -> str | None:
        """The target run already recorded for ``orig`` (no server call), if any."""
        if orig in self._runs:
            return self._runs[orig]
        mapping = self._read_json(f"{self.state}/runs/{orig}.json")
        return str(mapping["run_id"]) if mapping and "run_id" in mapping else None

    def target(self, orig: str, header: dict[str, Any], first_ts: int) -> str:
        """The MLflow run id that spooled run ``orig`` maps to (found or created, then recorded)."""
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
        exp_id = self.experiment(header)
        found = self._call("search runs", self.client.search_runs, [exp_id],
                           filter_string=f"tags.`{SOURCE_RUN_TAG}` = '{orig}'", max_results=1)
        if found:
            return {"run_id": found[0].info.run_id, "experiment_id": exp_id, "created": True}
        info = self._infos.get(orig, {})
        tags = {str(k): str(v) for k, v in (header.get("context") or {}).items() if v}
        tags.update({str(k): str(v) for k, v in (info.get("tags") or {}).items()})
        tags[SOURCE_RUN_TAG] = orig
        if info.get("description"):
            tags["mlflow.note.content"] = str(info["description"])
        parent = info.get("parent_run_id")
        if parent:
            tags["mlflow.parentRunId"] = self.target(str(parent), header, first_ts)
        run = self._call("create run", self.client.create_run, exp_id,
                         start_time=int(info.get("start_time") or first_ts), tags=tags, run_name=info.get("run_name"))
        self.runs_created.append(run.info.run_id)
        log.info("mlflow-er sync: created run %s for spooled run %s", run.info.run_id, orig)
        return {"run_id": run.info.run_id, "experiment_id": exp_id, "created": True}

    def run_info(self, info: RunInfo, header: dict[str, Any]) -> None:
        """Apply a run fact: remember start facts for creation; end a run this sync created."""
        self._infos.setdefault(info.run_id, {}).update(info.fields)
        status = info.fields.get("status")
        if status:
            target = self.target(info.run_id, header, info.timestamp)
            if info.run_id in self._created:  # a run the tracker ended itself is left as it is
                self._call("end run", self.client.set_terminated, target, status=str(status),
                           end_time=int(info.fields.get("end_time") or info.timestamp))
