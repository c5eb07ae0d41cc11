"""The sync lease: one ``mlflow-er sync`` at a time per spool and tracking server, on any fsspec URL.

A lease is a small JSON object (``sync/<target>/lease.json``) that only one process can
create: created *create-only* — locally a hard link of a fully written temp file
(``link(2)`` fails if the name exists), on S3 a conditional PUT (``If-None-Match: *``,
s3fs ``mode="create"``; S3 answers 412 to the loser), elsewhere fsspec's
``pipe_file(mode="create")`` (atomic on ``memory://``; a check-then-write on stores that
offer nothing better). It names its holder (host, pid, start time) and carries a
renewal counter that a thread of the holder bumps every ``ttl / 4`` seconds.

A dead holder's lease expires: on the same host at once (its pid is gone), anywhere
after the contender has watched its counter stand still for ``ttl`` seconds on its own
clock (so clock skew between hosts never matters). Exactly one contender may break a
stale lease: it must first create, create-only, a marker named after that lease's
holder and counter. A holder that cannot renew for ``ttl / 2`` counts its lease as lost
and the sync stops at the next chunk (:meth:`Lease.check`), before a contender could
take over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .errors import SyncError
from .reader import is_local

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0


class LeaseBusy(SyncError):
    """Another sync holds the lease; ``holder`` is what its lease says (host, pid, since...)."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def create_only(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it."""
    if is_local(fs):
        from .upload import write_private_temp

        tmp = write_private_temp(path, data)  # fully written before it has the lease's name
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists: readers never see half a lease
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs: PUT If-None-Match: * (412 -> FileExistsError)
        return True
    except FileExistsError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class Lease:
    """A create-only lease at ``path`` on ``fs``; use as a context manager around the work it guards.

    ``wait``: seconds to wait for a busy lease before raising :class:`LeaseBusy`.
    ``ttl``: how long a holder may go without renewing before a contender breaks its lease.
    ``what`` names the guarded work in messages.
    """

    def __init__(self, fs: Any, path: str, *, ttl: float = DEFAULT_TTL, wait: float = 0.0, what: str = "this spool"):
        self.fs, self.path, self.ttl, self.wait, self.what = fs, path, max(0.5, ttl), max(0.0, wait), what
        self.me = {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ttl": self.ttl, "renewal": 0}
        self._lost: str | None = None
        self._renewed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[Any, Any] | None = None
        self._seen_at = 0.0

    # -- reading ---------------------------------------------------------------------------
    def read(self) -> dict[str, Any] | None:
        """The current lease's content, or ``None`` if there is none (or it vanished meanwhile)."""
        try:
            self.fs.invalidate_cache()
            value = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"holder": "?", "renewal": "unreadable"}
        return value if isinstance(value, dict) else {"holder": "?", "renewal": "unreadable"}

    def _stale(self, cur: dict[str, Any]) -> bool:
        if cur.get("host") == self.me["host"] and isinstance(cur.get("pid"), int) and not _alive(cur["pid"]):
            return True
        key = (cur.get("holder"), cur.get("renewal"))
        now = time.monotonic()
        if key != self._seen:
            self._seen, self._seen_at = key, now
            return False
        ttl = float(cur.get("ttl") or self.ttl) if isinstance(cur.get("ttl"), (int, float)) else self.ttl
        return now - self._seen_at >= ttl

    def _break(self, cur: dict[str, Any]) -> None:
        marker = f"{self.path}.break-{cur.get('holder')}-{cur.get('renewal')}"
        if not create_only(self.fs, marker, json.dumps(self.me).encode()):
            return  # another contender is breaking it
        try:
            again = self.read()
            if again is not None and (again.get("holder"), again.get("renewal")) == \
                    (cur.get("holder"), cur.get("renewal")):
                self.fs.rm(self.path)
                log.warning("mlflow-er sync: broke the stale lease of %s (pid %s, since %s)", cur.get("host"),
                            cur.get("pid"), cur.get("since"))
        finally:
            try:
                self.fs.rm(marker)
            except FileNotFoundError:
                pass

    def busy_message(self, cur: dict[str, Any]) -> str:
        """What to tell a user whose sync found the lease held by ``cur``."""
        ttl = float(cur["ttl"]) if isinstance(cur.get("ttl"), (int, float)) else self.ttl
        return (f"another mlflow-er sync is already syncing {self.what}: host {cur.get('host', '?')}, pid "
                f"{cur.get('pid', '?')}, since {cur.get('since', '?')} (lease {self.path}). Wait for it to finish, "
                f"or run again with --wait SECONDS. If that process is gone, its lease is taken over at once on "
                f"the same host, and from another host by a sync that waits longer than the lease's "
                f"{ttl:.0f}s without seeing it renewed (--wait {ttl + 10:.0f})")

    # -- holding ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, waiting up to ``wait`` seconds; raise :class:`LeaseBusy` if it stays held."""
        deadline = time.monotonic() + self.wait
        while True:
            if create_only(self.fs, self.path, json.dumps(self.me).encode()):
                self._renewed = time.monotonic()
                self._thread = threading.Thread(target=self._renew_loop, name="mlflow-er-sync-lease", daemon=True)
                self._thread.start()
                return
            cur = self.read()
            if cur is None:
                continue  # released meanwhile
            if self._stale(cur):
                self._break(cur)
                continue
            if time.monotonic() >= deadline:
                raise LeaseBusy(self.busy_message(cur), cur)
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            if time.monotonic() - self._renewed > self.ttl / 2:
                self._lost = f"could not renew the sync lease {self.path} for {self.ttl / 2:.0f}s"
                return
            try:
                cur = self.read()
                if cur is None or cur.get("holder") != self.me["holder"]:
                    self._lost = f"the sync lease {self.path} was taken over by {cur}"
                    return
                self.me["renewal"] = int(str(self.me["renewal"])) + 1
                data = json.dumps(self.me).encode()
                if is_local(self.fs):
                    from .upload import write_atomic

                    write_atomic(self.fs, self.path, data)
                else:
                    self.fs.pipe_file(self.path, data)
                self._renewed = time.monotonic()
            except Exception as exc:  # retried on the next tick; lost only after ttl / 2
                log.debug("mlflow-er sync: lease renewal failed: %s", exc)

    def check(self) -> None:
        """Raise :class:`SyncError` if the lease was lost (the caller must stop writing)."""
        if self._lost is not None or (self._thread is not None and
                                      time.monotonic() - self._renewed > self.ttl / 2 + self.ttl / 4):
            raise SyncError(f"sync stopped: {self._lost or 'the sync lease was not renewed in time'} "
                            f"(progress saved; run it again)")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        cur = self.read()
        if cur is not None and cur.get("holder") == self.me["holder"]:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
