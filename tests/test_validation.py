"""Caller-side validation (DESIGN §3): every rule, at and past each limit, on a real SQLite store.

One store and one tracker serve the module (creating a SQLite store costs ~1 s of
migrations); each test opens its own run, so tests stay independent.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator

import mlflow
import numpy as np
import pytest

import mlflow_er.validation as validation
from mlflow_er import ExperimentTracker, InvalidRecord, Run

pytestmark = pytest.mark.timeout(60)

MAX_FLOAT = 1.7976931348623157e308


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExperimentTracker]:
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)
    root = tmp_path_factory.mktemp("validation")
    tracker = ExperimentTracker("validation", tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                                artifact_location=str(root / "artifacts"))
    try:
        yield tracker
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]


@pytest.fixture
def run(tracker: ExperimentTracker) -> Iterator[Run]:
    with tracker.run(run_name=f"r-{uuid.uuid4().hex[:8]}") as handle:
        yield handle


def uniq(prefix: str = "k") -> str:
    """A key no other test used, so the validated-key cache never hides a rule."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def stored(run: Run):
    run.flush(10)
    return run.data


LOGGERS = {
    "metric key": lambda run, key: run.log_metric(key, 1.0),
    "param key": lambda run, key: run.log_param(key, "v"),
    "tag key": lambda run, key: run.set_tag(key, "v"),
}


# -- keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", list(LOGGERS))
def test_key_length_250_ok_251_rejected(run: Run, field: str) -> None:
    ok = (uniq() + "x" * 250)[:250]
    LOGGERS[field](run, ok)
    too_long = (uniq() + "y" * 251)[:251]
    with pytest.raises(InvalidRecord) as info:
        LOGGERS[field](run, too_long)
    assert info.value.field == field
    assert "250" in str(info.value) and "251" in str(info.value)
    data = stored(run)
    assert ok in {**data.metrics, **data.params, **data.tags}
    assert too_long not in {**data.metrics, **data.params, **data.tags}


@pytest.mark.parametrize("field", list(LOGGERS))
def test_key_allowed_characters(run: Run, field: str) -> None:
    key = f"{uniq()}/a/b.c-d e:f_G9"
    LOGGERS[field](run, key)
    data = stored(run)
    assert key in {**data.metrics, **data.params, **data.tags}


@pytest.mark.parametrize("field", list(LOGGERS))
@pytest.mark.parametrize("bad", ["a$b", "a\nb", "ab\n", "a\tb", "a*b", "a\\b", "a,b"])
def test_key_forbidden_characters_rejected(run: Run, field: str, bad: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        LOGGERS[field](run, bad)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("field", list(LOGGERS))
@pytest.mark.parametrize("bad", ["a//b", "a/./b", "../a", "/a", "a/", "", ".", "a/../b"])
def test_key_changed_by_normpath_rejected(run: Run, field: str, bad: str) -> None:
    with pytest.raises(InvalidRecord, match="normalized relative path") as info:
        LOGGERS[field](run, bad)
    assert info.value.field == field


@pytest.mark.parametrize("bad", [None, 3, b"bytes"])
def test_key_not_a_str_rejected(run: Run, bad: object) -> None:
    with pytest.raises(InvalidRecord, match="must be a str"):
        run.log_metric(bad, 1.0)  # type: ignore[arg-type]


# -- metric values ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (3, 3.0), (-2, -2.0), (0.25, 0.25), (np.float32(0.5), 0.5), (np.float64(1.5), 1.5), (np.int64(7), 7.0),
    (np.int8(-3), -3.0), (np.array(2.5), 2.5),
])
def test_metric_real_numbers_accepted(run: Run, value: object, expected: float) -> None:
    key = uniq("m")
    run.log_metric(key, value)  # type: ignore[arg-type]
    assert stored(run).metrics[key] == expected


def test_metric_nan_kept(run: Run) -> None:
    key = uniq("nan")
    run.log_metric(key, float("nan"))
    run.log_metric(f"{key}_np", np.float64("nan"))
    data = stored(run)
    assert math.isnan(data.metrics[key])
    assert math.isnan(data.metrics[f"{key}_np"])


def test_metric_infinities_stored_as_mlflow_does(run: Run) -> None:
    # MLflow's SQL store clamps +-inf to +-max float64; mlflow-er passes them through.
    run.log_metric("pos_inf", float("inf"))
    run.log_metric("neg_inf", -math.inf)
    data = stored(run)
    assert data.metrics["pos_inf"] == MAX_FLOAT
    assert data.metrics["neg_inf"] == -MAX_FLOAT


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), "1.0", None, 1 + 2j, [1.0], np.array([1.0, 2.0])])
def test_metric_non_real_values_rejected(run: Run, bad: object) -> None:
    key = uniq("bad")
    with pytest.raises(InvalidRecord) as info:
        run.log_metric(key, bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.field == f"metric value for {key!r}"
    assert "real number" in str(info.value) and key in str(info.value)
    assert key not in stored(run).metrics


def test_metric_int_too_big_for_float64_rejected(run: Run) -> None:
    with pytest.raises(InvalidRecord, match="float64"):
        run.log_metric(uniq(), 10**400)


def test_log_metrics_validates_all_before_queueing_any(run: Run) -> None:
    good, bad = uniq("good"), uniq("bad")
    with pytest.raises(InvalidRecord, match=bad):
        run.log_metrics({good: 1.0, bad: "x"})  # type: ignore[dict-item]
    data = stored(run)
    assert good not in data.metrics and bad not in data.metrics


# -- steps and timestamps --------------------------------------------------------------------
def test_step_int64_bounds(run: Run) -> None:
    key = uniq("step")
    run.log_metric(key, 1.0, step=2**63 - 1)
    run.log_metric(key, 2.0, step=-(2**63))
    run.log_metric(key, 3.0, step=np.int64(5))  # type: ignore[arg-type]
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(InvalidRecord, match="int64") as info:
            run.log_metric(key, 9.0, step=bad)
        assert info.value.field == f"step for {key!r}"
    with pytest.raises(InvalidRecord, match="int64"):
        run.log_metrics({key: 9.0}, step=2**63)
    run.flush(10)
    history = run._client.get_metric_history(run.run_id, key)
    assert sorted(m.step for m in history) == [-(2**63), 5, 2**63 - 1]


@pytest.mark.parametrize("bad", [1.0, 2.5, True, "3", np.float64(1.0)])
def test_step_not_an_int_rejected(run: Run, bad: object) -> None:
    key = uniq("step")
    with pytest.raises(InvalidRecord, match="must be an int") as info:
        run.log_metric(key, 1.0, step=bad)  # type: ignore[arg-type]
    assert info.value.field == f"step for {key!r}"
    with pytest.raises(InvalidRecord, match="must be an int"):
        run.log_metrics({key: 1.0}, step=bad)  # type: ignore[arg-type]


def test_timestamp_zero_ok_negative_rejected(run: Run) -> None:
    key = uniq("ts")
    run.log_metric(key, 1.0, timestamp=0)
    with pytest.raises(InvalidRecord, match="out of range") as info:
        run.log_metric(key, 2.0, timestamp=-1)
    assert info.value.field == f"timestamp for {key!r}"
    for bad in (True, float("nan"), "1"):
        with pytest.raises(InvalidRecord):
            run.log_metric(key, 2.0, timestamp=bad)  # type: ignore[arg-type]
    run.flush(10)
    history = run._client.get_metric_history(run.run_id, key)
    assert [(m.value, m.timestamp) for m in history] == [(1.0, 0)]


def test_timestamp_and_sequence_stamped_at_call_time(tracker: ExperimentTracker) -> None:
    from mlflow_er.testing import capture

    with capture(tracker=tracker) as cap:
        with tracker.run(run_name=uniq("stamp")) as run:
            import time

            before = time.time_ns() // 1_000_000
            run.log_metric("a", 1.0)
            run.log_param(uniq("p"), 1)
            run.set_tag("t", "x")
            after = time.time_ns() // 1_000_000
    recs = cap.records
    assert [type(r).__name__ for r in recs] == ["Metric", "Param", "Tag"]
    assert [r.seq for r in recs] == sorted(r.seq for r in recs) and len({r.seq for r in recs}) == 3
    assert all(before <= r.timestamp <= after for r in recs)


# -- param and tag values --------------------------------------------------------------------
def test_param_value_6000_ok_6001_rejected_never_truncated(run: Run) -> None:
    ok_key, bad_key, huge_key = uniq("p"), uniq("p"), uniq("p")
    value = "v" * 6000
    run.log_param(ok_key, value)
    with pytest.raises(InvalidRecord) as info:
        run.log_param(bad_key, "w" * 6001)
    assert info.value.field == f"param value for {bad_key!r}"
    assert "6001" in str(info.value) and "6000" in str(info.value) and info.value.limit == "6000 characters"
    with pytest.raises(InvalidRecord, match="1000000 characters"):
        run.log_param(huge_key, "z" * 1_000_000)
    with pytest.raises(InvalidRecord):
        run.log_params({uniq("p"): "ok", uniq("p"): "x" * 6001})
    params = stored(run).params
    assert params[ok_key] == value  # the full 6000 characters, not truncated
    assert bad_key not in params and huge_key not in params
    assert len(params) == 1


def test_param_value_stored_as_str(run: Run) -> None:
    run.log_param("lr", 1e-3)
    run.log_params({"layers": 3, "name": None})
    assert stored(run).params == {"lr": "0.001", "layers": "3", "name": "None"}


def test_tag_value_8000_ok_8001_rejected(run: Run) -> None:
    ok_key, bad_key = uniq("t"), uniq("t")
    run.set_tag(ok_key, "v" * 8000)
    with pytest.raises(InvalidRecord) as info:
        run.set_tag(bad_key, "w" * 8001)
    assert info.value.field == f"tag value for {bad_key!r}"
    assert "8001" in str(info.value) and "8000" in str(info.value)
    with pytest.raises(InvalidRecord):
        run.set_tags({uniq("t"): "fine", bad_key: "w" * 8001})
    tags = stored(run).tags
    assert tags[ok_key] == "v" * 8000
    assert bad_key not in tags


def test_param_relogged_with_different_value_rejected(run: Run) -> None:
    run.log_param("lr", 0.1)
    run.log_param("lr", 0.1)  # same value: fine
    run.log_param("lr", "0.1")  # same string: fine
    with pytest.raises(InvalidRecord, match="already logged") as info:
        run.log_param("lr", 0.2)
    assert info.value.field == "param 'lr'"
    with pytest.raises(InvalidRecord, match="already logged"):
        run.log_params({"other": 1, "lr": 0.3})
    params = stored(run).params
    assert params["lr"] == "0.1"
    assert "other" not in params  # log_params is all or nothing


def test_param_conflict_detected_on_resumed_run(tracker: ExperimentTracker) -> None:
    name = uniq("resume")
    with tracker.run(run_name=name) as run:
        run.log_param("batch", 32)
    with tracker.run(run_name=name) as again:
        assert again.run_id == run.run_id
        again.log_param("batch", 32)
        with pytest.raises(InvalidRecord, match="already logged as '32'"):
            again.log_param("batch", 64)


def test_tag_last_write_wins(run: Run) -> None:
    run.set_tag("phase", "warmup")
    run.set_tag("phase", "train")
    run.set_tags({"phase": "eval"})
    assert stored(run).tags["phase"] == "eval"


# -- failure isolation, messages, cache ------------------------------------------------------
def test_bad_record_does_not_lose_earlier_records(run: Run) -> None:
    run.log_metric("good", 1.0, step=0)
    run.log_param("good_param", "yes")
    run.set_tag("good_tag", "yes")
    with pytest.raises(InvalidRecord):
        run.log_metric("good", "nope", step=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord):
        run.log_metric("bad key$", 1.0)
    run.log_metric("good", 2.0, step=2)
    run.flush(10)
    history = run._client.get_metric_history(run.run_id, "good")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (2, 2.0)]
    data = run.data
    assert data.params["good_param"] == "yes" and data.tags["good_tag"] == "yes"
    assert run.stats()["failed"] == 0


@pytest.mark.parametrize("call, field, limit", [
    (lambda r: r.log_metric("k" * 251, 1.0), "metric key", "250"),
    (lambda r: r.log_param("p", "x" * 6001), "param value for 'p'", "6000"),
    (lambda r: r.set_tag("t", "x" * 8001), "tag value for 't'", "8000"),
    (lambda r: r.log_metric("s", 1.0, step=2**63), "step for 's'", "int64"),
    (lambda r: r.log_metric("s", 1.0, timestamp=-5), "timestamp for 's'", "0 <="),
])
def test_error_message_names_field_and_limit(run: Run, call, field: str, limit: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        call(run)
    message = str(info.value)
    assert info.value.field == field
    assert f"invalid {field}" in message
    assert info.value.limit and limit in info.value.limit and limit in message


class CountingRegex:
    """Delegates to the real key regex, counting every use."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls = 0

    def match(self, s):
        self.calls += 1
        return self.real.match(s)

    def fullmatch(self, s):
        self.calls += 1
        return self.real.fullmatch(s)

    def search(self, s):
        self.calls += 1
        return self.real.search(s)


def test_validated_keys_are_cached(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingRegex(validation._KEY_RE)
    monkeypatch.setattr(validation, "_KEY_RE", counter)
    key, pkey, tkey = uniq("cached"), uniq("cachedp"), uniq("cachedt")
    assert key not in validation._VALID_KEYS
    run.log_metric(key, 1.0)
    assert counter.calls == 1
    assert key in validation._VALID_KEYS
    for step in range(1, 20):
        run.log_metric(key, float(step), step=step)
    run.log_metrics({key: 5.0}, step=100)
    assert counter.calls == 1  # steady state: one set lookup, no regex
    run.log_param(pkey, 1)
    run.set_tag(tkey, "a")
    run.set_tag(tkey, "b")
    assert counter.calls == 3
    # a rejected key is never cached: every attempt is checked again
    for _ in range(2):
        with pytest.raises(InvalidRecord):
            run.log_metric("not$cached", 1.0)
    assert counter.calls == 5
    assert "not$cached" not in validation._VALID_KEYS


# -- issue 10 item 19: Decimal as MLflow takes it; an .item() that raises ----------------------------
def test_metric_decimal_accepted_as_mlflow_does(run: Run) -> None:
    from decimal import Decimal

    key = uniq("dec")
    run.log_metric(key, Decimal("0.125"))  # type: ignore[arg-type]
    run.log_metrics({f"{key}_many": Decimal("-3")}, step=1)  # type: ignore[dict-item]
    data = stored(run)
    assert data.metrics[key] == 0.125 and data.metrics[f"{key}_many"] == -3.0
    with pytest.raises(InvalidRecord, match=key):
        run.log_metric(f"{key}_snan", Decimal("sNaN"))  # type: ignore[arg-type]


class _BrokenTensor:
    """Stands for a tensor whose ``.item()`` fails (e.g. a CUDA error surfacing at the sync)."""

    def item(self) -> float:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_metric_whose_item_raises_is_an_invalid_record_naming_the_key(run: Run) -> None:
    key = uniq("tensor")
    with pytest.raises(InvalidRecord) as info:
        run.log_metric(key, _BrokenTensor())  # type: ignore[arg-type]
    assert key in str(info.value) and "_BrokenTensor.item() raised RuntimeError" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(InvalidRecord, match=key):
        run.log_metrics({key: _BrokenTensor()})  # type: ignore[dict-item]
    assert key not in stored(run).metrics
