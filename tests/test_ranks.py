"""``ranks=``: several processes of one job (``RANK=0..3``, ``WORLD_SIZE=4``) and what each one logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import CountingListener

from mlflow_er import ExperimentTracker, MlflowErError
from mlflow_er.errors import RankTimeout
from mlflow_er.ranks import RankPlan
from mlflow_er.tracker import normalize_tracking_uri

WORKER = Path(__file__).resolve().parent / "scripts" / "rank_worker.py"
STEPS = 150
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MLFLOW_RUN_ID")


@pytest.fixture
def no_rank_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The test process itself is no rank of anything, whatever launched pytest."""
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def start_ranks(tmp_path: Path, uri: str, ranks: str, which: Sequence[int], *extra: str,
                per_rank: dict[int, Sequence[str]] | None = None,
                uri_for: dict[int, str] | None = None) -> list[subprocess.Popen[str]]:
    """Start one worker per rank in ``which``; they share ``MLFLOW_ER_RANK_DIR`` under ``tmp_path``."""
    procs = []
    for r in which:
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
        env.update(RANK=str(r), WORLD_SIZE="4", LOCAL_RANK=str(r), MLFLOW_ER_RANK_DIR=str(tmp_path / "rankdir"),
                   MLFLOW_ER_RANK_TIMEOUT="60", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                   MLFLOW_ER_STAGING_DIR=str(tmp_path / f"staging{r}"))
        argv = [sys.executable, str(WORKER), (uri_for or {}).get(r, uri), ranks, str(STEPS), *extra,
                *(per_rank or {}).get(r, ())]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=tmp_path, stdin=subprocess.DEVNULL))
    return procs


def results(procs: list[subprocess.Popen[str]]) -> list[dict]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"rank failed:\n{stderr[-3000:]}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def metric_counts(client: MlflowClient, run_id: str) -> dict[str, int]:
    keys = client.get_run(run_id).data.metrics
    return {k: len(client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.timeout(60)
def test_zero_only_rank0_writes_and_other_ranks_make_no_server_traffic(tmp_path: Path, no_rank_env) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    listener = CountingListener()
    try:
        # Ranks 1-3 run to completion before rank 0 starts: 1 and 2 must not even create the
        # store; 3 points at a listener that counts every connection.
        procs = start_ranks(tmp_path, uri, "zero", [1, 2, 3], per_rank={3: ["--job-marker", str(tmp_path / "job-ran")]},
                            uri_for={3: listener.uri})
        members = results(procs)
        assert listener.connections == 0, "an inactive rank contacted the tracking server"
    finally:
        listener.close()
    assert not db.exists(), "an inactive rank created the sqlite store"
    assert not (tmp_path / "job-ran").exists(), "background_worker ran a job on an inactive rank"
    for m in members:
        s = m["stats"]
        assert (s["rank"], s["world_size"], s["role"]) == (m["rank"], 4, "inactive")
        # every call was accepted, validated and counted: 2 params, 1 tag, 1 artifact, STEPS + 2 metrics
        assert s["discarded"] == STEPS + 6 and s["delivered"] == 0 and s["queued"] == 0
        assert m["run_id"] == "" and not m["torch"]

    [leader] = results(start_ranks(tmp_path, uri, "zero", [0]))
    assert leader["stats"].get("role") is None  # rank 0 is an ordinary run
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ranks-exp")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_id == leader["run_id"] and run.info.status == "FINISHED"
    assert metric_counts(client, run.info.run_id) == {"loss": STEPS, "acc": 1, "tput": 1}
    assert run.data.params == {"lr": "0.01", "seed": "0"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/rank0.txt"]

    # The control: the listener does count a client that does contact it.
    listener = CountingListener()
    try:
        with pytest.raises(MlflowErError):
            normalize_tracking_uri(listener.uri)
        assert listener.connections >= 1
    finally:
        listener.close()


@pytest.mark.timeout(75)
def test_all_ranks_log_into_one_run_with_rank_keys(tmp_path: Path, no_rank_env) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once: 4 first connections would race to migrate
    done = tmp_path / "rank0-done"
    procs = start_ranks(tmp_path, uri, "all", [0, 1, 2, 3], per_rank={
        0: ["--done", str(done)],
        3: ["--fail-after", str(done)],  # fails after rank 0 ended the run: must not change its status
    })
    out = {r["rank"]: r for r in results(procs)}
    assert {r["run_id"] for r in out.values()} == {out[0]["run_id"]}
    assert "fails after rank 0" in out[3]["error"] and not any(r["torch"] for r in out.values())

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ranks-exp")
    [run] = client.search_runs([exp.experiment_id])
    rid = run.info.run_id
    assert rid == out[0]["run_id"]
    expected = {}
    for r in range(4):
        expected.update({f"loss/rank{r}": STEPS, f"acc/rank{r}": 1, f"tput/rank{r}": 1})
    assert metric_counts(client, rid) == expected
    assert [m.value for m in client.get_metric_history(rid, "tput/rank2")] == [102.0]
    # params, tags and artifacts from rank 0 only; rank 0 alone ended the run
    assert run.data.params == {"lr": "0.01", "seed": "0"}
    assert run.data.tags["written_by"] == "rank0"
    assert [a.path for a in client.list_artifacts(rid, "notes")] == ["notes/rank0.txt"]
    assert run.info.status == "FINISHED"
    for r, res in out.items():
        s = res["stats"]
        assert (s["rank"], s["role"]) == (r, "leader" if r == 0 else "member")
        assert s["discarded"] == (0 if r == 0 else 4)  # 2 params, 1 tag, 1 artifact


@pytest.mark.timeout(30)
def test_member_uses_mlflow_run_id_and_never_ends_the_run(tracking_uri: str, no_rank_env, tmp_path: Path) -> None:
    leader = ExperimentTracker("shared", tracking_uri=tracking_uri)
    with leader.run(run_name="launcher-made") as run:
        rid = run.run_id
    client = MlflowClient(tracking_uri)
    client.update_run(rid, status="RUNNING")
    no_rank_env.setenv("RANK", "1")
    no_rank_env.setenv("WORLD_SIZE", "2")
    no_rank_env.setenv("MLFLOW_RUN_ID", rid)
    no_rank_env.setenv("MLFLOW_ER_RANK_DIR", str(tmp_path / "empty"))  # nothing there: the env var must do
    no_rank_env.setenv("TORCHELASTIC_RUN_ID", "untagged-job")  # and no server rendezvous either: nothing is tagged
    member = ExperimentTracker("shared", tracking_uri=tracking_uri, ranks="all", backend="threaded")
    with member.run(run_name="ignored") as run:
        assert run.run_id == rid
        run.log_metric("loss", 0.5, step=1)
        run.log_param("lr", 0.1)
        with pytest.raises(MlflowErError, match="metric key"):
            run.log_metric("bad key!", 1.0)
    stored = client.get_run(rid)
    assert stored.data.metrics == {"loss/rank1": 0.5}
    assert stored.data.params == {}
    assert stored.info.status == "RUNNING"  # a member flushes; it does not end the run


@pytest.mark.timeout(30)
def test_member_times_out_clearly_without_rank0(tracking_uri: str, no_rank_env, tmp_path: Path) -> None:
    no_rank_env.setenv("RANK", "2")
    no_rank_env.setenv("WORLD_SIZE", "4")
    no_rank_env.setenv("MLFLOW_ER_RANK_DIR", str(tmp_path / "rankdir"))
    no_rank_env.setenv("SLURM_JOB_ID", "99")  # a launch identity too: the rank dir still wins
    no_rank_env.setenv("MLFLOW_ER_RANK_TIMEOUT", "0.5")
    with pytest.raises(RankTimeout, match="rank 0 did not share the experiment 'nobody-made-it'.*MLFLOW_ER_RANK_DIR"):
        ExperimentTracker("nobody-made-it", tracking_uri=tracking_uri, ranks="all")
    assert MlflowClient(tracking_uri).get_experiment_by_name("nobody-made-it") is None  # a member never creates


@pytest.mark.parametrize(("env", "expected"), [
    ({}, ("single", 0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4"}, ("inactive", 3, 4)),
    ({"RANK": "0", "WORLD_SIZE": "4"}, ("leader", 0, 4)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, ("single", 0, 1)),
    ({"LOCAL_RANK": "1"}, ("inactive", 1, None)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, ("inactive", 5, 8)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}, ("inactive", 2, 3)),
    ({"RANK": "0", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, ("leader", 0, 8)),  # srun torchrun
])
def test_rank_detection(env: dict[str, str], expected: tuple) -> None:
    plan = RankPlan.detect("zero", env)
    assert (plan.role, plan.rank, plan.world_size) == expected
    assert RankPlan.detect("all", env).role == {"inactive": "member"}.get(expected[0], expected[0])
    each = RankPlan.detect("each", env)
    assert (each.role, each.rank) == ("single", expected[1]) and not each.inactive


def test_rank_detection_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="ranks must be one of"):
        RankPlan.detect("some")
    with pytest.raises(MlflowErError, match="RANK='x'"):
        RankPlan.detect("zero", {"RANK": "x"})
    with pytest.raises(MlflowErError, match="not below"):
        RankPlan.detect("zero", {"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.timeout(30)
def test_each_ignores_ranks_and_zero_warns_for_sweep_launchers(tracking_uri: str, no_rank_env,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import mlflow_er.ranks as ranks_mod

    no_rank_env.setattr(ranks_mod, "_warned", [])
    no_rank_env.setenv("SLURM_PROCID", "1")
    no_rank_env.setenv("SLURM_NTASKS", "2")
    with caplog.at_level("WARNING", logger="mlflow_er.ranks"):
        assert ExperimentTracker("sweep", tracking_uri=tracking_uri).rank.inactive
    assert "pass ranks='each'" in caplog.text
    tracker = ExperimentTracker("sweep", tracking_uri=tracking_uri, ranks="each")
    with tracker.run(run_name="task1") as run:
        run.log_metric("loss", 1.0)
    assert tracker.rank.rank == 1 and MlflowClient(tracking_uri).get_run(run.run_id).data.metrics == {"loss": 1.0}


# -- ranks="all" meeting through the tracking server: no shared folder ---------------------------
MEET = Path(__file__).resolve().parent / "scripts" / "meet_worker.py"
LAUNCH_VARS = ("MLFLOW_ER_RANK_DIR", "MLFLOW_ER_LAUNCH_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
               "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID", "OMPI_MCA_ess_base_jobid",
               "PMIX_NAMESPACE")


def start_launch(tmp_path: Path, uri: str, world: int, launch: dict[str, str], steps: int,
                 *extra: str, attempt: str = "a0") -> list[subprocess.Popen[str]]:
    """One process per rank, each with its own temp dir, cwd and TMPDIR: the ranks share no folder."""
    procs = []
    for r in range(world):
        home = tmp_path / f"{attempt}-host{r}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARS + LAUNCH_VARS}
        env.update(launch, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK="0", TMPDIR=str(home),
                   MLFLOW_ER_RANK_TIMEOUT="60", MLFLOW_ER_STAGING_DIR=str(home / "staging"),
                   MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        procs.append(subprocess.Popen([sys.executable, str(MEET), uri, str(steps), *extra], cwd=home, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      stdin=subprocess.DEVNULL))
    return procs


@pytest.mark.timeout(210)  # + the session server's start, charged to the first user
def test_all_ranks_meet_through_the_server_with_no_shared_folder(prod, tmp_path: Path, no_rank_env) -> None:
    launch = {"TORCHELASTIC_RUN_ID": f"job-{tmp_path.name}", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    out = {r["rank"]: r for r in results(start_launch(tmp_path, prod.uri, 3, launch, 120))}
    [rid] = {r["run_id"] for r in out.values()}
    assert prod.metric_rows(rid) == {f"loss/rank{r}": (120, 120) for r in range(3)}
    run = MlflowClient(prod.uri).get_run(rid)
    assert run.info.status == "FINISHED" and run.data.params == {"world": "3"}
    assert run.data.tags["mlflow_er.launch"] == f"torchelastic=job-{tmp_path.name}"
    assert [out[r]["stats"]["role"] for r in range(3)] == ["leader", "member", "member"]
    # Nothing was exchanged through files: no rank folder exists in any rank's temp dir.
    assert not list(tmp_path.glob("*/mlflow-er-ranks-*"))


@pytest.mark.timeout(240)  # + the session server's start, charged to the first user
def test_elastic_restart_resumes_the_same_run(prod, tmp_path: Path, no_rank_env) -> None:
    launch = {"TORCHELASTIC_RUN_ID": f"elastic-{tmp_path.name}", "MASTER_ADDR": "node0"}
    first = results(start_launch(tmp_path, prod.uri, 2, {**launch, "MASTER_PORT": "29500",
                                                          "TORCHELASTIC_RESTART_COUNT": "0"}, 60))
    # The agent restarts every worker (a new rendezvous round: a new port), same job id.
    again = results(start_launch(tmp_path, prod.uri, 2, {**launch, "MASTER_PORT": "29611",
                                                          "TORCHELASTIC_RESTART_COUNT": "1"}, 60, attempt="a1"))
    [rid] = {r["run_id"] for r in first + again}
    # Each attempt logged steps 0..59 once per rank: twice the rows, the same 60 steps.
    assert prod.metric_rows(rid) == {"loss/rank0": (120, 60), "loss/rank1": (120, 60)}
    run = MlflowClient(prod.uri).get_run(rid)
    assert run.data.tags["mlflow_er.restart"] == "1" and run.info.status == "FINISHED"
    # Rank 0 of a different job (another id) starts a run of its own (here, in this process).
    for name in LAUNCH_VARS:
        no_rank_env.delenv(name, raising=False)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": f"next-{tmp_path.name}",
                 "TORCHELASTIC_RESTART_COUNT": "1"}.items():
        no_rank_env.setenv(k, v)
    with ExperimentTracker("meet-exp", tracking_uri=prod.uri, ranks="all").run() as other:
        assert other.run_id != rid


@pytest.mark.timeout(30)
def test_member_times_out_through_the_server_saying_what_to_check(tracking_uri: str, no_rank_env) -> None:
    for name in LAUNCH_VARS:
        no_rank_env.delenv(name, raising=False)
    no_rank_env.setenv("RANK", "1")
    no_rank_env.setenv("WORLD_SIZE", "2")
    no_rank_env.setenv("SLURM_JOB_ID", "4242")
    no_rank_env.setenv("SLURM_STEP_ID", "0")
    no_rank_env.setenv("MLFLOW_ER_RANK_TIMEOUT", "0.5")
    with pytest.raises(RankTimeout, match=r"rank 0 did not create the experiment 'not-yet'.*slurm=4242\.0"):
        ExperimentTracker("not-yet", tracking_uri=tracking_uri, ranks="all")
    MlflowClient(tracking_uri).create_experiment("exists")
    member = ExperimentTracker("exists", tracking_uri=tracking_uri, ranks="all")
    with pytest.raises(RankTimeout, match=r"did not tag the run 'r1'.*mlflow_er\.launch='slurm=4242\.0'.*"
                                          r"MLFLOW_RUN_ID"):
        with member.run(run_name="r1"):
            pass
    assert MlflowClient(tracking_uri).search_runs([member.id]) == []  # a member never creates a run


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"MASTER_ADDR": "n0", "MASTER_PORT": "29500"}, ("master=n0:29500", False)),
    ({"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}, ("master=n0:1", False)),
    ({"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}, ("torchelastic=abc", True)),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3", "TORCHELASTIC_RESTART_COUNT": "2"}, ("slurm=77.3", True)),
    ({"OMPI_MCA_ess_base_jobid": "99"}, ("ompi=99", True)),
    ({"MLFLOW_ER_LAUNCH_ID": "mine", "PMIX_NAMESPACE": "ns"}, ("id=mine pmix=ns", True)),
])
def test_launch_identity(env: dict[str, str], expected: tuple | None) -> None:
    from mlflow_er.rendezvous import launch_identity

    assert launch_identity(env) == expected


def test_weak_identity_never_resumes_and_ignores_runs_older_than_the_member(tracking_uri: str) -> None:
    from mlflow_er.rendezvous import ServerRendezvous

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("weak")
    env = {"MASTER_ADDR": "n0", "MASTER_PORT": "29500", "MLFLOW_ER_RANK_SKEW": "0"}
    meet = ServerRendezvous.detect(client, env)
    assert meet is not None and not meet.strong
    key = meet.key(exp, "r", None, 1)
    stale = client.create_run(exp, start_time=1000).info.run_id  # an earlier launch on the same address
    meet.publish(stale, key)
    assert meet.previous(exp, key) is None  # rank 0 starts a new run
    assert meet.find(exp, key) is None  # members wait for it
    fresh = client.create_run(exp).info.run_id
    meet.publish(fresh, key)
    assert meet.find(exp, key) == fresh
    strong = ServerRendezvous.detect(client, {"SLURM_JOB_ID": "5"})
    assert strong is not None and strong.find(exp, strong.key(exp, "r", None, 1)) is None  # another launch


@pytest.mark.timeout(30)
def test_weak_identity_members_on_rank0s_node_use_the_launch_file(tracking_uri: str, no_rank_env,
                                                                  tmp_path: Path) -> None:
    import tempfile
    import uuid

    from mlflow_er.rendezvous import ServerRendezvous

    for name in LAUNCH_VARS:
        no_rank_env.delenv(name, raising=False)
    no_rank_env.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own per-launch folders
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2",
                 "GROUP_RANK": "0", "MLFLOW_ER_RANK_TIMEOUT": "0.5"}.items():
        no_rank_env.setenv(k, v)
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("weak-node")

    def earlier_launch_tagged(name: str) -> str:
        """A run an earlier launch on the same MASTER_ADDR:PORT tagged moments ago."""
        meet = ServerRendezvous.detect(client)
        assert meet is not None and not meet.strong
        rid = client.create_run(exp).info.run_id
        meet.publish(rid, meet.key(exp, name, None, 1))
        return rid

    same = f"same-node-{uuid.uuid4().hex[:6]}"
    earlier_launch_tagged(same)
    member = ExperimentTracker("weak-node", tracking_uri=tracking_uri, ranks="all")
    # On rank 0's node the member waits for this launch's file and never joins the earlier run.
    with pytest.raises(RankTimeout, match="rank 0 did not share the run"):
        with member.run(run_name=same):
            pass
    # On another node only the server can tell: the recent tagged run is taken (documented limit).
    no_rank_env.setenv("GROUP_RANK", "1")
    other = f"other-node-{uuid.uuid4().hex[:6]}"
    stale = earlier_launch_tagged(other)
    with ExperimentTracker("weak-node", tracking_uri=tracking_uri, ranks="all").run(run_name=other) as run:
        assert run.run_id == stale
