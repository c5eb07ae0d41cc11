"""docs/plugins.md documents every hook spec, and its complete third-party sink example works."""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_er import ExperimentTracker, hookspecs
from mlflow_er.plugins import list_plugins, reset_plugin_manager
from mlflow_er.testing import prefill_sqlite_store, write_fake_distribution

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return sorted(name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction)
                  if name.startswith("mlflow_er_"))


def example_block(marker: str) -> str:
    """The fenced code block right after ``<!-- example: MARKER -->``."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- example: {re.escape(marker)} -->\s*```[a-z]*\n(.*?)\n```", text, re.S)
    assert found, f"docs/plugins.md has no code block marked <!-- example: {marker} -->"
    return found.group(1)


def entry_points_of(pyproject: str) -> dict[str, dict[str, str]]:
    """The ``[project.entry-points."GROUP"]`` tables of a pyproject (no tomllib on Python 3.10)."""
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in pyproject.splitlines():
        line = line.strip()
        header = re.fullmatch(r'\[project\.entry-points\."([^"]+)"\]', line)
        if header:
            current = groups.setdefault(header.group(1), {})
        elif line.startswith("["):
            current = None
        elif current is not None and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key.strip('"')] = value.strip('"')
    return groups


def test_hookspecs_exist() -> None:
    assert len(hook_names()) >= 4
    assert {"mlflow_er_resolve_experiment", "mlflow_er_resolve_run", "mlflow_er_make_backend",
            "mlflow_er_make_sink"} <= set(hook_names())


@pytest.mark.parametrize("name", hook_names())
def test_every_hookspec_is_documented_under_its_own_heading(name: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert re.search(rf"^#+ {name}\s*$", text, re.M), f"docs/plugins.md has no heading for hook {name}"
    section = text.split(f" {name}\n", 1)[1].split("\n#", 1)[0]
    # the section says when it is called, what it returns, and whether it is firstresult
    assert "**When:**" in section and "**Returns:**" in section and "**firstresult:**" in section
    firstresult = getattr(hookspecs, name).mlflow_er_spec.get("firstresult", False)
    assert ("**firstresult:** yes" in section) == firstresult


def test_docs_cover_the_switches_and_contracts() -> None:
    text = DOC.read_text(encoding="utf-8")
    for needle in ("mlflow_er.backends", "mlflow_er.sinks", "MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD", "MLFLOW_ER_BACKEND",
                   "MLFLOW_ER_SINKS", "## The Sink contract", "## The Backend contract", "UnknownPlugin",
                   "mlflow_er.testing", "MemorySink", "capture("):
        assert needle in text, needle


@pytest.fixture
def clean_plugins() -> Iterator[None]:
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def test_the_documented_third_party_sink_works(clean_plugins: None, tracking_uri: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pyproject = example_block("pyproject")
    module_source = example_block("module")
    dist_name = re.search(r'^name = "([^"]+)"', pyproject, re.M).group(1)  # type: ignore[union-attr]
    eps = entry_points_of(pyproject)
    assert list(eps) == ["mlflow_er.sinks"]
    ((sink_name, module_name),) = eps["mlflow_er.sinks"].items()
    site = tmp_path / "site"
    write_fake_distribution(site, dist_name, "1.0", eps, {module_name: module_source})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("MLFLOW_ER_SINKS", raising=False)
    reset_plugin_manager()
    try:
        assert (("sink", sink_name, dist_name) in
                {(p.kind, p.name, p.distribution) for p in list_plugins()})
        out = tmp_path / "logs" / "records.jsonl"
        prefill_sqlite_store(tracking_uri)
        tracker = ExperimentTracker("docs-example", tracking_uri=tracking_uri, sinks=["mlflow", sink_name],
                                    sink_options={sink_name: {"path": str(out)}})
        (tmp_path / "model.bin").write_bytes(b"weights")
        with tracker.run(run_name="r") as run:
            run.log_metric("loss", 0.25, step=1)
            run.log_metrics({"acc": 0.5, "nan": float("nan")}, step=2)
            run.log_param("lr", 0.001)
            run.set_tag("phase", "train")
            run.log_artifact(tmp_path / "model.bin", artifact_path="ckpt")
        for sink in tracker.sinks:
            sink.close()
        lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        got = [(d["kind"], d.get("key"), d.get("value"), d.get("step")) for d in lines if d["kind"] != "artifact"]
        assert got[0] == ("metric", "loss", 0.25, 1)
        assert got[1] == ("metric", "acc", 0.5, 2)
        assert got[2][:2] == ("metric", "nan") and got[2][2] != got[2][2]  # NaN survives the round trip
        assert got[3:] == [("param", "lr", "0.001", None), ("tag", "phase", "train", None)]
        assert all(d["run_id"] == run.run_id for d in lines)
        artifacts = [d for d in lines if d["kind"] == "artifact"]
        assert [(a["artifact_path"], a["name"]) for a in artifacts] == [("ckpt", "model.bin")]
        copied = list((out.parent).rglob("model.bin"))
        assert len(copied) == 1 and copied[0].read_bytes() == b"weights"
        # and MLflow got the same records through the built-in sink
        assert tracker.client.get_run(run.run_id).data.metrics["loss"] == 0.25
    finally:
        sys.modules.pop(module_name, None)
