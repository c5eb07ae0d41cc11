"""The ``mlflow-er`` command line: ``plugins``, ``--version`` and lazily dispatched subcommands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlflow_er import cli


def _by_name(rows: list[dict], kind: str, name: str) -> dict:
    matches = [r for r in rows if r["kind"] == kind and r["name"] == name]
    assert len(matches) == 1, rows
    return matches[0]


def test_plugins_subprocess_lists_builtins_with_distribution() -> None:
    proc = subprocess.run([sys.executable, "-m", "mlflow_er.cli", "plugins"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "MODULE"]
    rows = [line.split() for line in lines[1:]]
    assert ["backend", "sync", "mlflow-er"] in [r[:3] for r in rows]
    assert ["sink", "mlflow", "mlflow-er"] in [r[:3] for r in rows]


def test_plugins_json_subprocess_parses() -> None:
    proc = subprocess.run([sys.executable, "-m", "mlflow_er.cli", "plugins", "--json"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert _by_name(rows, "backend", "sync")["distribution"] == "mlflow-er"
    assert _by_name(rows, "sink", "mlflow")["distribution"] == "mlflow-er"


def test_plugins_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert ["backend", "sync", "mlflow-er", "mlflow_er.backends.sync"] in [[r[0], r[1], r[2], r[4]] for r in rows]
    assert ["sink", "mlflow", "mlflow-er", "mlflow_er.sinks.mlflow"] in [[r[0], r[1], r[2], r[4]] for r in rows]


def test_plugins_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    sync = _by_name(rows, "backend", "sync")
    assert sync["distribution"] == "mlflow-er"
    assert sync["module"] == "mlflow_er.backends.sync"
    assert set(sync) == {"kind", "name", "distribution", "version", "module", "plugin"}
    assert _by_name(rows, "sink", "mlflow")["distribution"] == "mlflow-er"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlflow-er {cli.version()}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for name in cli.COMMANDS:
        assert name in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_plugins_rejects_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["plugins", "--bogus"])
    assert exc.value.code == 2


def test_lazy_command_missing_module_says_not_available(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", cli.Command("ghost", "h", "mlflow_er._no_such_module:main"))
    assert cli.main(["ghost", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "'ghost' is not available in this version" in err
    assert "mlflow_er._no_such_module" in err


def test_lazy_command_missing_function_says_not_available(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", cli.Command("ghost", "h", "mlflow_er.errors:no_such_main"))
    assert cli.main(["ghost"]) == 2
    assert "has no no_such_main()" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sync", "status", "bench"])
def test_registered_lazy_commands_dispatch_or_say_unavailable(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Until the spool/bench modules land, these must fail clearly — never print fake output."""
    try:
        cli.resolve(cli.COMMANDS[name])
    except cli.CommandUnavailable as exc:
        assert f"'{name}'" in str(exc)
        assert cli.main([name]) == 2
        assert "not available in this version" in capsys.readouterr().err
    # else: the module is there; its own tests cover its behaviour


def test_arguments_after_the_command_reach_its_function(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(cli, "_test_fake_main", fake_main, raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("fake", "h", "mlflow_er.cli:_test_fake_main"))
    assert cli.main(["fake", "s3://bucket/x", "--tracking-uri", "http://127.0.0.1:1", "--help"]) == 7
    assert seen == [["s3://bucket/x", "--tracking-uri", "http://127.0.0.1:1", "--help"]]
