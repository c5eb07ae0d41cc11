"""Metrics straight into MLflow's SQL tables: one multi-row INSERT instead of one ORM object per row.

Why: profiling the ``threaded`` writer against MLflow's embedded SQLite store (py-spy, ``--gil``)
put ~94 % of its interpreter-lock time inside ``SqlAlchemyStore.log_batch`` — SQLAlchemy's ORM
builds, tracks and flushes one ``SqlMetric`` object per row (~170 µs a metric on this box), and
all of it holds the lock the training loop needs. This writer does the same work for a
metrics-only batch with SQLAlchemy Core on MLflow's own table objects: check the run is
active, insert the rows with one ``executemany``, update ``latest_metrics`` — in one
transaction, exactly as ``SqlAlchemyStore._log_metrics`` leaves the tables.

It never decides an error: whenever the batch is not plain (the run is missing or deleted, a
row is already in the store, the database refuses anything) the transaction is rolled back and
:meth:`SqlMetricWriter.write` returns ``False``, so the caller hands the batch to MLflow's own
store, which stores it or raises MLflow's own error. It is used only when the tables have the
columns it knows (checked once); ``MLFLOW_ER_SQL_FAST_PATH=0`` turns it off.

What it depends on in MLflow: ``mlflow.store.tracking.dbmodels.models`` (``SqlMetric``,
``SqlLatestMetric``, ``SqlRun`` and their ``__table__``), ``SqlAlchemyStore.engine`` and the
rules of ``_log_metrics``/``_update_latest_metrics_if_necessary`` as of MLflow 3.x: NaN stored
as ``value=0, is_nan=True``, ±inf as ±max float, a row's identity ``(key, timestamp, step,
value, is_nan)``, the latest value per key the greatest ``(step, timestamp, value)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from ..records import Metric

log = logging.getLogger(__name__)

ENV_SWITCH = "MLFLOW_ER_SQL_FAST_PATH"
_COLUMNS = {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}
_ORDER = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")  # a row tuple's fields
_KEYS_PER_QUERY = 500
# 6 bound values a row: a batch of 1,000 is one statement (6,000 values: SQLite >= 3.32 allows
# 32,766, PostgreSQL 65,535); 150 rows stay under older SQLite's 999.
_ROWS_PER_INSERT = 1000
#: Metrics one fast-path write takes (one transaction).
SQL_METRICS_PER_WRITE = 10_000
_ROWS_PER_INSERT_OLD_SQLITE = 150  # as MLflow: bounds the bound parameters of one IN (...)


class SqlMetricWriter:
    """Writes metrics-only batches into a ``SqlAlchemyStore``'s tables in one Core transaction."""

    def __init__(self, store: Any):
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun

        self.engine = store.engine
        # MLflow's own storage form of NaN/±inf (only non-finite values reach it).
        self._sanitize = store.sanitize_metric_value
        self.metrics = SqlMetric.__table__
        self.latest = SqlLatestMetric.__table__
        self.runs = SqlRun.__table__
        # SQLite has no row locks (the write lock is the whole file); elsewhere lock the rows of
        # latest_metrics this transaction compares against, as MLflow does.
        self.lock_rows = self.engine.dialect.name != "sqlite"
        # The bulk insert is one multi-row INSERT per up to _ROWS_PER_INSERT rows, with plain tuples:
        # SQLAlchemy's per-row parameter processing was 40 % of what was left after leaving the ORM,
        # and an executemany gives the interpreter lock up and takes it back once per row (pysqlite
        # around each sqlite3_step) — under a busy training loop every take-back waits up to the
        # 5 ms switch interval, so a 1,000-row batch took seconds and a window delivered nothing.
        self._insert_head = self._driver_insert(self.engine.dialect, self.metrics.name, _ORDER)
        self._insert_sql: dict[int, str] = {}
        self._rows_per_insert = _ROWS_PER_INSERT
        if self.engine.dialect.name == "sqlite":
            import sqlite3

            if sqlite3.sqlite_version_info < (3, 32):
                self._rows_per_insert = _ROWS_PER_INSERT_OLD_SQLITE
        self.written = 0
        self.handed_back = 0

    @classmethod
    def for_store(cls, store: Any) -> SqlMetricWriter | None:
        """A writer for ``store`` when it is MLflow's SQL store with the known schema, else ``None``."""
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        try:
            from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError:
            return None
        if not isinstance(store, SqlAlchemyStore) or not hasattr(store, "engine"):
            return None
        for model in (SqlMetric, SqlLatestMetric):
            # A column we do not fill (added by a newer MLflow) means our rows would differ.
            names = {c.name for c in model.__table__.columns}
            if names != _COLUMNS:
                log.debug("mlflow-er: %s has columns %s; using MLflow's own log_batch", model.__tablename__,
                          sorted(names))
                return None
        return cls(store)

    def write(self, run_id: str, metrics: Sequence[Metric]) -> bool:
        """Store ``metrics`` of one run; ``False`` (nothing written) when MLflow's own path must do it."""
        import sqlalchemy as sa

        rows, best = self._rows(run_id, metrics)
        try:
            with self.engine.begin() as conn:
                stage = conn.execute(sa.select(self.runs.c.lifecycle_stage)
                                     .where(self.runs.c.run_uuid == run_id)).scalar()
                if stage != "active":  # missing or deleted: MLflow's error, MLflow's words
                    raise _HandBack
                if self._insert_head is not None:
                    step = self._rows_per_insert
                    for i in range(0, len(rows), step):
                        chunk = rows[i:i + step]
                        conn.exec_driver_sql(self._multi_insert(len(chunk)), tuple(v for r in chunk for v in r))
                else:
                    conn.execute(self.metrics.insert(), [dict(zip(_ORDER, r, strict=True)) for r in rows])
                self._update_latest(conn, run_id, best)
        except _HandBack:
            self.handed_back += 1
            return False
        except Exception as exc:
            # A row already stored (IntegrityError), a locked database, a value the column refuses:
            # rolled back; MLflow's own store sorts it out or raises its own error.
            level = logging.DEBUG if isinstance(exc, sa.exc.SQLAlchemyError) else logging.WARNING
            log.log(level, "mlflow-er: fast metric insert handed back to MLflow's log_batch (%s: %s)",
                    type(exc).__name__, str(exc)[:200])
            self.handed_back += 1
            return False
        self.written += len(rows)
        return True

    @staticmethod
    def _driver_insert(dialect: Any, table: str, columns: Sequence[str]) -> tuple[str, str] | None:
        """``("INSERT INTO t (c, …) VALUES ", "(?, …)")`` quoted for the dialect (``key`` is reserved
        in MySQL), or ``None`` for a driver whose parameters are not positional (Core's insert then)."""
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
        if mark is None:
            return None
        quote = dialect.identifier_preparer.quote
        return (f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) VALUES ",
                f"({', '.join(mark for _ in columns)})")

    def _multi_insert(self, n: int) -> str:
        """The INSERT of ``n`` rows in one statement (cached per ``n``)."""
        sql = self._insert_sql.get(n)
        if sql is None:
            assert self._insert_head is not None
            head, row = self._insert_head
            sql = self._insert_sql[n] = head + ", ".join([row] * n)
        return sql

    def _rows(self, run_id: str, metrics: Sequence[Metric]) -> tuple[list[tuple], dict[str, tuple]]:
        """Rows without repeats (MLflow's row identity) and, per key, the batch's latest point."""
        rows: list[tuple] = []
        seen: set[tuple] = set()
        best: dict[str, tuple] = {}
        for m in metrics:
            key, value, ts, step = m.key, m.value, m.timestamp, m.step
            if value - value == 0.0:  # finite: NaN and ±inf give NaN (one test instead of two calls)
                is_nan = False
            else:
                is_nan, value = self._sanitize(float(value))
            row = (key, value, ts, step, is_nan, run_id)  # _ORDER; also the row's identity
            if row in seen:
                continue
            seen.add(row)
            rows.append(row)
            old = best.get(key)
            # Strictly newer only, as MLflow: of two equal (step, timestamp, value) the first stays.
            if old is None or (step, ts, value) > old[:3]:
                best[key] = (step, ts, value, is_nan)
        return rows, best

    def _update_latest(self, conn: Any, run_id: str, best: dict[str, tuple]) -> None:
        import sqlalchemy as sa

        t = self.latest
        keys = sorted(best)  # one lock order for every writer, as MLflow
        stored: dict[str, tuple] = {}
        for i in range(0, len(keys), _KEYS_PER_QUERY):
            q = (sa.select(t.c.key, t.c.step, t.c.timestamp, t.c.value)
                 .where(t.c.run_uuid == run_id, t.c.key.in_(keys[i:i + _KEYS_PER_QUERY]))
                 .order_by(t.c.key))
            if self.lock_rows:
                q = q.with_for_update()
            stored.update({r[0]: (r[1], r[2], r[3]) for r in conn.execute(q)})
        new = [k for k in keys if k not in stored]
        changed = [k for k in keys if k in stored and best[k][:3] > stored[k]]
        if new:
            conn.execute(t.insert(), [{"run_uuid": run_id, "key": k, "step": best[k][0], "timestamp": best[k][1],
                                       "value": best[k][2], "is_nan": best[k][3]} for k in new])
        if changed:
            stmt = (t.update().where(t.c.run_uuid == sa.bindparam("b_run"), t.c.key == sa.bindparam("b_key"))
                    .values(step=sa.bindparam("b_step"), timestamp=sa.bindparam("b_ts"),
                            value=sa.bindparam("b_value"), is_nan=sa.bindparam("b_nan")))
            conn.execute(stmt, [{"b_run": run_id, "b_key": k, "b_step": best[k][0], "b_ts": best[k][1],
                                 "b_value": best[k][2], "b_nan": best[k][3]} for k in changed])


class _HandBack(Exception):
    """Internal: leave the transaction (rolled back) and let MLflow's store take the batch."""
