"""What ``mlflow-er sync`` shows while it works, and what ``--dry-run`` lists.

On a terminal: a tqdm bar counting records, with artifacts beside it. Elsewhere (cron,
CI logs): one line to stderr every ~10 s or every 10 % of the records, whichever comes
first, so a long sync is never silent. Both need the number of records still to sync,
counted by reading the pending part of each segment once before the sync starts.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..records import Artifact, Metric, Param, Tag
from .format import RunInfo
from .reader import Position, Segment, SpoolReader

LINE_INTERVAL = 10.0


@dataclass
class Pending:
    """Records not yet synced, in total and per spooled run (by kind)."""

    records: int = 0
    artifacts: int = 0
    runs: dict[str, Counter[str]] = field(default_factory=dict)
    run_names: dict[str, str] = field(default_factory=dict)


def _kind(record: Any) -> str:
    return {Metric: "metrics", Param: "params", Tag: "tags", Artifact: "artifacts", RunInfo: "run facts"}.get(
        type(record), "other")


def count_pending(url: str, storage_options: dict[str, Any] | None,
                  work: list[tuple[Segment, Position | None]]) -> Pending:
    """Read (never write) what each segment of ``work`` holds after its position."""
    reader = SpoolReader(url, storage_options, warn=False)
    out = Pending()
    for seg, start in work:
        for record, _ in reader.iter_segment(seg, start):
            out.records += 1
            kind = _kind(record)
            if kind == "artifacts":
                out.artifacts += 1
            run = getattr(record, "run_id", "?")
            out.runs.setdefault(run, Counter())[kind] += 1
            if type(record) is RunInfo and record.fields.get("run_name"):
                out.run_names[run] = str(record.fields["run_name"])
    return out


class SyncProgress:
    """``mode``: ``"bar"`` (tqdm), ``"lines"`` (a line every ``interval`` s or 10 %), or ``None`` (silent)."""

    def __init__(self, pending: Pending, mode: str | None, stream: TextIO | None = None,
                 interval: float = LINE_INTERVAL):
        self.total, self.total_artifacts = pending.records, pending.artifacts
        self.mode = mode if pending.records else None
        self.stream = stream or sys.stderr
        self.interval = interval
        self.records = self.artifacts = 0
        self._start = self._last = time.monotonic()
        self._next_pct = 10
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=" records", desc="mlflow-er sync", file=self.stream,
                             dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        if self._bar is not None and self.total_artifacts:
            self._bar.set_postfix_str(f"{self.artifacts}/{self.total_artifacts} artifacts", refresh=False)

    def update(self, records: int = 0, artifacts: int = 0) -> None:
        """Count ``records`` more records (of which ``artifacts`` artifacts) as synced."""
        self.records += records
        self.artifacts += artifacts
        if self._bar is not None:
            self._postfix()
            self._bar.update(records)
        elif self.mode == "lines":
            now = time.monotonic()
            pct = 100 * self.records // max(1, self.total)
            if now - self._last >= self.interval or pct >= self._next_pct:
                self._line(now, pct)

    def _line(self, now: float, pct: int) -> None:
        self._last = now
        while self._next_pct <= pct:
            self._next_pct += 10
        arts = f", {self.artifacts}/{self.total_artifacts} artifacts" if self.total_artifacts else ""
        print(f"mlflow-er sync: {self.records}/{self.total} records ({pct}%){arts}, {now - self._start:.0f}s",
              file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar (the last line is printed by the CLI's summary)."""
        if self._bar is not None:
            self._bar.close()


def format_plan(pending: Pending, mapped: dict[str, str | None], uri: str) -> str:
    """The ``--dry-run`` listing: each spooled run, where it goes, and what is not synced yet."""
    if not pending.records:
        return f"dry run: nothing to sync into {uri} (every segment is synced)"
    lines = [f"dry run: {pending.records} record(s) of {len(pending.runs)} run(s) not yet synced into {uri}:"]
    for run, kinds in sorted(pending.runs.items()):
        name = f" ({pending.run_names[run]})" if run in pending.run_names else ""
        target = mapped.get(run)
        where = f"-> run {target}" if target else "-> new run (or the server's run with this id)"
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        lines.append(f"  {run}{name} {where}: {counts}")
    lines.append("nothing was sent or written (drop --dry-run to sync)")
    return "\n".join(lines)
