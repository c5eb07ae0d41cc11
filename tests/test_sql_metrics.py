"""The SQL fast path for metrics (``sinks/sql_metrics.py``) leaves MLflow's tables exactly as MLflow does.

Two stores side by side — one written through the fast path, one through MLflow's own
``SqlAlchemyStore.log_batch`` (``MLFLOW_ER_SQL_FAST_PATH=0``) — receive the same batches; the
``metrics`` and ``latest_metrics`` rows of the run must be identical, on SQLite and on a real
PostgreSQL (row locks, another dialect). The cases MLflow resolves itself (a row already in the
store, a deleted run) must be handed back to MLflow and end the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from mlflow_er.errors import SinkError
from mlflow_er.records import Batch, Metric
from mlflow_er.sinks.mlflow import MlflowSink
from mlflow_er.sinks.sql_metrics import ENV_SWITCH

INF = float("inf")
NAN = float("nan")


class Pair:
    """A fast-path sink and an MLflow-path sink on two stores of the same kind."""

    def __init__(self, fast_uri: str, ref_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fast = MlflowSink(fast_uri)
        with monkeypatch.context() as m:
            m.setenv(ENV_SWITCH, "0")
            self.ref = MlflowSink(ref_uri)
        assert self.fast._sql is not None, "the fast path must be on for MLflow's SQL store"
        assert self.ref._sql is None
        self.clients = (MlflowClient(fast_uri), MlflowClient(ref_uri))
        self.exps = tuple(c.create_experiment("sqlfast") for c in self.clients)

    def new_runs(self) -> tuple[str, str]:
        return tuple(c.create_run(e).info.run_id for c, e in zip(self.clients, self.exps, strict=True))  # type: ignore[return-value]

    def write(self, runs: tuple[str, str], points: list[tuple[str, float, int, int]]) -> None:
        for sink, run_id in zip((self.fast, self.ref), runs, strict=True):
            ms = [Metric(run_id, k, v, ts, step, i) for i, (k, v, ts, step) in enumerate(points)]
            sink.write_batch(Batch(run_id, metrics=ms))

    def tables(self, runs: tuple[str, str]) -> list[Any]:
        out = []
        for sink, run_id in zip((self.fast, self.ref), runs, strict=True):
            store = sink.client._tracking_client.store
            import sqlalchemy as sa

            with store.engine.connect() as conn:
                rows = {}
                for table in ("metrics", "latest_metrics"):
                    q = sa.text(f"SELECT key, value, timestamp, step, is_nan FROM {table} WHERE run_uuid = :r "
                                "ORDER BY key, timestamp, step, value, is_nan")
                    rows[table] = [(k, float(v), int(t), int(s), bool(n)) for k, v, t, s, n in
                                   conn.execute(q, {"r": run_id})]
            out.append(rows)
        return out

    def assert_same(self, runs: tuple[str, str]) -> None:
        fast, ref = self.tables(runs)
        assert fast == ref


@pytest.fixture
def sqlite_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pair:
    return Pair(f"sqlite:///{tmp_path}/fast.db", f"sqlite:///{tmp_path}/ref.db", monkeypatch)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    from pg import PostgresServer, require_postgres

    require_postgres()
    with PostgresServer() as server:
        yield server


SCRIPT: list[list[tuple[str, float, int, int]]] = [
    # repeats inside one batch, NaN, ±inf, two values at one (step, timestamp)
    [("loss", 1.0, 1000, 0), ("loss", 1.0, 1000, 0), ("loss", NAN, 1001, 1), ("loss", NAN, 1001, 1),
     ("acc", INF, 1000, 0), ("acc", -INF, 1000, 0), ("acc", 0.5, 1002, 2), ("acc", 0.7, 1002, 2),
     ("lr", 0.1, 1000, 5)],
    # rows already stored (MLflow's IntegrityError path) mixed with new ones
    [("loss", 1.0, 1000, 0), ("loss", 0.9, 1003, 3), ("lr", 0.1, 1000, 5)],
    # older points must not move latest_metrics; a newer one must
    [("loss", 5.0, 999, 0), ("acc", 0.8, 1004, 4), ("lr", 0.2, 1000, 5)],
    # the latest point is NaN; a new key
    [("loss", NAN, 2000, 9), ("grad", 0.0, 1000, 0), ("grad", -0.0, 1000, 0)],
    # a tie on (step, timestamp, stored value) — 0.0 then NaN (stored as 0): the first one stays latest
    [("tie", 0.0, 1000, 1), ("tie", NAN, 1000, 1)],
]


def test_sqlite_tables_match_mlflows_own_log_batch(sqlite_pair: Pair) -> None:
    runs = sqlite_pair.new_runs()
    for batch in SCRIPT:
        sqlite_pair.write(runs, batch)
        sqlite_pair.assert_same(runs)
    sql = sqlite_pair.fast._sql
    assert sql is not None and sql.written > 0, "the fast path was not used"
    assert sql.handed_back >= 1, "the batch with stored rows must go to MLflow's own path"


@pytest.mark.timeout(180)
def test_postgres_tables_match_mlflows_own_log_batch(postgres: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_uri = postgres.create_database("sqlfast_fast")  # its SQLAlchemy URL (psycopg 3)
    ref_uri = postgres.create_database("sqlfast_ref")
    pair = Pair(fast_uri, ref_uri, monkeypatch)
    assert pair.fast._sql is not None and pair.fast._sql.lock_rows
    runs = pair.new_runs()
    for batch in SCRIPT:
        pair.write(runs, batch)
        pair.assert_same(runs)
    assert pair.fast._sql.written > 0


def test_a_deleted_run_gets_mlflows_own_error(sqlite_pair: Pair) -> None:
    runs = sqlite_pair.new_runs()
    for client, run_id in zip(sqlite_pair.clients, runs, strict=True):
        client.delete_run(run_id)
    errors = []
    for sink, run_id in zip((sqlite_pair.fast, sqlite_pair.ref), runs, strict=True):
        with pytest.raises(SinkError) as info:
            sink.write_batch(Batch(run_id, metrics=[Metric(run_id, "loss", 1.0, 1000, 0, 0)]))
        errors.append((str(info.value).replace(run_id, "RUN"), info.value.transient, info.value.whole_run))
    assert errors[0] == errors[1]
    assert "active" in errors[0][0]
    assert sqlite_pair.fast._sql is not None and sqlite_pair.fast._sql.written == 0


def test_switch_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SWITCH, "off")
    assert MlflowSink(f"sqlite:///{tmp_path}/x.db")._sql is None


_points = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                             st.one_of(st.sampled_from([0.0, 1.0, -1.0, NAN, INF, -INF]),
                                       st.floats(allow_nan=True, allow_infinity=True)),
                             st.integers(1000, 1003), st.integers(-2, 3)), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(_points, min_size=1, max_size=4))
def test_fuzz_sqlite_tables_match(sqlite_pair: Pair, batches: list[list[tuple[str, float, int, int]]]) -> None:
    runs = sqlite_pair.new_runs()  # one fresh pair of runs per example, same two stores
    for batch in batches:
        sqlite_pair.write(runs, batch)
    sqlite_pair.assert_same(runs)
    assert not any(math.isnan(r[1]) for t in sqlite_pair.tables(runs) for rows in t.values() for r in rows)


def test_a_joined_batch_handed_back_goes_to_log_batch_within_its_limit(sqlite_pair: Pair,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane joins metrics-only batches up to 10,000 for the fast path; one it hands back (a row
    already stored) reaches MLflow's log_batch as batches of at most 1,000, and the tables still match."""
    runs = sqlite_pair.new_runs()
    first = [("loss", float(i), 1000 + i, i) for i in range(10)]
    sqlite_pair.write(runs, first)
    calls: list[int] = []
    real = MlflowClient.log_batch

    def log_batch(client_self: Any, run_id: str, metrics: Any = (), *args: Any, **kwargs: Any) -> Any:
        calls.append(len(metrics))
        return real(client_self, run_id, metrics, *args, **kwargs)

    joined = first + [("loss", float(i), 1000 + i, i) for i in range(10, 2500)]  # the first 10 are stored
    fast_run, ref_run = runs
    assert sqlite_pair.fast.max_metrics_per_write >= len(joined)
    ms = [Metric(fast_run, k, v, ts, step, i) for i, (k, v, ts, step) in enumerate(joined)]
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    sqlite_pair.fast.write_batch(Batch(fast_run, metrics=ms))  # as the lane hands it: one joined batch
    monkeypatch.undo()
    assert calls == [1000, 1000, 500], "handed back whole to MLflow, in log_batch's limit"
    for i in range(0, len(joined), 1000):  # the reference as its lane hands it: 1,000 at a time
        part = joined[i:i + 1000]
        sqlite_pair.ref.write_batch(Batch(ref_run, metrics=[Metric(ref_run, k, v, ts, step, j)
                                                            for j, (k, v, ts, step) in enumerate(part)]))
    sqlite_pair.assert_same(runs)
