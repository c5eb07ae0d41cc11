"""The ``mlflow-er`` command line.

Each subcommand is one entry in :data:`COMMANDS`: a name, a one-line help and a
``"module:function"`` target. The target is imported only when that subcommand runs, so
``mlflow-er plugins`` never pays for fsspec or the benchmark, and a command whose module
is not part of this install fails with a clear message instead of an ImportError.

A target has the signature ``main(argv: list[str]) -> int | None``: it receives the
arguments after the subcommand name, parses them itself (its own ``argparse`` parser with
``prog="mlflow-er NAME"``) and returns the exit code (``None`` means 0). To add a
subcommand, write that function in your module and add one line to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

#: Exit code for "this command cannot run here" (not available, bad usage), as argparse uses.
EXIT_UNAVAILABLE = 2


@dataclass(frozen=True)
class Command:
    """One ``mlflow-er`` subcommand, resolved lazily."""

    name: str
    help: str
    target: str  # "package.module:function"


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("plugins", "list every backend and sink with the distribution that provides it",
                "mlflow_er.cli:plugins_main"),
        Command("sync", "replay a spool (any fsspec URL) into MLflow, exactly once",
                "mlflow_er.spool.cli:sync_main"),
        Command("status", "show a spool's segments, records and what is acknowledged/uploaded/synced",
                "mlflow_er.spool.cli:status_main"),
        Command("bench", "measure caller latency and drain throughput of MLflow and mlflow-er backends",
                "mlflow_er.bench:main"),
    )
}


class CommandUnavailable(Exception):
    """The module or function behind a subcommand is not part of this install."""


def version() -> str:
    """The installed distribution's version (the package's own when run from a bare source tree)."""
    try:
        return metadata.version("mlflow-er")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def resolve(command: Command) -> Callable[[list[str]], int | None]:
    """Import a command's target, or raise :class:`CommandUnavailable` saying what is missing."""
    module_name, _, func_name = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only "the command's own module is absent" means not available in this version; a
        # missing third-party dependency inside it is a different problem, said differently.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CommandUnavailable(f"'{command.name}' is not available in this version of mlflow-er "
                                     f"({version()}): module {module_name} is not installed") from exc
        raise CommandUnavailable(f"'{command.name}' needs the Python package {exc.name!r}, which is not "
                                 f"installed") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise CommandUnavailable(f"'{command.name}' is not available in this version of mlflow-er "
                                 f"({version()}): {module_name} has no {func_name}()")
    return func


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlflow-er",
        description="mlflow-er: log to MLflow without slowing training down.",
        epilog="Run 'mlflow-er COMMAND --help' for a command's own options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        # add_help=False: '--help' after the name belongs to the command's own parser.
        sub.add_parser(cmd.name, help=cmd.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlflow-er`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, rest = parser.parse_known_args(args)
    if ns.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help(sys.stderr)
        return EXIT_UNAVAILABLE
    command = COMMANDS[ns.command]
    try:
        func = resolve(command)
    except CommandUnavailable as exc:
        print(f"mlflow-er: error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    code = func(rest)
    return 0 if code is None else int(code)


# -- mlflow-er plugins ---------------------------------------------------------------------
def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except (metadata.PackageNotFoundError, ValueError):
        return ""


def plugins_main(argv: list[str]) -> int:
    """``mlflow-er plugins [--json]``: every backend and sink name and where it comes from."""
    parser = argparse.ArgumentParser(prog="mlflow-er plugins",
                                     description="List every backend and sink with the distribution providing it.")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    opts = parser.parse_args(argv)

    from . import plugins

    pm = plugins.get_plugin_manager()
    rows = [
        {"kind": p.kind, "name": p.name, "distribution": p.distribution, "version": _dist_version(p.distribution),
         "module": getattr(pm.get_plugin(p.plugin), "__name__", ""), "plugin": p.plugin}
        for p in plugins.list_plugins()
    ]
    if opts.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = {"kind": "KIND", "name": "NAME", "distribution": "DISTRIBUTION", "version": "VERSION",
              "module": "MODULE"}
    cols = list(header)
    widths = {c: max(len(str(r[c])) for r in [header, *rows]) for c in cols}
    for r in [header, *rows]:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip())
    if plugins.autoload_disabled():
        print("(MLFLOW_ER_DISABLE_PLUGIN_AUTOLOAD is set: third-party plugins were not loaded)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
