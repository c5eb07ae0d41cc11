"""The spool: a crash-safe, append-only log of records that any host can replay into MLflow.

Modules: :mod:`.format` (record encoding and the byte layout — read its docstring),
:mod:`.framing` (headers, frames, resynchronisation), :mod:`.writer` (append with group
commit), :mod:`.reader` (read back, report damage), :mod:`.files` (private folders,
crash recovery), :mod:`.context` (who wrote it), :mod:`.upload` (ship to any fsspec URL),
:mod:`.replay` (``mlflow-er sync``) with :mod:`.lease` (one sync at a time),
:mod:`.presence` (exactly once on stores that keep duplicates), :mod:`.runs` (run
mapping), :mod:`.paths` (what sync may read) and :mod:`.progress`; :mod:`.status`
(``mlflow-er status``). The ``spool`` sink (:mod:`mlflow_er.sinks.spool`) puts them together.

API for a backend that spills overflow to disk and drains it back::

    from mlflow_er.spool import SpoolWriter, SpoolReader

    writer = SpoolWriter(path, role="spill", fsync_interval=None)  # no committer fsyncs needed for spill
    writer.append(records)          # Sequence[Metric | Param | Tag | Artifact]; one write(2), raises
                                    # SpoolDiskFull / SpoolWriteError with nothing half-written
    writer.flush()                  # fsync; writer.acknowledged == writer.appended afterwards
    writer.rotate()                 # seal the current segment so a drained reader can delete it

    reader = SpoolReader(path)
    pos = None
    for record, pos in reader.records():   # in append order, from the consumed cursor on;
        ...                                 # reads the open segment up to its last whole frame
    reader.records(after=pos)              # continue later, without persisting anything
    reader.consume(pos)                    # persist the cursor; delete sealed segments fully consumed
    writer.close()                         # seal the last segment

Artifacts are encoded as they are (``local_path`` kept, absolute paths stay absolute);
an artifact with an image payload must be rendered first
(:func:`mlflow_er.backends.base.materialize`). Records come back as the same NamedTuples
with the same ``run_id``, ``timestamp`` and ``seq``.
"""

from __future__ import annotations

from .errors import SpoolDiskFull, SpoolError, SpoolUploadError, SpoolWriteError, SyncError
from .files import recover_segments
from .format import RunInfo
from .reader import Gap, Position, Segment, SpoolReader, SpoolWarning
from .writer import SpoolWriter

__all__ = [
    "Gap", "Position", "RunInfo", "Segment", "SpoolDiskFull", "SpoolError", "SpoolReader", "SpoolUploadError",
    "SpoolWarning", "SpoolWriteError", "SpoolWriter", "SyncError", "recover_segments",
]
