"""``mlflow-er sync`` and ``mlflow-er status`` (dispatched here lazily by :mod:`mlflow_er.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_NOT_A_SPOOL, EXIT_UNSUPPORTED, EXIT_BUSY = 0, 1, 2, 3, 4, 5, 6

EXIT_CODES = f"""exit codes:
  {EXIT_OK}  done: every record is synced (or nothing was left to sync)
  {EXIT_FAILED}  some records failed (rejected by the server, or an artifact the spool may not read); they are
     listed, everything else is synced and a new sync will not retry them
  {EXIT_USAGE}  bad usage (unknown option, missing --tracking-uri)
  {EXIT_STOPPED}  stopped early (server unreachable, lease lost): progress is saved, run the same command again
  {EXIT_NOT_A_SPOOL}  SPOOL_URL does not exist or is not a spool (nothing was created there)
  {EXIT_UNSUPPORTED}  a segment was written by a newer mlflow-er: upgrade mlflow-er; nothing was synced
  {EXIT_BUSY}  another mlflow-er sync is syncing this spool into this server (use --wait SECONDS)"""


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


def _fail(opts: argparse.Namespace, message: str, code: int) -> int:
    if opts.json:
        print(json.dumps({"error": message, "exit_code": code}))
    print(f"mlflow-er {opts.command}: {message}", file=sys.stderr)
    return code


def sync_main(argv: list[str]) -> int:
    """``mlflow-er sync SPOOL_URL --tracking-uri URI``: replay a spool into MLflow exactly once."""
    parser = argparse.ArgumentParser(
        prog="mlflow-er sync", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
        description="Replay every segment of a spool into an MLflow tracking server, exactly once: a second "
                    "sync is a no-op and an interrupted sync resumes where it stopped. Progress and the run "
                    "mapping are stored beside the segments, so any host can run it; one sync at a time per "
                    "spool and server (a lease beside the segments).")
    _add_common(parser)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="where to replay to (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--retry-deadline", type=float, default=60.0, metavar="SECONDS",
                        help="keep retrying an unavailable server this long before stopping (default 60)")
    parser.add_argument("--chunk", type=int, default=5000, metavar="RECORDS",
                        help="records delivered between progress checkpoints (default 5000)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="if another sync holds the lease, wait up to this long for it (default 0: stop at once)")
    parser.add_argument("--lease-ttl", type=float, default=60.0, metavar="SECONDS",
                        help="a sync whose lease has not been renewed this long is taken as dead (default 60)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and records not yet synced; send nothing, write nothing")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: a bar on a terminal, else a line every ~10 s or 10%%)")
    opts = parser.parse_args(argv)
    opts.command = "sync"
    if not opts.tracking_uri:
        parser.error("--tracking-uri is required (or set MLFLOW_TRACKING_URI)")
    storage = _storage_options(opts.storage_option, parser)

    from .errors import NotASpool, SyncError, UnsupportedSpool
    from .lease import LeaseBusy
    from .replay import sync

    try:
        report = sync(opts.spool_url, opts.tracking_uri, storage_options=storage, retry_deadline=opts.retry_deadline,
                      chunk_records=opts.chunk, progress=False if opts.no_progress else None, wait=opts.wait,
                      lease_ttl=opts.lease_ttl, dry_run=opts.dry_run)
    except NotASpool as exc:
        return _fail(opts, str(exc), EXIT_NOT_A_SPOOL)
    except UnsupportedSpool as exc:
        return _fail(opts, str(exc), EXIT_UNSUPPORTED)
    except LeaseBusy as exc:
        return _fail(opts, str(exc), EXIT_BUSY)
    except SyncError as exc:
        if opts.json:
            print(json.dumps({"error": str(exc), "stopped": True, "exit_code": EXIT_STOPPED}))
        print(f"mlflow-er sync: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    if opts.json:
        out = report.as_dict()
        if report.plan is not None:
            out["plan"] = report.plan
        print(json.dumps(out, indent=2))
    elif report.plan is not None:
        print(report.plan)
    else:
        print(f"synced {report.records} record(s) from {report.segments} segment(s) "
              f"({report.segments_skipped} already done), {report.artifacts} artifact(s), "
              f"{len(report.runs_created)} run(s) created")
        for gap in report.gaps:
            print(f"  gap: {gap}")
        for failure in report.failed[:50]:
            print(f"  failed: {failure}")
        if len(report.failed) > 50:
            print(f"  ... and {len(report.failed) - 50} more failed")
    return EXIT_FAILED if report.failed else EXIT_OK


def status_main(argv: list[str]) -> int:
    """``mlflow-er status SPOOL_URL``: segments, records, acknowledged/uploaded/synced counts and gaps."""
    parser = argparse.ArgumentParser(
        prog="mlflow-er status", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show a spool's segments and records, how many are acknowledged (sealed), uploaded and "
                    "synced into each tracking server, and any damage (gaps) found.",
        epilog=f"exit codes: {EXIT_OK} shown; {EXIT_USAGE} bad usage; {EXIT_NOT_A_SPOOL} SPOOL_URL does not exist "
               f"or is not a spool; {EXIT_UNSUPPORTED} shown, but a segment was written by a newer mlflow-er "
               f"(upgrade mlflow-er to read or sync it)")
    _add_common(parser)
    opts = parser.parse_args(argv)
    opts.command = "status"
    storage = _storage_options(opts.storage_option, parser)

    from .errors import NotASpool
    from .status import format_status, spool_status

    try:
        status = spool_status(opts.spool_url, storage)
    except NotASpool as exc:
        return _fail(opts, str(exc), EXIT_NOT_A_SPOOL)
    if opts.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return EXIT_UNSUPPORTED if status["totals"]["unsupported"] else EXIT_OK
