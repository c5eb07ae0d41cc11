"""Built-in experiment and run resolution (``trylast``: any third-party resolver wins).

Offline (the tracker passes ``client=None`` because none of its sinks needs a server) the
built-ins resolve without contacting anything: a local experiment record and the given or a
new MLflow-style run id; ``mlflow-er sync`` later finds or creates both by name and id. This
lives here, not in a sink plugin, so any offline-only sink works on its own.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Experiment, LifecycleStage
from mlflow.exceptions import MlflowException

from .errors import ExperimentNotFound, MlflowErError
from .hookspecs import hookimpl
from .redact import redact

log = logging.getLogger(__name__)


def find_run_id(client: MlflowClient, experiment_id: str, run_name: str | None = None,
                run_id: str | None = None) -> tuple[str | None, str | None]:
    """``(run_name, run_id)`` of a run of the experiment found by name (newest first), then by id."""
    if run_name:
        escaped = run_name.replace("'", "\\'")
        runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{escaped}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_name, runs[0].info.run_id
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return None, None
        if run.info.experiment_id == experiment_id and run.info.lifecycle_stage == LifecycleStage.ACTIVE:
            return run.info.run_name, run.info.run_id
    return None, None


def offline_experiment(experiment_name: str | None, experiment_id: str | None = None,
                       tags: dict[str, str] | None = None) -> Any:
    """An ``mlflow.entities.Experiment`` made up locally; ``mlflow-er sync`` finds or creates it by name."""
    from mlflow.entities import ExperimentTag

    now = time.time_ns() // 1_000_000
    return Experiment(experiment_id=str(experiment_id) if experiment_id is not None else "",
                      name=experiment_name or "Default", artifact_location="",
                      lifecycle_stage=LifecycleStage.ACTIVE,
                      tags=[ExperimentTag(k, str(v)) for k, v in (tags or {}).items()],
                      creation_time=now, last_update_time=now)


@hookimpl(trylast=True)
def mlflow_er_resolve_experiment(client: MlflowClient | None, experiment_name: str | None,
                                 experiment_id: str | None, artifact_location: str | None, create_new: bool,
                                 tags: dict[str, str]) -> Experiment:
    if client is None:
        return offline_experiment(experiment_name, experiment_id, tags)
    exp: Experiment | None = None
    where = redact(client.tracking_uri)
    if experiment_name is not None:
        exp = client.get_experiment_by_name(str(experiment_name))
        if exp is not None and exp.lifecycle_stage == LifecycleStage.DELETED:
            raise ExperimentNotFound(
                f"experiment {experiment_name!r} (id {exp.experiment_id}) at {where} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or choose another name")
        if exp is None and not create_new and experiment_id is None:
            raise ExperimentNotFound(f"no experiment named {experiment_name!r} at {where} and create_new=False")
    if exp is None and experiment_id is not None:
        try:
            exp = client.get_experiment(str(experiment_id))
        except MlflowException as exc:
            raise ExperimentNotFound(f"no experiment with id {experiment_id!r} at {where}") from exc
    if exp is None:
        if experiment_name is None:
            raise MlflowErError("an experiment_name is needed to create a new experiment")
        log.info("creating experiment %r at %s", experiment_name, where)
        try:
            new_id = client.create_experiment(str(experiment_name), artifact_location=artifact_location, tags=tags)
        except MlflowException as exc:
            # Parallel jobs of one sweep race to create the experiment: the loser uses the winner's.
            exp = client.get_experiment_by_name(str(experiment_name))
            if exp is None or exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return exp
        exp = client.get_experiment(new_id)
    return exp


@hookimpl(trylast=True)
def mlflow_er_resolve_run(client: MlflowClient | None, experiment_id: str, run_name: str | None,
                          run_id: str | None, description: str | None, parent_run_id: str | None,
                          tags: dict[str, str]) -> str:
    if client is None:
        return run_id or uuid.uuid4().hex
    _, found = find_run_id(client, experiment_id, run_name, run_id)
    if found:
        log.info("resuming run %s (%s)", run_name or "", found)
        return found
    if run_id and not run_name:
        raise MlflowErError(f"no active run with id {run_id!r} in experiment {experiment_id}")
    return create_run(client, experiment_id, run_name, parent_run_id)


def create_run(client: MlflowClient, experiment_id: str, run_name: str | None, parent_run_id: str | None) -> str:
    """Create a run with the tags MLflow's own ``start_run`` would give it (user, source, git, parent)."""
    from mlflow.tracking.context import registry as context_registry

    wanted: dict[str, str] = {}
    if parent_run_id:
        wanted["mlflow.parentRunId"] = parent_run_id
    if run_name:
        wanted["mlflow.runName"] = run_name
    run = client.create_run(experiment_id, tags=context_registry.resolve_tags(wanted), run_name=run_name)
    log.info("started run %s (%s)", run.info.run_name, run.info.run_id)
    return str(run.info.run_id)
