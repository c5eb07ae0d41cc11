"""``mlflow-er status``: what a spool holds and how far it has travelled.

For every segment: open or sealed (and, locally, whether its writer is alive), bytes,
records, whether it is uploaded, how many of its records each tracking server has been
synced, and the damage (gaps) found in it. Acknowledged = records in sealed segments:
sealing fsyncs, so they are durable; a live writer's open segment is counted apart.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .format import DESTINATION_FILE, SEGMENTS_DIR, SYNC_DIR, UPLOADED_DIR
from .reader import Segment, SpoolReader, is_local


def _writer_alive(path: str) -> bool | None:
    """True if a live writer holds the open segment's lock; None where that cannot be known."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: never blocks or disturbs a recovery
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _targets(reader: SpoolReader) -> dict[str, str]:
    fs, base = reader.fs, f"{reader.root.rstrip('/')}/{SYNC_DIR}"
    out: dict[str, str] = {}
    try:
        entries = fs.ls(base, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for entry in entries:
        key = entry.rstrip("/").rsplit("/", 1)[-1]
        try:
            out[key] = json.loads(fs.cat_file(f"{entry.rstrip('/')}/target.json")).get("tracking_uri", "?")
        except (FileNotFoundError, ValueError, AttributeError):
            out[key] = "?"
    return out


def _synced(reader: SpoolReader, key: str, seg: Segment) -> dict[str, Any] | None:
    try:
        value = json.loads(reader.fs.cat_file(f"{reader.root.rstrip('/')}/{SYNC_DIR}/{key}/progress/{seg.name}.json"))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def spool_status(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able description of the spool at ``url`` (reads every segment; never writes)."""
    from .paths import check_spool

    reader = SpoolReader(url, storage_options, warn=False)
    local = is_local(reader.fs)
    root = reader.root.rstrip("/")
    check_spool(reader.fs, root, url)
    targets = _targets(reader)
    destination = reader.fs.exists(f"{root}/{DESTINATION_FILE}")
    has_markers = local and reader.fs.exists(f"{root}/{UPLOADED_DIR}")
    rows: list[dict[str, Any]] = []
    for seg in reader.segments():
        gaps_before = len(reader.gaps)
        records = sum(1 for _ in reader.iter_segment(seg))
        header = reader.header(seg) or {}
        uploaded: bool | None = None  # None: this spool is not uploaded anywhere
        if destination:
            uploaded = seg.sealed  # a sealed segment at an upload destination is an upload
        elif has_markers:
            uploaded = reader.fs.exists(f"{root}/{UPLOADED_DIR}/{SEGMENTS_DIR}/{seg.name}")
        synced = {}
        for key in targets:
            prog = _synced(reader, key, seg)
            synced[key] = {"records": int(prog.get("count", 0)), "done": bool(prog.get("done"))} if prog else \
                {"records": 0, "done": False}
        version = reader.unsupported.get(seg.name)
        rows.append({
            "segment": seg.name, "state": f"unsupported (format v{version})" if version else
            ("sealed" if seg.sealed else "open"), "format": version or reader.header_info(seg).version,
            "writer_alive": None if seg.sealed or not local else _writer_alive(seg.path),
            "bytes": seg.size, "records": records, "open_tail_bytes": reader.open_tails.get(seg.name, 0),
            "experiment": header.get("experiment_name"), "run_id": header.get("run_id"),
            "writer": header.get("writer_id"), "uploaded": uploaded, "synced": synced,
            "gaps": [str(g) for g in reader.gaps[gaps_before:]],
        })
    sealed = [r for r in rows if r["state"] == "sealed"]
    unsupported = [r["segment"] for r in rows if r["state"].startswith("unsupported")]
    totals = {
        "segments": len(rows), "records": sum(r["records"] for r in rows),
        "acknowledged": sum(r["records"] for r in sealed),
        "open_records": sum(r["records"] for r in rows if r["state"] == "open"),
        "uploaded": sum(r["records"] for r in rows if r["uploaded"]),
        "uploaded_segments": sum(1 for r in rows if r["uploaded"]),
        "synced": {key: sum(r["synced"][key]["records"] for r in rows) for key in targets},
        "gaps": sum(len(r["gaps"]) for r in rows), "unsupported": len(unsupported),
    }
    return {"url": url, "local": local, "destination": destination, "targets": targets, "totals": totals,
            "segments": rows}


def format_status(status: dict[str, Any]) -> str:
    """The status as a table for people."""
    t = status["totals"]
    targets = status["targets"]
    first = next(iter(targets), None)
    lines = [f"spool {status['url']}: {t['segments']} segment(s), {t['records']} record(s)"]
    head = ["SEGMENT", "STATE", "BYTES", "RECORDS", "UPLOADED", "SYNCED", "GAPS"]
    table = [head]
    for r in status["segments"]:
        state = r["state"] + ("" if r["writer_alive"] is None else (" (live)" if r["writer_alive"] else " (dead)"))
        up = "-" if r["uploaded"] is None else ("yes" if r["uploaded"] else "no")
        synced = "-"
        if first is not None:
            s = r["synced"][first]
            synced = f"{s['records']}" + (" done" if s["done"] else "")
        table.append([r["segment"], state, str(r["bytes"]), str(r["records"]), up, synced, str(len(r["gaps"]))])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.append(f"acknowledged (sealed): {t['acknowledged']}   in open segments: {t['open_records']}   "
                 f"uploaded: {t['uploaded']} ({t['uploaded_segments']}/{t['segments']} segments)")
    for key, uri in targets.items():
        lines.append(f"synced into {uri}: {t['synced'][key]} of {t['records']}")
    if not targets:
        lines.append("synced: never (run `mlflow-er sync URL --tracking-uri URI`)")
    newer = [r for r in status["segments"] if r["state"].startswith("unsupported")]
    if newer:
        lines.append(f"{len(newer)} segment(s) written by a newer mlflow-er (not read, not synced): upgrade "
                     f"mlflow-er (pip install -U mlflow-er)")
        lines += [f"  {r['segment']}: format version {r['format']}" for r in newer]
    gaps = [g for r in status["segments"] if not r["state"].startswith("unsupported") for g in r["gaps"]]
    if gaps:
        lines.append(f"gaps ({len(gaps)}): records in these byte ranges could not be read")
        lines += [f"  {g}" for g in gaps]
    return "\n".join(lines)
