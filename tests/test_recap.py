"""The recap at a run's end, the spool announced at its start, resume made visible, the default spool folder."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlflow_er import DeliveryError, ExperimentTracker, paths, recap
from mlflow_er.testing import MemorySink, prefill_sqlite_store

pytestmark = pytest.mark.timeout(60)

RECAP = "mlflow_er.recap"


@pytest.fixture(autouse=True)
def _loud(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(recap.ENV_QUIET, raising=False)
    monkeypatch.setenv("MLFLOW_ER_STAGING_DIR", str(tmp_path / "staging"))


def recap_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == RECAP)


def test_recap_of_a_finished_run_names_it_and_counts_what_was_delivered(
        tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    prefill_sqlite_store(tracking_uri)
    caplog.set_level(logging.INFO, logger=RECAP)
    tracker = ExperimentTracker("recap", tracking_uri=tracking_uri, backend="threaded")
    with tracker.run(run_name="baseline") as run:
        run.log_metrics({"loss": 0.5, "acc": 0.9}, step=1)
        run.log_param("lr", 0.001)
    text = recap_text(caplog)
    assert f"run 'baseline' (id {run.run_id}) ended FINISHED" in text
    assert "3 delivered to mlflow; 0 dropped; 0 failed" in text
    assert "mlflow-er sync" not in text  # nothing unsent: no command to run
    facts = run.recap.as_dict()
    assert facts["run_id"] == run.run_id and facts["delivered"] == {"mlflow": 3}
    assert facts["unsent"] == 0 and facts["sync"] is None and facts["link"] is None  # sqlite has no UI link


def test_recap_shows_run_id_counts_and_the_sync_command_when_something_is_unsent(
        tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    prefill_sqlite_store(tracking_uri)
    caplog.set_level(logging.INFO, logger=RECAP)
    down = MemorySink().fail_when(lambda batch: True, transient=True)  # a server that never comes back
    tracker = ExperimentTracker("recap", tracking_uri=tracking_uri, backend="threaded", sinks=[down],
                                close_timeout=1.5)
    with pytest.raises(DeliveryError) as caught:
        with tracker.run(run_name="outage") as run:
            for step in range(5):
                run.log_metric("loss", 1.0 / (step + 1), step=step)
    kept = caught.value.kept_in
    assert kept and Path(kept).is_dir()
    text = recap_text(caplog)
    assert f"(id {run.run_id})" in text
    assert "0 dropped" in text
    assert f"record(s) not sent are kept in {kept}" in text
    assert f"mlflow-er sync {kept} --tracking-uri {tracking_uri}" in text
    assert run.recap.unsent == caught.value.unsent >= 5
    assert run.recap.sync == f"mlflow-er sync {kept} --tracking-uri {tracking_uri}"


def test_offline_run_says_where_its_spool_is_at_start_and_how_to_sync_at_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RECAP)
    spool = tmp_path / "spool"
    tracker = ExperimentTracker("recap", backend="threaded", sinks=["spool"], sink_options={"spool": {"path": spool}})
    with tracker.run(run_name="offline") as run:
        start = recap_text(caplog)
        run.log_metric("loss", 0.1)
    assert f"spools to {spool.resolve()}" in start and "offline" in start
    end = recap_text(caplog)[len(start):]
    assert f"(id {run.run_id}) ended FINISHED" in end
    assert f"every record is in the spool {spool.resolve()}" in end
    assert f"mlflow-er sync {spool.resolve()} --tracking-uri URI" in end


def test_quiet_by_env_or_argument_silences_the_recap_but_keeps_it_on_the_run(
        tracking_uri: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_sqlite_store(tracking_uri)
    caplog.set_level(logging.INFO, logger=RECAP)
    with ExperimentTracker("recap", tracking_uri=tracking_uri, quiet=True).run(run_name="a") as a:
        a.log_metric("x", 1.0)
    monkeypatch.setenv(recap.ENV_QUIET, "1")
    with ExperimentTracker("recap", tracking_uri=tracking_uri).run(run_name="b") as b:
        b.log_metric("x", 1.0)
    assert recap_text(caplog) == ""
    assert a.recap.run_id == a.run_id and b.recap.delivered == {"mlflow": 1}


def test_resume_by_name_is_announced_with_status_and_counts_and_resume_false_starts_a_new_run(
        tracking_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    prefill_sqlite_store(tracking_uri)
    caplog.set_level(logging.INFO, logger=RECAP)
    tracker = ExperimentTracker("recap", tracking_uri=tracking_uri)
    with tracker.run(run_name="baseline") as first:
        first.log_metrics({"loss": 1.0, "acc": 0.5})
        first.log_param("lr", 0.001)
    assert "resuming" not in recap_text(caplog)
    with tracker.run(run_name="baseline") as again:
        pass
    assert again.run_id == first.run_id  # the seed's rule is unchanged
    text = recap_text(caplog)
    assert f"resuming run 'baseline' (id {first.run_id}; found by run_name 'baseline'; status FINISHED, " \
           "2 metric key(s), 1 param(s) already logged)" in text
    assert "resume=False" in text and again.recap.resumed
    with tracker.run(run_name="baseline", resume=False) as fresh:
        fresh.log_param("lr", 0.01)  # a new run: no conflict with the old one's lr
    assert fresh.run_id != first.run_id
    assert tracker.client.get_run(fresh.run_id).info.run_name == "baseline"
    assert tracker.client.get_run(fresh.run_id).data.params == {"lr": "0.01"}


def test_ui_link_for_servers_only_and_without_the_password() -> None:
    assert recap.ui_link("http://u:secret@127.0.0.1:5000/", "3", "abc") == \
        "http://***@127.0.0.1:5000/#/experiments/3/runs/abc"
    assert recap.ui_link("threaded+http://127.0.0.1:5000", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert recap.ui_link("sqlite:///m.db", "3", "abc") is None
    assert recap.sync_command("/s p", "spool+https://u:pw@h") == "mlflow-er sync '/s p' --tracking-uri https://***@h"


def test_default_spool_dir_is_per_user_state_not_the_working_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(paths.ENV_SPOOL_DIR, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert paths.default_spool_dir() == tmp_path / "state" / "mlflow-er" / "spool"
    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # ignored, as the XDG spec says
    assert paths.default_spool_dir() == Path.home() / ".local" / "state" / "mlflow-er" / "spool"
    monkeypatch.setenv(paths.ENV_SPOOL_DIR, str(tmp_path / "mine"))
    assert paths.default_spool_dir() == tmp_path / "mine"


SCRIPT = textwrap.dedent("""
    import io, sys, tempfile

    class Stderr(io.StringIO):
        tty = False

        def isatty(self):
            return self.tty

    sys.stderr = err = Stderr()
    from mlflow_er import ExperimentTracker
    d = tempfile.mkdtemp()
    tracker = ExperimentTracker("tty", sinks=["spool"], sink_options={"spool": {"path": d}})
    for name in ("piped", "terminal"):
        err.tty = name == "terminal"
        with tracker.run(run_name=name) as run:
            run.log_metric("x", 1.0)
        sys.__stdout__.write(f"RUN {run.run_id}\\n")
    sys.__stdout__.write(err.getvalue())
""")


def test_recap_is_shown_on_a_terminal_without_logging_config_and_not_when_piped(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != recap.ENV_QUIET}
    env.update(MLFLOW_ER_STAGING_DIR=str(tmp_path / "staging"), PYTHONPATH=str(Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    piped, terminal = (line.split()[1] for line in out.stdout.splitlines() if line.startswith("RUN "))
    assert f"run 'terminal' (id {terminal}) ended FINISHED" in out.stdout
    assert piped not in out.stdout.replace(f"RUN {piped}", "")  # nothing said about the piped run


def test_scheme_recap_names_the_link_and_the_sync_command_for_what_is_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RECAP)
    problem = DeliveryError(unsent=7)
    problem.kept_in = "/spool/dir"
    stats = {"lanes": {"spool": {"delivered": 10, "durable": True}, "mlflow": {"delivered": 3}}, "dropped_total": 0}
    facts = recap.scheme_run_ended("spool+http://127.0.0.1:5000", "rid", "FINISHED", stats, problem, "4")
    text = recap_text(caplog)
    assert "(id rid) ended FINISHED" in text and "delivered 10 to spool, 3 to mlflow" in text
    assert "view it at http://127.0.0.1:5000/#/experiments/4/runs/rid" in text
    assert "mlflow-er sync /spool/dir --tracking-uri http://127.0.0.1:5000" in text and facts.unsent == 7
