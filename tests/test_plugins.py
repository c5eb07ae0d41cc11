"""The plugin door: entry points of fake distributions, autoload switch, names, env vars, instances.

Third-party plugins are installed the way pip would leave them — a ``*.dist-info`` folder
with ``entry_points.txt`` on ``sys.path`` — never registered by hand, so the test goes
through exactly the code path a real plugin does.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import mlflow_er
from mlflow_er import Backend, DeliveryError, ExperimentTracker, Sink, UnknownPlugin
from mlflow_er.backends.sync import SyncBackend
from mlflow_er.plugins import list_plugins, reset_plugin_manager
from mlflow_er.records import Batch
from mlflow_er.testing import (
    MemorySink,
    capture,
    memory_sink_plugin,
    prefill_sqlite_store,
    register_memory_sink,
    write_fake_distribution,
)

pytestmark = pytest.mark.timeout(60)

FAKE_MODULES = ("fake_recorder_mod", "fake_broken_mod", "fake_resolver_mod")

RECORDER = textwrap.dedent('''
    """A third-party plugin: a sink "recorder" and a backend "counting"."""
    from mlflow_er import Sink, hookimpl
    from mlflow_er.backends.sync import SyncBackend

    RECORDS = []
    ARTIFACTS = []
    SINKS = []


    class RecorderSink(Sink):
        name = "recorder"

        def __init__(self, options):
            self.options = options
            SINKS.append(self)

        def write_batch(self, batch):
            RECORDS.extend(batch.records())

        def write_artifact(self, artifact):
            with open(artifact.local_path, "rb") as f:
                ARTIFACTS.append((artifact.artifact_path, artifact.name, f.read()))


    class CountingBackend(SyncBackend):
        name = "counting"

        def __init__(self):
            super().__init__()
            self.count = 0

        def submit_many(self, records):
            self.count += len(records)
            super().submit_many(records)


    @hookimpl
    def mlflow_er_sink_names():
        return ["recorder"]


    @hookimpl
    def mlflow_er_make_sink(name, context):
        return RecorderSink(dict(context.options)) if name == "recorder" else None


    @hookimpl
    def mlflow_er_backend_names():
        return ["counting"]


    @hookimpl
    def mlflow_er_make_backend(name, options):
        return CountingBackend(**options) if name == "counting" else None
''')

BROKEN = textwrap.dedent('''
    raise ImportError("fake_broken_mod needs a library that is not installed")
''')

RESOLVER = textwrap.dedent('''
    """A third-party resolver: experiments named "team/..." live under a prefix, runs get a tag."""
    from mlflow_er import hookimpl


    @hookimpl
    def mlflow_er_resolve_experiment(client, experiment_name, create_new, tags):
        if not experiment_name or not experiment_name.startswith("team/"):
            return None  # not ours: the built-in resolver decides
        name = "resolved-" + experiment_name[len("team/"):]
        exp = client.get_experiment_by_name(name)
        if exp is None:
            exp = client.get_experiment(client.create_experiment(name, tags={**tags, "resolver": "fake"}))
        return exp


    @hookimpl
    def mlflow_er_resolve_run(client, experiment_id, run_name, tags):
        if not run_name or not run_name.startswith("custom-"):
            return None
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, "resolved_by": "fake"})
        return run.info.run_id
''')


@pytest.fixture(autouse=True)
def clean_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test builds its own plugin manager, sees no selection env vars and leaves nothing behind."""
    for var in ("MLFLOW_ER_BACKEND", "MLFLOW_ER_SINKS", "MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)
    memory_sink_plugin.instances.clear()


@pytest.fixture
def uri(tracking_uri: str) -> str:
    return prefill_sqlite_store(tracking_uri)


def install(monkeypatch: pytest.MonkeyPatch, root: Path, name: str, entry_points: dict[str, dict[str, str]],
            modules: dict[str, str]) -> Path:
    """'pip install' a fake distribution: dist-info + modules in ``root``, ``root`` on sys.path."""
    info = write_fake_distribution(root, name, "1.0", entry_points, modules)
    monkeypatch.syspath_prepend(str(root))  # also invalidates import/metadata caches
    reset_plugin_manager()
    return info


@pytest.fixture
def recorder_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install(monkeypatch, tmp_path / "site", "fake-plugin",
                   {"mlflow_er.sinks": {"recorder": "fake_recorder_mod"},
                    "mlflow_er.backends": {"counting": "fake_recorder_mod"}},
                   {"fake_recorder_mod": RECORDER})


def test_fake_distribution_is_a_real_distribution(recorder_dist: Path) -> None:
    from importlib.metadata import distribution

    dist = distribution("fake-plugin")
    assert dist.version == "1.0"
    assert {(ep.group, ep.name, ep.value) for ep in dist.entry_points} == {
        ("mlflow_er.sinks", "recorder", "fake_recorder_mod"),
        ("mlflow_er.backends", "counting", "fake_recorder_mod")}


def test_third_party_sink_selected_by_name_receives_exactly_what_was_logged(recorder_dist: Path, uri: str,
                                                                            tmp_path: Path) -> None:
    tracker = ExperimentTracker("plugged", tracking_uri=uri, sinks=["recorder"],
                                sink_options={"recorder": {"color": "blue"}})
    mod = sys.modules["fake_recorder_mod"]
    (sink,) = tracker.sinks
    assert type(sink).__name__ == "RecorderSink" and sink.options == {"color": "blue"}
    (tmp_path / "blob.bin").write_bytes(b"blob")
    with tracker.run(run_name="r") as run:
        run.log_metric("loss", 0.5, step=1)
        run.log_metrics({"acc": 0.9, "f1": 0.8}, step=2)
        run.log_param("lr", 0.01)
        run.set_tag("phase", "train")
        run.log_artifact(tmp_path / "blob.bin", artifact_path="files")
    got = [(type(r).__name__, r.run_id, r.key, r.value, getattr(r, "step", None)) for r in mod.RECORDS]
    assert got == [
        ("Metric", run.run_id, "loss", 0.5, 1),
        ("Metric", run.run_id, "acc", 0.9, 2),
        ("Metric", run.run_id, "f1", 0.8, 2),
        ("Param", run.run_id, "lr", "0.01", None),
        ("Tag", run.run_id, "phase", "train", None),
    ]
    assert mod.ARTIFACTS == [("files", "blob.bin", b"blob")]
    # only the recorder was selected: nothing was written to MLflow by the sink path
    assert tracker.client.get_run(run.run_id).data.metrics == {}
    assert ("sink", "recorder", "fake-plugin") in {(p.kind, p.name, p.distribution) for p in list_plugins()}
    assert ("backend", "counting", "fake-plugin") in {(p.kind, p.name, p.distribution) for p in list_plugins()}


def test_third_party_backend_selected_by_name(recorder_dist: Path, uri: str) -> None:
    tracker = ExperimentTracker("plugged-backend", tracking_uri=uri, backend="counting", sinks="mlflow,recorder")
    assert tracker.backend.name == "counting"
    assert [s.name for s in tracker.sinks] == ["mlflow", "recorder"]
    with tracker.run(run_name="r") as run:
        run.log_metrics({"a": 1.0, "b": 2.0})
    assert tracker.backend.count == 4  # 2 metrics, and the run's start and end: they travel as records too
    assert tracker.client.get_run(run.run_id).data.metrics == {"a": 1.0, "b": 2.0}


def test_broken_plugin_only_warns(recorder_dist: Path, uri: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, tmp_path / "site2", "broken-plugin", {"mlflow_er.sinks": {"shiny": "fake_broken_mod"}},
            {"fake_broken_mod": BROKEN})
    with pytest.warns(RuntimeWarning) as caught:
        tracker = ExperimentTracker("survivor", tracking_uri=uri, sinks=["mlflow", "recorder"])
    messages = [str(w.message) for w in caught if "fake_broken_mod" in str(w.message)]
    assert len(messages) == 1
    assert "'shiny'" in messages[0] and "'broken-plugin'" in messages[0] and "ImportError" in messages[0]
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 1.0)
    assert [r.key for r in sys.modules["fake_recorder_mod"].RECORDS] == ["x"]
    assert tracker.client.get_run(run.run_id).data.metrics == {"x": 1.0}
    with pytest.raises(UnknownPlugin) as info:
        ExperimentTracker("survivor", tracking_uri=uri, sinks=["shiny"])
    assert "shiny" not in info.value.available and "recorder" in info.value.available


def test_autoload_disabled_loads_builtins_only(recorder_dist: Path, uri: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = {(p.kind, p.name) for p in list_plugins()}
    assert {("backend", "sync"), ("sink", "mlflow")} <= names
    assert ("sink", "recorder") not in names and ("backend", "counting") not in names
    assert "fake_recorder_mod" not in sys.modules  # not even imported
    with pytest.raises(UnknownPlugin, match="recorder"):
        ExperimentTracker("builtins-only", tracking_uri=uri, sinks=["recorder"])
    tracker = ExperimentTracker("builtins-only", tracking_uri=uri)
    assert tracker.backend.name == "sync" and [s.name for s in tracker.sinks] == ["mlflow"]
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 1.0)
    assert tracker.client.get_run(run.run_id).data.metrics == {"x": 1.0}
    # switched back on (and reloaded), the plugin is there again
    monkeypatch.delenv("MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD")
    reset_plugin_manager()
    assert ("sink", "recorder") in {(p.kind, p.name) for p in list_plugins()}


def test_unknown_names_list_the_available_ones(uri: str) -> None:
    with pytest.raises(UnknownPlugin) as info:
        ExperimentTracker("unknown", tracking_uri=uri, backend="warp-drive")
    assert isinstance(info.value, LookupError)
    assert info.value.kind == "backend" and info.value.name == "warp-drive"
    assert "sync" in info.value.available
    assert "unknown backend 'warp-drive'" in str(info.value) and "available backends: " in str(info.value)
    assert "sync" in str(info.value).split("available backends: ")[1]
    with pytest.raises(UnknownPlugin) as info:
        ExperimentTracker("unknown", tracking_uri=uri, sinks=["mlflow", "carrier-pigeon"])
    assert info.value.kind == "sink" and "mlflow" in info.value.available
    assert "available sinks: " in str(info.value) and "mlflow" in str(info.value).split("available sinks: ")[1]


def test_env_vars_choose_backend_and_sinks(recorder_dist: Path, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ER_BACKEND", "counting")
    monkeypatch.setenv("MLFLOW_ER_SINKS", " recorder , mlflow ")
    tracker = ExperimentTracker("env", tracking_uri=uri)
    assert tracker.backend.name == "counting"
    assert [s.name for s in tracker.sinks] == ["recorder", "mlflow"]
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 1.0)
    assert [r.key for r in sys.modules["fake_recorder_mod"].RECORDS] == ["x"]
    assert tracker.client.get_run(run.run_id).data.metrics == {"x": 1.0}
    # explicit arguments win over the environment
    explicit = ExperimentTracker("env", tracking_uri=uri, backend="sync", sinks=["mlflow"])
    assert explicit.backend.name == "sync" and [s.name for s in explicit.sinks] == ["mlflow"]
    monkeypatch.setenv("MLFLOW_ER_BACKEND", "nope")
    with pytest.raises(UnknownPlugin, match="'nope'"):
        ExperimentTracker("env", tracking_uri=uri)


def test_list_plugins_has_the_builtins_with_their_distribution() -> None:
    found = {(p.kind, p.name): p for p in list_plugins()}
    assert found[("backend", "sync")].distribution == "mlflow-er"
    assert found[("sink", "mlflow")].distribution == "mlflow-er"
    assert "sync" in mlflow_er.plugins.available_names("backend")
    assert "mlflow" in mlflow_er.plugins.available_names("sink")


def test_third_party_resolver_wins_over_the_builtin(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, tmp_path / "site", "fake-resolver", {"mlflow_er.sinks": {"resolver": "fake_resolver_mod"}},
            {"fake_resolver_mod": RESOLVER})
    tracker = ExperimentTracker("team/vision", tracking_uri=uri, owner="ana")
    assert tracker.name == "resolved-vision"
    assert tracker.tags["resolver"] == "fake" and tracker.tags["owner"] == "ana" and "git_commit" in tracker.tags
    assert tracker.client.get_experiment_by_name("team/vision") is None
    with tracker.run(run_name="custom-run", extra="1") as run:
        run.log_metric("x", 1.0)
    got = tracker.client.get_run(run.run_id)
    assert got.data.tags["resolved_by"] == "fake" and got.data.tags["extra"] == "1"
    assert got.data.metrics == {"x": 1.0} and got.info.status == "FINISHED"
    # A resolver returning None defers to the built-in one.
    plain = ExperimentTracker("plain", tracking_uri=uri)
    assert plain.name == "plain" and "resolver" not in plain.tags
    with plain.run(run_name="ordinary") as run:
        pass
    assert "resolved_by" not in plain.client.get_run(run.run_id).data.tags


def test_instances_instead_of_names(uri: str) -> None:
    backend = SyncBackend(retry_deadline=5)
    sink = MemorySink()
    tracker = ExperimentTracker("instances", tracking_uri=uri, backend=backend, sinks=[sink, "mlflow"])
    assert tracker.backend is backend
    assert tracker.sinks[0] is sink and tracker.sinks[1].name == "mlflow"
    assert isinstance(backend, Backend) and isinstance(sink, Sink)
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 1.0)
    assert [m.key for m in sink.metrics] == ["x"]
    assert backend.stats()["delivered"] == 2  # one record, two sinks
    assert tracker.client.get_run(run.run_id).data.metrics == {"x": 1.0}


def test_memory_sink_plugin_makes_memory_selectable(uri: str) -> None:
    with pytest.raises(UnknownPlugin):
        ExperimentTracker("mem", tracking_uri=uri, sinks=["memory"])
    plugin = register_memory_sink()
    assert register_memory_sink() is plugin  # idempotent
    tracker = ExperimentTracker("mem", tracking_uri=uri, sinks=["memory"], sink_options={"memory": {"delay": 0.0}})
    assert tracker.sinks[0] is plugin.last
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 2.0, step=5)
    assert plugin.last.metric_history("x") == [(5, 2.0)]
    assert ("sink", "memory") in {(p.kind, p.name) for p in list_plugins()}
    reset_plugin_manager()  # forgets runtime registrations
    assert ("sink", "memory") not in {(p.kind, p.name) for p in list_plugins()}


# -- mlflow_er.testing for plugin authors ----------------------------------------------------
def test_capture_builds_a_tracker_on_a_memory_sink(uri: str, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("content")
    with capture("cap", tracking_uri=uri) as cap:
        with cap.tracker.run(run_name="r") as run:
            run.log_metric("loss", 0.5, step=1)
            run.log_param("lr", 0.1)
            run.set_tag("t", "v")
            run.log_artifact(tmp_path / "f.txt", artifact_path="d")
            run.log_text("hello", "notes/n.txt")
            run.log_artifacts(_folder(tmp_path), "tree")
    assert [(m.key, m.value, m.step) for m in cap.metrics] == [("loss", 0.5, 1)]
    assert cap.sink.param_dict() == {"lr": "0.1"} and cap.sink.tag_dict() == {"t": "v"}
    assert [type(r).__name__ for r in cap.records] == ["Metric", "Param", "Tag"]
    assert cap.sink.files(run.run_id) == {"d/f.txt": b"content", "notes/n.txt": b"hello",
                                          "tree/x.txt": b"x", "tree/sub/y.txt": b"y"}
    assert cap.artifacts[0].content == b"content"
    assert [s.name for s in cap.tracker.sinks] == ["memory"]
    assert cap.tracker.client.get_run(run.run_id).data.metrics == {}  # memory only


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    (folder / "x.txt").write_text("x")
    (folder / "sub" / "y.txt").write_text("y")
    return folder


def test_capture_attaches_to_an_existing_tracker(uri: str) -> None:
    tracker = ExperimentTracker("attach", tracking_uri=uri)
    with capture(tracker=tracker) as cap:
        assert [s.name for s in tracker.sinks] == ["mlflow", "memory"]
        with tracker.run(run_name="r") as run:
            run.log_metric("x", 1.0)
            with pytest.raises(RuntimeError, match="open run"):
                with capture(tracker=tracker):
                    pass
    assert [s.name for s in tracker.sinks] == ["mlflow"]
    assert [m.key for m in cap.metrics] == ["x"]
    assert tracker.client.get_run(run.run_id).data.metrics == {"x": 1.0}


def test_memory_sink_scripted_transient_failures_are_retried(uri: str) -> None:
    sink = MemorySink().fail_next(2, transient=True)
    tracker = ExperimentTracker("retry", tracking_uri=uri, backend=SyncBackend(retry_deadline=20), sinks=[sink])
    with tracker.run(run_name="r") as run:
        run.log_metric("x", 1.0)
        stats = run.stats()
    assert stats["retries"] == 2 and stats["failed"] == 0 and stats["delivered"] == 1
    assert sink.attempts == 3 and sink.failures == 2
    assert [m.key for m in sink.metrics] == ["x"]


def test_memory_sink_scripted_permanent_failures(uri: str) -> None:
    sink = MemorySink().fail_next(1, transient=False)
    tracker = ExperimentTracker("perm", tracking_uri=uri, backend=SyncBackend(retry_deadline=5), sinks=[sink])
    with tracker.run(run_name="r") as run:
        with pytest.raises(DeliveryError, match="scripted permanent") as info:
            run.log_metric("lost", 1.0)
        assert [(f.kind, f.key, f.permanent) for f in info.value.failed] == [("metric", "lost", True)]
        run.log_metric("kept", 2.0)  # only the next write was scripted to fail
        sink.fail_next(1, exc=OSError("custom"))
        with pytest.raises(DeliveryError, match="custom"):
            run.log_metric("also_lost", 3.0)
    assert [m.key for m in sink.metrics] == ["kept"]


def test_memory_sink_fail_when_lets_a_backend_isolate_the_bad_record(uri: str) -> None:
    sink = MemorySink().fail_when(lambda item: isinstance(item, Batch) and any(m.key == "m3" for m in item.metrics))
    tracker = ExperimentTracker("bisect", tracking_uri=uri, backend=SyncBackend(retry_deadline=5), sinks=[sink])
    with tracker.run(run_name="r") as run:
        with pytest.raises(DeliveryError) as info:
            run.log_metrics({f"m{i}": float(i) for i in range(8)})
        sink.clear_failures()
        run.log_metric("m3", 3.0)
    assert [f.key for f in info.value.failed] == ["m3"]
    assert sorted(m.key for m in sink.metrics) == [f"m{i}" for i in range(8)]
    assert sink.metrics[-1].key == "m3"
