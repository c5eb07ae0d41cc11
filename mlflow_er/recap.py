"""What a run did, said once at its end (and, for a spooling run, where its data goes at its start).

The recap goes through :mod:`logging` on the logger ``mlflow_er.recap`` at level INFO. With no
logging configured and stderr a terminal it is shown anyway (a handler is installed on that
logger only then); ``MLFLOW_ER_QUIET=1`` or ``ExperimentTracker(..., quiet=True)`` silences it.
The same facts are machine-readable: :meth:`Recap.as_dict` (kept on the run handle as ``run.recap``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("mlflow_er.recap")

ENV_QUIET = "MLFLOW_ER_QUIET"
_TRUE = {"1", "true", "yes", "on"}


def quiet(flag: bool | None = None) -> bool:
    """True when the recap should not be shown: ``flag`` if given, else ``$MLFLOW_ER_QUIET``."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV_QUIET, "").strip().lower() in _TRUE


def _redact(uri: str) -> str:
    from .sinks.mlflow import _redact as redact

    return redact(uri)


def server_base(uri: str | None) -> str | None:
    """The ``http(s)://host:port[/prefix]`` of a tracking server (scheme prefixes stripped), else None."""
    if not uri:
        return None
    from .mlflow_uris import inner_uri

    inner = inner_uri(uri) or uri
    if urlsplit(inner).scheme not in ("http", "https"):
        return None
    return _redact(inner).rstrip("/")


def ui_link(uri: str | None, experiment_id: str | None, run_id: str) -> str | None:
    """The MLflow UI page of a run, when the store is a server (a database has no UI of its own)."""
    base = server_base(uri)
    if base is None or not experiment_id or not run_id:
        return None
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def sync_command(path: str, tracking_uri: str | None) -> str:
    """The exact command that replays a spool folder into MLflow (password never shown)."""
    target = _redact(tracking_uri) if tracking_uri else "URI"
    from .mlflow_uris import inner_uri

    target = inner_uri(target) or target
    quoted = f"'{path}'" if any(c.isspace() for c in path) else path
    return f"mlflow-er sync {quoted} --tracking-uri {target}"


@dataclass
class Recap:
    """The facts of one ended run. ``unsent`` records are on disk in ``kept_in`` (see ``sync``)."""

    run_id: str
    run_name: str | None = None
    status: str = "FINISHED"
    experiment_id: str | None = None
    link: str | None = None
    delivered: dict[str, int] = field(default_factory=dict)  # per sink
    dropped: int = 0
    failed: int = 0
    unsent: int = 0
    kept_in: str | None = None
    sync: str | None = None
    offline: bool = False
    resumed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The recap as plain data (for ``run.stats()["recap"]`` and tooling)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The recap as shown: a headline, then one indented line per fact."""
        name = f"{self.run_name!r} " if self.run_name else ""
        what = "resumed run" if self.resumed else "run"
        out = [f"mlflow-er: {what} {name}(id {self.run_id}) ended {self.status}"]
        if self.link:
            out.append(f"  view it at {self.link}")
        if len(self.delivered) > 1:
            sent = ", ".join(f"{n} to {sink}" for sink, n in self.delivered.items())
            sent = f"delivered {sent}"
        else:
            sent = "; ".join(f"{n} delivered to {sink}" for sink, n in self.delivered.items()) or "0 delivered"
        out.append(f"  records: {sent}; {self.dropped} dropped; {self.failed} failed")
        if self.unsent and self.kept_in:
            out.append(f"  {self.unsent} record(s) not sent are kept in {self.kept_in}")
        elif self.unsent:
            out.append(f"  {self.unsent} record(s) were not sent and could not be kept on disk")
        elif self.offline and self.kept_in:
            out.append(f"  offline: every record is in the spool {self.kept_in}")
        if self.sync:
            out.append(f"  send them to MLflow with: {self.sync}")
        return out


def build(*, run_id: str, run_name: str | None, status: str, experiment_id: str | None, tracking_uri: str | None,
          sync_uri: str | None, stats: dict[str, Any], offline: bool, spool: str | None,
          problem: Any = None, resumed: bool = False) -> Recap:
    """Assemble a :class:`Recap` from a backend's ``stats()`` and the run's end.

    ``problem`` is the :class:`~mlflow_er.errors.DeliveryError` of the run's end, if any (its
    ``unsent`` and ``kept_in`` say what is on disk); ``spool`` the durable sink's folder, if any.
    """
    lanes = stats.get("lanes") or {}
    delivered = {str(k): int(v.get("delivered", 0)) for k, v in lanes.items()} or {
        "store": int(stats.get("delivered", 0))}
    dropped = int(stats.get("dropped_total") or sum((stats.get("dropped") or {}).values()) or 0)
    failed = int(stats.get("failed", 0))
    unsent = 0
    kept_in = None
    if problem is not None:
        failed = max(failed, len(getattr(problem, "failed", ()) or ()))
        unsent = int(getattr(problem, "unsent", 0) or 0)
        kept_in = getattr(problem, "kept_in", None)
    if offline and kept_in is None:
        kept_in = spool
    sync = sync_command(kept_in, sync_uri) if kept_in and (unsent or offline) else None
    return Recap(run_id=run_id, run_name=run_name, status=status, experiment_id=experiment_id,
                 link=None if offline else ui_link(tracking_uri, experiment_id, run_id), delivered=delivered,
                 dropped=dropped, failed=failed, unsent=unsent, kept_in=kept_in, sync=sync, offline=offline,
                 resumed=resumed)


_handler: logging.Handler | None = None


def _ensure_visible() -> None:
    """Show the recap on a terminal when the program configured no logging at all."""
    global _handler
    if _handler is not None or log.hasHandlers():
        return
    stream = sys.stderr
    if stream is None or not getattr(stream, "isatty", lambda: False)():
        return
    _handler = logging.StreamHandler(stream)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    # A logging set-up made later (basicConfig) would print every recap twice otherwise.
    log.propagate = False


def show(lines: list[str], silent: bool = False) -> None:
    """Log ``lines`` as one INFO record on ``mlflow_er.recap`` (never raises, never shown when ``silent``)."""
    if silent:
        return
    try:
        _ensure_visible()
        log.info("%s", "\n".join(lines))
    except Exception:  # a recap must never turn a finished run into an error
        pass


def announce_spool(run_id: str, run_name: str | None, spool: str, sync_uri: str | None, offline: bool,
                   silent: bool = False) -> None:
    """At a run's start: where its records are spooled (and, offline, how they reach MLflow later)."""
    name = f"{run_name!r} " if run_name else ""
    if offline:
        how = f"offline: nothing is sent to a server; send it later with: {sync_command(spool, sync_uri)}"
    else:
        how = f"a durable copy; what the server does not get can be sent with: {sync_command(spool, sync_uri)}"
    show([f"mlflow-er: run {name}(id {run_id}) spools to {spool}", f"  {how}"], silent)


def scheme_run_ended(route_uri: str, run_id: str, status: str, stats: dict[str, Any], problem: Any = None,
                     experiment_id: str | None = None, run_name: str | None = None) -> Recap:
    """The recap of a run logged through a ``threaded+``/``spool+`` URI, shown unless ``$MLFLOW_ER_QUIET``.

    For :mod:`mlflow_er.mlflow_store` to call once a run's end was flushed (``stats`` is the
    route backend's ``stats()``, ``problem`` the :class:`DeliveryError` about to be raised or logged).
    """
    spool = None
    for name, lane in (stats.get("lanes") or {}).items():
        if lane.get("durable"):
            spool = lane.get("path") or name
    from .mlflow_uris import inner_uri

    facts = build(run_id=run_id, run_name=run_name, status=status, experiment_id=experiment_id,
                  tracking_uri=route_uri, sync_uri=inner_uri(route_uri), stats=stats, offline=False, spool=spool,
                  problem=problem)
    show(facts.lines(), quiet())
    return facts
