"""Operator operations (runner.ops.admin) without subprocesses: rates, throttling, selection and
stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from runner.brokers.base import CircuitBreaker, DeadLetterFilter, Depth, RateLimit
from runner.brokers.memory import MemoryBroker
from runner.brokers.sqlite.broker import SqliteBroker
from runner.config.load import load_config
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import NotSupported, QueueFull, UsageError
from runner.model import DeadLetter, Task
from runner.ops import admin, views
from runner.ops.admin import Stats


def _record(type_name: str = "a", error: str = "RuntimeError", dead_at: float = 0.0) -> DeadLetter:
    return DeadLetter(
        task=Task(type=type_name, payload={}),
        reason="exhausted",
        error_type=error,
        message="boom",
        traceback="",
        attempts=3,
        first_attempt_at=dead_at,
        last_attempt_at=dead_at,
        dead_at=dead_at or time.time(),
    )


def _memory_admin(records: Sequence[DeadLetter] = ()) -> MemoryBroker:
    store = MemoryDeadLetters()
    store.add_many(records)
    return MemoryBroker(
        capacity=100,
        enqueue_timeout=0.1,
        overflow="block",
        visibility_timeout=30,
        dead_letters=store,
    )


@pytest.mark.parametrize(
    ("text", "per_s"), [("10/s", 10.0), ("30/m", 0.5), (" 2.5/s ", 2.5), ("7200/h", 2.0)]
)
def test_parse_rate(text: str, per_s: float) -> None:
    assert admin.parse_rate(text) == per_s


@pytest.mark.parametrize("text", ["10", "10/d", "0/s", "-3/s", "x/s", "/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--rate"):
        admin.parse_rate(text)


def test_throttled_replay_paces_chunks_by_the_rate() -> None:
    records = [_record() for _ in range(25)]
    broker = _memory_admin(records)
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    calls: list[int] = []
    real_replay = broker.replay

    def counting(ids: Sequence[str]) -> int:
        calls.append(len(ids))
        return real_replay(ids)

    broker.replay = counting  # type: ignore[method-assign]
    moved = admin.replay(broker, [r.id for r in records], 20.0, sleep, lambda: now[0])
    assert moved == 25
    assert calls == [2] * 12 + [1]  # 20/s in about 10 chunks a second
    assert now[0] - 100.0 == pytest.approx(24 / 20)  # the last chunk starts at index 24
    assert broker.depth()["a"].ready == 25


def test_unthrottled_replay_is_one_call() -> None:
    records = [_record() for _ in range(5)]
    broker = _memory_admin(records)
    assert admin.replay(broker, [r.id for r in records]) == 5
    assert broker.dead_letter_count() == 0


def test_a_full_queue_stops_the_replay_and_says_how_far_it_got() -> None:
    records = [_record() for _ in range(3)]
    store = MemoryDeadLetters()
    store.add_many(records)
    broker = MemoryBroker(
        capacity=2,
        enqueue_timeout=0.0,
        overflow="reject",
        visibility_timeout=30,
        dead_letters=store,
    )
    with pytest.raises(QueueFull, match="replayed 2 of 3"):
        admin.replay(broker, [r.id for r in records], 10.0, lambda s: None, lambda: 0.0)
    assert broker.dead_letter_count() == 1


def test_dead_letter_filter_since_is_a_duration_back_from_now() -> None:
    where = admin.dead_letter_filter("a", "ValueError", "1h", ["x"], now=10_000.0)
    assert where == DeadLetterFilter(
        ids=frozenset({"x"}), type="a", error="ValueError", since=6400.0
    )
    with pytest.raises(UsageError, match="--since"):
        admin.dead_letter_filter(since="yesterday")


def test_find_dead_letter_by_id_or_unique_prefix() -> None:
    first, second = _record(), _record()
    broker = _memory_admin([first, second])
    assert admin.find_dead_letter(broker, first.id) == first
    assert admin.find_dead_letter(broker, second.id[-6:]) == second  # the random end
    assert admin.find_dead_letter(broker, second.id[:26]) == second
    with pytest.raises(UsageError, match="matches 2 dead letters; give more of it"):
        admin.find_dead_letter(broker, first.id[:6])  # made moments apart: the same start
    with pytest.raises(UsageError, match="no dead letter"):
        admin.find_dead_letter(broker, "zzzzzzzz")
    with pytest.raises(UsageError, match="no dead letter"):
        admin.find_dead_letter(broker, first.id[:2])  # too short to guess from


def test_select_for_replay_needs_ids_or_all_and_reports_missing_ids() -> None:
    kept = _record("a")
    broker = _memory_admin([kept, _record("b")])
    with pytest.raises(UsageError):
        admin.select_for_replay(broker, [], False, DeadLetterFilter())
    with pytest.raises(UsageError):
        admin.select_for_replay(broker, [kept.id], True, DeadLetterFilter())
    where = admin.dead_letter_filter(ids=[kept.id, "missing"])
    records, missing = admin.select_for_replay(broker, [kept.id, "missing"], False, where)
    assert records == [kept]
    assert missing == ["missing"]
    records, _ = admin.select_for_replay(broker, [], True, admin.dead_letter_filter("b"))
    assert [r.task.type for r in records] == ["b"]


def test_stats_on_a_sqlite_broker(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"broker: {{kind: sqlite, path: {tmp_path / 'q.db'}}}\n"
        "task_types:\n  email: {handler: handlers.demo:send_email}\n"
    )
    config = load_config(config_file)
    now = time.time()
    with admin.open_admin(config) as target:
        broker = target
        broker.put_many([Task(type="extra", payload={}, enqueued_at=now - 60)])  # type: ignore[attr-defined]
        result = admin.stats(config, target, now=now)
    assert result.types["email"].depth == Depth()
    assert result.types["email"].oldest_age_s is None
    assert result.types["extra"].depth == Depth(ready=1)
    assert result.oldest_age_s == pytest.approx(60)
    assert result.dead_letters == 0
    assert result.to_json()["types"]["extra"] == {
        "ready": 1,
        "delayed": 0,
        "leased": 0,
        "oldest_age_s": pytest.approx(60),
        "paused": False,
        "paused_until": None,
        "rate_limit": None,
        "circuit": None,
        "unique_keys_held": None,
    }


def _sqlite_stats(tmp_path: Path, types: str, prepare: Callable[[SqliteBroker], object]) -> Stats:
    """``dq-run stats``'s data for a SQLite pipeline of ``types`` (YAML lines under
    task_types), after ``prepare`` ran on its broker."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        f"broker: {{kind: sqlite, path: {tmp_path / 'q.db'}}}\ntask_types:\n{types}"
    )
    config = load_config(config_file)
    with admin.open_admin(config) as target:
        assert isinstance(target, SqliteBroker)
        prepare(target)
        return admin.stats(config, target)


def test_stats_show_a_rate_limited_types_bucket(tmp_path: Path) -> None:
    result = _sqlite_stats(
        tmp_path,
        "  email: {handler: handlers.demo:send_email, rate_limit: 30/m}\n",
        lambda broker: broker.set_gate("email", RateLimit(rate=0.5, burst=2)),
    )
    limit = result.to_json()["types"]["email"]["rate_limit"]
    assert (limit["rate"], limit["burst"], limit["tokens"], limit["limited_s"]) == (0.5, 2, 2, 0)
    table = views.stats_table(result)
    assert "rate limits:  email 30/m (burst 2, 2.0 tokens, held back 0ms)" in table


def test_stats_show_each_circuit(tmp_path: Path) -> None:
    result = _sqlite_stats(
        tmp_path,
        "  email: {handler: handlers.demo:send_email, circuit_breaker: {}}\n",
        lambda broker: broker.set_gate("email", CircuitBreaker(0.5, 20, 30, 60, 3)),
    )
    circuit = result.to_json()["types"]["email"]["circuit"]
    assert (circuit["state"], circuit["calls"], circuit["failures"]) == ("closed", 0, 0)
    assert "circuits:     email closed" in views.stats_table(result)


def test_stats_count_each_unique_types_held_keys(tmp_path: Path) -> None:
    result = _sqlite_stats(
        tmp_path,
        "  email: {handler: handlers.demo:send_email, unique: {key: '{payload.to}'}}\n"
        "  other: {handler: handlers.demo:send_email, unique: {key: '{payload.to}'}}\n",
        lambda broker: broker.put_unique(
            [Task("email", {}, unique_key=f"email:{n}") for n in range(3)]
        ),
    )
    assert result.to_json()["types"]["email"]["unique_keys_held"] == 3
    assert "unique keys:  email 3 held, other 0 held" in views.stats_table(result)


def test_memory_configs_refuse_publish_and_stats(tmp_path: Path) -> None:
    config_file = tmp_path / "m.yaml"
    config_file.write_text("task_types:\n  email: {handler: handlers.demo:send_email}\n")
    config = load_config(config_file)
    with pytest.raises(NotSupported, match="cannot publish"):
        admin.require_shared(config, "publish")
    with pytest.raises(NotSupported, match="cannot show stats"):
        admin.require_shared(config, "stats")
    with pytest.raises(NotSupported, match="no dead letters to read"), admin.open_admin(config):
        pass
