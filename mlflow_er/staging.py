"""Artifacts on their way to the sinks: rendered and verified once, discarded once every sink has them.

A log call snapshots a file (or copies an image/dict/text payload) in the caller. The
:class:`ArtifactStage` is the one place that turns that into an uploadable file — rendering a
payload, checking a hard-linked snapshot was not rewritten — for however many lanes upload
it, and removes the snapshot when the last of them is done.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import artifacts
from .records import Artifact


def _key(art: Artifact) -> tuple[str, int]:
    return art.run_id, art.seq


class ArtifactStage:
    """Reference-counted, render-once staging of artifacts shared by a pipeline's lanes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[tuple[str, int], int] = {}
        self._ready: dict[tuple[str, int], Artifact | BaseException] = {}
        self._renders: dict[tuple[str, int], threading.Lock] = {}

    def register(self, art: Artifact, users: int) -> None:
        """``users`` lanes will upload ``art``; with none, its snapshot is discarded now."""
        if users <= 0:
            _discard(art)
            return
        with self._lock:
            self._refs[_key(art)] = users
            self._renders[_key(art)] = threading.Lock()

    def acquire(self, art: Artifact) -> Artifact:
        """The uploadable form of ``art`` (rendered/verified by the first lane to ask); raises if that failed."""
        key = _key(art)
        with self._lock:
            lock = self._renders.get(key)
        if lock is None:  # not registered (a lane used on its own): render for this caller only
            return materialize(art)
        with lock:
            ready = self._ready.get(key)
            if ready is None:
                try:
                    ready = materialize(art)
                except Exception as exc:
                    ready = exc
                self._ready[key] = ready
        if isinstance(ready, BaseException):
            raise ready
        return ready

    def release(self, art: Artifact) -> None:
        """One lane is done with ``art``; the last one removes its snapshot and rendering."""
        key = _key(art)
        with self._lock:
            left = self._refs.get(key)
            if left is None:
                return
            if left > 1:
                self._refs[key] = left - 1
                return
            del self._refs[key]
            self._renders.pop(key, None)
            ready = self._ready.pop(key, None)
        if isinstance(ready, Artifact) and ready is not art:
            _discard(ready)
        _discard(art)

    def pending(self) -> int:
        """Artifacts some lane still has to upload."""
        return len(self._refs)

    def discard_all(self) -> None:
        """Remove every staged snapshot (the pipeline gave up on them)."""
        with self._lock:
            keys = list(self._refs)
            readies = [self._ready.pop(k, None) for k in keys]
            self._refs.clear()
            self._renders.clear()
        for r in readies:
            if isinstance(r, Artifact):
                _discard(r)


def materialize(artifact: Artifact) -> Artifact:
    """Make an artifact ready to upload: render a payload into a file, check a linked snapshot."""
    if artifact.payload is None:
        if artifact.fingerprint and artifact.local_path:
            artifacts.verify(artifact.local_path, artifact.is_dir, artifact.fingerprint)
        return artifact
    kind, content = artifact.payload
    path = artifacts.render(kind, content, artifact.name or "artifact")
    return artifact._replace(local_path=path, payload=None, owned=True, size=os.path.getsize(path))


def _discard(art: Any) -> None:
    if art.owned and art.local_path:
        artifacts.discard(art.local_path)
