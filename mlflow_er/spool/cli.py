"""``mlflow-er sync`` and ``mlflow-er status`` (dispatched here lazily by :mod:`mlflow_er.cli`).

Exit codes: 0 done; 1 some records were rejected by the server (listed; the rest is
synced); 2 bad usage; 3 the sync stopped early (server unreachable...) — progress is
saved, run it again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def _storage_options(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            parser.error(f"--storage-option expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)  # numbers, booleans and JSON objects (client_kwargs=...)
        except ValueError:
            out[key] = raw
    return out


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spool_url", metavar="SPOOL_URL",
                        help="the spool: a local folder or any fsspec URL (file://, memory://, s3://, gs://...)")
    parser.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for SPOOL_URL (repeatable; VALUE may be JSON), "
                             "e.g. -o endpoint_url=http://127.0.0.1:9000")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def sync_main(argv: list[str]) -> int:
    """``mlflow-er sync SPOOL_URL --tracking-uri URI``: replay a spool into MLflow exactly once."""
    parser = argparse.ArgumentParser(
        prog="mlflow-er sync",
        description="Replay every segment of a spool into an MLflow tracking server, exactly once: a second "
                    "sync is a no-op and an interrupted sync resumes where it stopped. Progress and the run "
                    "mapping are stored beside the segments, so any host can run it.")
    _add_common(parser)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="where to replay to (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--retry-deadline", type=float, default=60.0, metavar="SECONDS",
                        help="keep retrying an unavailable server this long before stopping (default 60)")
    parser.add_argument("--chunk", type=int, default=5000, metavar="RECORDS",
                        help="records delivered between progress checkpoints (default 5000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    opts = parser.parse_args(argv)
    if not opts.tracking_uri:
        parser.error("--tracking-uri is required (or set MLFLOW_TRACKING_URI)")
    storage = _storage_options(opts.storage_option, parser)

    from .errors import SyncError
    from .replay import sync

    try:
        report = sync(opts.spool_url, opts.tracking_uri, storage_options=storage, retry_deadline=opts.retry_deadline,
                      chunk_records=opts.chunk, progress=False if opts.no_progress else None)
    except SyncError as exc:
        if opts.json:
            print(json.dumps({"error": str(exc), "stopped": True}))
        print(f"mlflow-er sync: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except FileNotFoundError as exc:
        print(f"mlflow-er sync: no spool at {opts.spool_url}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if opts.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"synced {report.records} record(s) from {report.segments} segment(s) "
              f"({report.segments_skipped} already done), {report.artifacts} artifact(s), "
              f"{len(report.runs_created)} run(s) created")
        for gap in report.gaps:
            print(f"  gap: {gap}")
        for failure in report.failed[:50]:
            print(f"  rejected: {failure}")
        if len(report.failed) > 50:
            print(f"  ... and {len(report.failed) - 50} more rejected")
    return EXIT_FAILED if report.failed else EXIT_OK


def status_main(argv: list[str]) -> int:
    """``mlflow-er status SPOOL_URL``: segments, records, acknowledged/uploaded/synced counts and gaps."""
    parser = argparse.ArgumentParser(
        prog="mlflow-er status",
        description="Show a spool's segments and records, how many are acknowledged (sealed), uploaded and "
                    "synced into each tracking server, and any damage (gaps) found.")
    _add_common(parser)
    opts = parser.parse_args(argv)
    storage = _storage_options(opts.storage_option, parser)

    from .status import format_status, spool_status

    status = spool_status(opts.spool_url, storage)
    if opts.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return EXIT_OK
