"""Run MLflow's own tracking tests against the installed MLflow, on a plain or a mlflow-er URI.

MLflow's ``tests/conftest.py`` points every test at ``db_uri`` (``sqlite:///<copy of a cached
db>``) through its autouse ``tracking_uri_mock``. ``export`` copies MLflow's tests out of a git
mirror into a scratch folder outside this repository and patches that one fixture so it yields
``$MLFLOW_ER_SUITE_PREFIX + "sqlite:///..."``; ``run`` runs a selection with a prefix and writes
JUnit XML; ``compare`` prints the counts of each run and the tests that pass on the first but not
on the second. See docs/compatibility.md for the figures measured with it.

    python tests/mlflow_suite/run_suite.py export --mirror /work/.mirror/harupy+mlflow/repo --dest /work/mlflow-tests
    python tests/mlflow_suite/run_suite.py run --dest /work/mlflow-tests --prefix "" --out plain.xml
    python tests/mlflow_suite/run_suite.py run --dest /work/mlflow-tests --prefix threaded+ --out threaded.xml
    python tests/mlflow_suite/run_suite.py compare plain.xml threaded.xml
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENV_PREFIX = "MLFLOW_ER_SUITE_PREFIX"
DEFAULT_TESTS = (
    "tests/tracking/fluent/test_fluent.py",
    "tests/tracking/test_tracking.py",
    "tests/tracking/test_client.py",
    "tests/sklearn/test_sklearn_autolog.py",
)
# The one line of MLflow's tests/conftest.py the prefix goes into (the db_uri fixture).
DB_URI_LINE = 'yield f"sqlite:///{db_path}"'
PATCHED_LINE = f'yield os.environ.get("{ENV_PREFIX}", "") + f"sqlite:///{{db_path}}"'


def export(mirror: str, dest: Path, rev: str) -> None:
    """MLflow's ``tests/`` and ``pyproject.toml`` at ``rev`` into ``dest``, with ``db_uri`` patched."""
    data = subprocess.run(["git", f"--git-dir={mirror}", "archive", rev, "tests", "pyproject.toml"],
                          check=True, capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    conftest = dest / "tests" / "conftest.py"
    text = conftest.read_text()
    if PATCHED_LINE not in text:
        if text.count(DB_URI_LINE) != 1:
            sys.exit(f"{conftest}: expected one {DB_URI_LINE!r} (the db_uri fixture); MLflow changed it")
        conftest.write_text(text.replace(DB_URI_LINE, PATCHED_LINE))
    if (dest / "mlflow").exists():
        sys.exit(f"{dest}/mlflow exists: it would shadow the installed MLflow; export only tests/")
    print(f"exported MLflow's tests at {rev} into {dest}; db_uri now honours ${ENV_PREFIX}")


def run(dest: Path, prefix: str, out: Path, tests: list[str], workers: int, timeout: int,
        extra: list[str]) -> int:
    """Run ``tests`` in ``dest`` with the installed MLflow and this tree's mlflow_er first on the path."""
    env = dict(os.environ, **{ENV_PREFIX: prefix, "PYTHONPATH": os.pathsep.join((str(REPO), str(HERE))),
                              "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    check = subprocess.run([sys.executable, "-c", "import mlflow, mlflow_er; print(mlflow.__version__, "
                            "mlflow.__file__, mlflow_er.__file__)"], cwd=dest, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    if str(dest) in check[1] or not check[2].startswith(str(REPO)):
        sys.exit(f"wrong modules: mlflow {check[1]}, mlflow_er {check[2]}")
    print(f"mlflow {check[0]} from {check[1]}; mlflow_er from {check[2]}; prefix {prefix!r}", flush=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-p", "no:legacypath",
           "-p", "suite_plugin",
           "--color=no", "-q", "-rN", f"--timeout={timeout}", f"--junitxml={out.resolve()}"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    return subprocess.run(cmd + extra + tests, cwd=dest, env=env).returncode


def outcomes(xml: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from a JUnit XML report."""
    result: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        state = ("failed" if "failure" in kinds else "error" if "error" in kinds
                 else "skipped" if "skipped" in kinds else "passed")
        # A teardown error is reported as a second element of the same case: the worse one counts.
        if result.get(name) not in ("failed", "error"):
            result[name] = state
    return result


def compare(base: Path, other: Path) -> int:
    """Counts of both runs and the tests passing in ``base`` but not in ``other`` (and the reverse)."""
    a, b = outcomes(base), outcomes(other)
    for label, res in ((base, a), (other, b)):
        counts = {k: sum(v == k for v in res.values()) for k in ("passed", "failed", "error", "skipped")}
        print(f"{label.name}: {len(res)} tests, " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lost = sorted(t for t, s in a.items() if s == "passed" and b.get(t) != "passed")
    won = sorted(t for t, s in b.items() if s == "passed" and a.get(t) != "passed")
    both_failed = sum(1 for t, s in a.items() if s in ("failed", "error") and b.get(t) in ("failed", "error"))
    print(f"failing on both (not the scheme's): {both_failed}")
    print(f"pass on {base.name}, not on {other.name}: {len(lost)}")
    for t in lost:
        print(f"  {b.get(t, 'missing'):8} {t}")
    if won:
        print(f"pass on {other.name}, not on {base.name}: {len(won)}")
        for t in won:
            print(f"  {a.get(t, 'missing'):8} {t}")
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export")
    p.add_argument("--mirror", required=True, help="git dir of a clone or fork of mlflow/mlflow")
    p.add_argument("--dest", type=Path, required=True, help="scratch folder outside this repository")
    p.add_argument("--rev", default="HEAD")
    p = sub.add_parser("run")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--prefix", default="", help='"" (plain sqlite:), "threaded+", "spool+", "process+"')
    p.add_argument("--out", type=Path, required=True, help="JUnit XML report")
    p.add_argument("-n", "--workers", type=int, default=2)
    p.add_argument("--timeout", type=int, default=180, help="seconds per test")
    p.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS))
    p = sub.add_parser("compare")
    p.add_argument("base", type=Path)
    p.add_argument("other", type=Path)
    args, extra = parser.parse_known_args(argv)
    if args.cmd == "export":
        export(args.mirror, args.dest.resolve(), args.rev)
        return 0
    if args.cmd == "run":
        return run(args.dest.resolve(), args.prefix, args.out, args.tests, args.workers, args.timeout, extra)
    return compare(args.base, args.other)


if __name__ == "__main__":
    sys.exit(main())
