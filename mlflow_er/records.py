"""The records that travel from a log call to the sinks.

Records are tuples (``NamedTuple``) because a log call builds one per call on the
caller's thread: a tuple is the cheapest immutable object Python can make, and it is
safe to share with the writer thread without copying. Every record carries the run it
belongs to, the call-time timestamp (ms) and a per-run sequence number, so a sink, a
spool or a replay can restore call order exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Metric(NamedTuple):
    """One metric value. ``value`` is a float (NaN and ±inf kept as given)."""

    run_id: str
    key: str
    value: float
    timestamp: int
    step: int
    seq: int


class Param(NamedTuple):
    """One run parameter; ``value`` is already the string MLflow stores."""

    run_id: str
    key: str
    value: str
    timestamp: int
    seq: int


class Tag(NamedTuple):
    """One run tag (last write wins, so order matters)."""

    run_id: str
    key: str
    value: str
    timestamp: int
    seq: int


class Artifact(NamedTuple):
    """A file or directory to upload into the run's artifact store.

    ``local_path`` is a snapshot the backend owns when ``owned`` is true (delete it
    after upload). ``artifact_path`` is the destination folder inside the run
    (``None`` for the root). ``payload`` is set instead of a file for content the
    writer must still render (``("image", array)``, ``("text", str)``, ``("json", obj)``)
    with ``name`` as the file name to create.
    """

    run_id: str
    local_path: str | None
    artifact_path: str | None
    timestamp: int
    seq: int
    owned: bool = False
    is_dir: bool = False
    payload: tuple[str, Any] | None = None
    name: str | None = None
    size: int = 0
    fingerprint: tuple | None = None  # set when the snapshot is a hard link (see artifacts.verify)


class RunStart(NamedTuple):
    """A run block began: travels in the stream ahead of the run's records (sinks' ``start_run``)."""

    run_id: str
    timestamp: int
    seq: int
    run_name: str | None = None
    parent_run_id: str | None = None
    description: str | None = None
    tags: dict[str, str] | None = None


class RunEnd(NamedTuple):
    """A run block ended with ``status``: "end the run" means "deliver up to and including this"."""

    run_id: str
    timestamp: int
    seq: int
    status: str = "FINISHED"


Record = Metric | Param | Tag | Artifact
#: Everything a backend carries: the data records plus the run lifecycle markers.
StreamItem = Metric | Param | Tag | Artifact | RunStart | RunEnd

#: MLflow's limits for one ``log_batch`` request (see MLflow's REST API docs).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
#: Keep a safety margin under the server's 1 MB request limit for JSON overhead.
MAX_BATCH_BYTES = 900_000


def record_kind(record: Record) -> str:
    """``"metric"``, ``"param"``, ``"tag"`` or ``"artifact"``."""
    return _KIND[type(record)]


_KIND = {Metric: "metric", Param: "param", Tag: "tag", Artifact: "artifact", RunStart: "run_start",
         RunEnd: "run_end"}


def approx_size(record: Record) -> int:
    """A cheap estimate of a record's JSON size in a ``log_batch`` body."""
    if type(record) is Metric:
        return len(record.key) + 80
    if type(record) is not Param and type(record) is not Tag:
        return 200
    return len(record.key) + len(record.value) + 40


@dataclass
class Batch:
    """Records of one run handed to :meth:`Sink.write_batch`, in call order per kind.

    A batch always fits MLflow's ``log_batch`` limits. Params and tags are already
    de-duplicated (last value wins for tags) because MLflow rejects a batch that names
    a param key twice.
    """

    run_id: str
    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def records(self) -> Iterator[Metric | Param | Tag]:
        """Every record of the batch, in sequence order."""
        merged: list[Metric | Param | Tag] = [*self.metrics, *self.params, *self.tags]
        merged.sort(key=lambda r: r.seq)
        return iter(merged)

    @classmethod
    def of(cls, run_id: str, records: Iterable[Metric | Param | Tag]) -> Batch:
        """Build one batch from records of ``run_id`` (caller guarantees it fits the limits)."""
        batch = cls(run_id)
        tags: dict[str, Tag] = {}
        params: dict[str, Param] = {}
        for r in records:
            t = type(r)
            if t is Metric:
                batch.metrics.append(r)  # type: ignore[arg-type]  # `type() is` does not narrow
            elif t is Param:
                params.setdefault(r.key, r)  # type: ignore[arg-type]
            else:
                tags.pop(r.key, None)  # re-insert so dict order follows the last write
                tags[r.key] = r  # type: ignore[assignment]
        batch.params = list(params.values())
        batch.tags = list(tags.values())
        return batch


def split_batches(run_id: str, records: list[Metric | Param | Tag]) -> list[Batch]:
    """Cut a run's records, in order, into batches that respect every ``log_batch`` limit.

    Each kind keeps its call order (and every record its ``seq``). Params and tags go
    ahead of the metrics of the same call: a batch holds them in separate lists anyway, so
    order across kinds is not observable in MLflow, and mixing a few tags into every metric
    batch made the store repeat its param/tag/run queries once per batch (~10 % of drain
    time). A tag key already present in the current batch closes it first, so a later value
    of the same tag lands in a later request and last-write-wins holds on the server even
    when the server applies a batch's kinds in its own order.
    """
    records = [r for r in records if type(r) is not Metric] + [r for r in records if type(r) is Metric]
    out: list[Batch] = []
    cur: list[Metric | Param | Tag] = []
    n_m = n_p = n_t = size = 0
    tag_keys: set[str] = set()
    param_keys: set[str] = set()

    def close() -> None:
        nonlocal cur, n_m, n_p, n_t, size
        if cur:
            out.append(Batch.of(run_id, cur))
        cur = []
        n_m = n_p = n_t = size = 0
        tag_keys.clear()
        param_keys.clear()

    for r in records:
        t = type(r)
        rs = approx_size(r)
        if t is Metric:
            full = n_m >= MAX_METRICS_PER_BATCH
        elif t is Param:
            if r.key in param_keys:
                continue  # same key and (validated) same value: already in this batch
            full = n_p >= MAX_PARAMS_PER_BATCH
        else:
            full = n_t >= MAX_TAGS_PER_BATCH or r.key in tag_keys
        if full or n_m + n_p + n_t >= MAX_ENTITIES_PER_BATCH or size + rs > MAX_BATCH_BYTES:
            close()
        cur.append(r)
        size += rs
        if t is Metric:
            n_m += 1
        elif t is Param:
            n_p += 1
            param_keys.add(r.key)
        else:
            n_t += 1
            tag_keys.add(r.key)
    close()
    return out


def merge_metric_batches(batches: list[Batch], limit: int) -> list[Batch]:
    """Join consecutive metrics-only batches of one run into batches of up to ``limit`` metrics.

    For a sink that writes more than ``log_batch``'s 1,000 metrics in one go (the SQL fast path,
    :attr:`Sink.max_metrics_per_write`): each write is a transaction and, for a writer thread in
    the training process, a few interpreter-lock round trips that a busy loop makes cost up to
    5 ms each — fewer, larger writes keep up with the loop. Order is kept.
    """
    out: list[Batch] = []
    for b in batches:
        last = out[-1] if out else None
        if (last is not None and not b.params and not b.tags and not last.params and not last.tags
                and len(last.metrics) + len(b.metrics) <= limit):
            last.metrics.extend(b.metrics)
        else:
            out.append(Batch(b.run_id, list(b.metrics), b.params, b.tags))
    return out
