"""SqliteBroker on real files: claims, leases, fencing, capacity, the DLQ, and file errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.brokers.base import Answer, DeadLetterFilter, Delivery, Depth
from runner.brokers.sqlite.broker import SqliteBroker
from runner.errors import BrokerClosed, QueueFull
from runner.model import AttemptRecord, DeadLetter, Task

VT = 10.0  # visibility timeout under the fake clock
# Timing on the real clock: lower bounds strict, upper bounds loose, as the machine may be loaded.
#: Timeout of a get that must be handed a task, or ended by a wake: it returns when that comes.
GET_TIMEOUT_S = 30.0
#: Upper bound for what takes well under a second when the broker works: room for a loaded
#: machine, far short of the 30 s timeouts a missed wake-up would run out.
PROMPTLY_S = 5.0


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "nested" / "dir" / "queue.db")


@pytest.fixture
def make(db: str, clock: FakeClock) -> Iterator[Callable[..., SqliteBroker]]:
    opened: list[SqliteBroker] = []

    def factory(**overrides: Any) -> SqliteBroker:
        settings: dict[str, Any] = {
            "path": db,
            "capacity": 100,
            "enqueue_timeout": 0.2,
            "overflow": "block",
            "visibility_timeout": VT,
            "clock": clock,
        }
        settings.update(overrides)
        broker = SqliteBroker(**settings)
        opened.append(broker)
        return broker

    yield factory
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(make: Callable[..., SqliteBroker]) -> SqliteBroker:
    return make()


def failure(attempt: int, error: str = "RuntimeError") -> AttemptRecord:
    return AttemptRecord(attempt, error, "boom", "Traceback...", 1.0, 0.5, "host:1")


def dead_record(
    delivery: Delivery, error: str = "RuntimeError", dead_at: float = 5.0
) -> DeadLetter:
    task = delivery.task.with_failure(failure(delivery.task.attempt, error))
    return DeadLetter(task, "error", error, "boom", "tb", task.attempt, 1.0, 2.0, dead_at)


def one(broker: SqliteBroker, kind: str = "a") -> Delivery:
    got = broker.get({kind: 1}, 1, 0)
    assert len(got) == 1, got
    return got[0]


def test_put_get_ack_counts_attempts_fifo_and_slots(broker: SqliteBroker) -> None:
    broker.put_many([Task("a", i) for i in range(5)] + [Task("b", "x"), Task("c", "y")])
    got = broker.get({"a": 3, "b": 1, "c": 0}, 10, 0)
    by_type = [(d.task.type, d.task.payload) for d in got]
    assert sorted(by_type) == [("a", 0), ("a", 1), ("a", 2), ("b", "x")]
    assert [d.task.payload for d in got if d.task.type == "a"] == [0, 1, 2]
    assert all(d.task.attempt == 1 and not d.redelivered for d in got)
    assert len({d.receipt for d in got}) == 4
    assert broker.get({"a": 5}, 1, 0)[0].task.payload == 3  # limit caps the total
    assert [broker.ack(d) for d in got] == [Answer.DONE] * 4
    assert broker.ack(got[0]) is Answer.ALREADY_DONE
    assert broker.depth() == {"a": Depth(ready=1, leased=1), "c": Depth(ready=1)}


def test_a_claim_over_more_types_than_one_statement_takes_keeps_the_limit(
    make: Callable[..., SqliteBroker],
) -> None:
    """A claim asks for every type in one statement, a compound of one SELECT per type, and
    SQLite refuses a compound of more than 500: more types are asked in turns, with what the
    earlier turns left of the limit."""
    broker = make(capacity=2000)
    kinds = [f"t{i:04d}" for i in range(1200)]
    broker.put_many([Task(kind, kind) for kind in kinds])
    got = broker.get(dict.fromkeys(kinds, 1), 1050, 0)  # a turn ends inside the limit
    assert len(got) == 1050
    assert len({d.task.type for d in got}) == 1050
    rest = broker.get(dict.fromkeys(kinds, 1), 1050, 0)
    assert len(rest) == 150
    assert {d.task.type for d in got} | {d.task.type for d in rest} == set(kinds)


def test_delayed_put_waits_for_not_before(broker: SqliteBroker, clock: FakeClock) -> None:
    broker.put_many([Task("a", "later", not_before=clock.now + 5)])
    assert broker.get({"a": 1}, 1, 0) == []
    assert broker.depth()["a"] == Depth(delayed=1)
    clock.advance(5)
    assert one(broker).task.payload == "later"


def test_retry_keeps_attempt_appends_history_and_delays(
    broker: SqliteBroker, clock: FakeClock
) -> None:
    broker.put_many([Task("a", "p")])
    first = one(broker)
    assert broker.retry(first, 2.0, failure(1)) is Answer.DONE
    assert broker.retry(first, 2.0, failure(1)) is Answer.ALREADY_DONE  # the receipt is spent
    assert broker.get({"a": 1}, 1, 0) == []
    clock.advance(2.0)
    second = one(broker)
    assert second.task.attempt == 2
    assert [h.attempt for h in second.task.history] == [1]
    assert broker.retry(second, 0, failure(2))
    third = one(broker)  # no delay: ready at once
    assert third.task.attempt == 3 and len(third.task.history) == 2


def test_release_gives_back_the_attempt_and_fences(broker: SqliteBroker) -> None:
    broker.put_many([Task("a", 1), Task("a", 2)])
    first = one(broker)
    assert broker.release(first) is Answer.DONE
    again = one(broker)
    assert again.task.payload == 1  # back in its place, before task 2
    assert again.task.attempt == 1
    assert broker.ack(first) is broker.release(first) is Answer.ALREADY_DONE
    assert broker.ack(again) is Answer.DONE


def test_expired_lease_is_redelivered_and_the_stale_receipt_fenced(
    broker: SqliteBroker, clock: FakeClock
) -> None:
    broker.put_many([Task("a", "p")])
    stale = one(broker)
    clock.advance(VT - 0.01)
    assert broker.get({"a": 1}, 1, 0) == []
    clock.advance(0.02)
    fresh = one(broker)
    assert fresh.redelivered and fresh.task.attempt == 2
    assert broker.ack(stale) is Answer.FENCED
    assert broker.retry(stale, 0, failure(1)) is Answer.FENCED
    assert broker.dead(stale, dead_record(stale)) is Answer.FENCED
    assert broker.release(stale) is Answer.FENCED
    assert broker.extend([stale, fresh]) == [Answer.FENCED, Answer.DONE]
    assert broker.dead_letters(DeadLetterFilter()) == []
    assert broker.ack(fresh) is Answer.DONE
    assert broker.depth() == {}


def test_expired_but_unclaimed_lease_may_still_be_acked(
    broker: SqliteBroker, clock: FakeClock
) -> None:
    broker.put_many([Task("a", "p")])
    late = one(broker)
    clock.advance(VT * 2)
    assert broker.depth()["a"] == Depth(ready=1)
    assert broker.ack(late) is Answer.DONE
    assert broker.get({"a": 1}, 1, 0) == []


def test_extend_renews_the_lease(broker: SqliteBroker, clock: FakeClock) -> None:
    broker.put_many([Task("a", "long")])
    held = one(broker)
    for _ in range(3):  # runs for 2x the visibility timeout, renewed every VT * 2/3
        clock.advance(VT * 2 / 3)
        assert broker.extend([held]) == [Answer.DONE]
        assert broker.get({"a": 1}, 1, 0) == []
    assert broker.ack(held)


def test_dead_moves_the_task_to_the_dlq_atomically(broker: SqliteBroker) -> None:
    broker.put_many([Task("a", 1), Task("b", 2)])
    da, db_ = one(broker, "a"), one(broker, "b")
    assert broker.dead(da, dead_record(da, "ValueError", dead_at=10.0))
    assert broker.dead(db_, dead_record(db_, "TimeoutError", dead_at=20.0))
    assert broker.dead(da, dead_record(da)) is Answer.ALREADY_DONE  # a resend: already dead
    assert broker.depth() == {}
    records = broker.dead_letters(DeadLetterFilter())
    assert [r.task.payload for r in records] == [1, 2]
    assert records[0].task.history[-1].error_type == "ValueError"
    assert [r.id for r in broker.dead_letters(DeadLetterFilter(type="b"))] == [db_.task.id]
    assert [r.id for r in broker.dead_letters(DeadLetterFilter(error="ValueError"))] == [da.task.id]
    assert [r.id for r in broker.dead_letters(DeadLetterFilter(since=15.0))] == [db_.task.id]
    assert broker.dead_letters(DeadLetterFilter(ids=frozenset({"nope"}))) == []
    assert broker.dead_letter_count() == 2
    assert broker.purge(DeadLetterFilter(type="b")) == 1
    assert broker.dead_letter_count() == 1
    assert [r.id for r in broker.dead_letters(DeadLetterFilter())] == [da.task.id]


def test_replay_resets_attempts_and_keeps_history(broker: SqliteBroker) -> None:
    broker.put_many([Task("a", "p")])
    first = one(broker)
    assert broker.dead(first, dead_record(first))
    assert broker.replay([first.task.id, "unknown"]) == 1
    assert broker.dead_letters(DeadLetterFilter()) == []
    again = one(broker)
    assert again.task.attempt == 1 and len(again.task.history) == 1
    assert broker.replay([first.task.id]) == 0


def test_replay_respects_capacity(make: Callable[..., SqliteBroker]) -> None:
    broker = make(capacity=2, enqueue_timeout=0.1)
    broker.put_many([Task("a", 1)])
    victim = one(broker)
    assert broker.dead(victim, dead_record(victim))
    broker.put_many([Task("a", 2), Task("a", 3)])
    started = time.monotonic()
    with pytest.raises(QueueFull):
        broker.replay([victim.task.id])
    assert time.monotonic() - started >= 0.1
    assert len(broker.dead_letters(DeadLetterFilter())) == 1


def test_put_blocks_then_raises_queue_full_all_or_nothing(
    make: Callable[..., SqliteBroker],
) -> None:
    broker = make(capacity=3, enqueue_timeout=0.15)
    broker.put_many([Task("a", 1), Task("a", 2)])
    started = time.monotonic()
    with pytest.raises(QueueFull):
        broker.put_many([Task("a", 3), Task("a", 4)])
    assert time.monotonic() - started >= 0.15
    with pytest.raises(QueueFull):
        broker.put_many([Task("a", i) for i in range(4)], timeout=5)  # can never fit
    assert broker.depth()["a"].total == 2
    broker.put_many([Task("a", 3)], timeout=0)
    assert broker.depth()["a"].total == 3


def test_reject_overflow_fails_at_once(make: Callable[..., SqliteBroker]) -> None:
    broker = make(capacity=1, enqueue_timeout=30, overflow="reject")
    broker.put_many([Task("a", 1)])
    started = time.monotonic()
    with pytest.raises(QueueFull):
        broker.put_many([Task("a", 2)])
    assert time.monotonic() - started < PROMPTLY_S  # not after waiting out the 30 s


def test_blocked_put_proceeds_when_an_ack_frees_room(make: Callable[..., SqliteBroker]) -> None:
    broker = make(capacity=1, enqueue_timeout=10)
    broker.put_many([Task("a", 1)])
    held = one(broker)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            broker.put_many([Task("a", 2)])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    putter = threading.Thread(target=put)
    putter.start()
    assert broker.ack(held)
    putter.join(5)
    assert not putter.is_alive() and errors == []
    assert one(broker).task.payload == 2


def test_retry_and_release_never_block_at_full_capacity(
    make: Callable[..., SqliteBroker], clock: FakeClock
) -> None:
    broker = make(capacity=2, enqueue_timeout=30)
    broker.put_many([Task("a", 1), Task("a", 2)])
    first, second = broker.get({"a": 2}, 2, 0)
    started = time.monotonic()
    assert broker.retry(first, 1.0, failure(1))
    assert broker.release(second)
    assert time.monotonic() - started < PROMPTLY_S  # neither waited out the 30 s for room
    assert broker.depth()["a"].total == 2


def test_capacity_holds_across_connections(make: Callable[..., SqliteBroker]) -> None:
    left = make(capacity=3, enqueue_timeout=0)
    right = make(capacity=3, enqueue_timeout=0)
    left.put_many([Task("a", 1), Task("a", 2)])
    with pytest.raises(QueueFull):
        right.put_many([Task("a", 3), Task("a", 4)])
    right.put_many([Task("a", 3)])
    with pytest.raises(QueueFull):
        left.put_many([Task("a", 4)])
    claimed = left.get({"a": 3}, 3, 0)
    assert [d.task.payload for d in claimed] == [1, 2, 3]
    assert right.get({"a": 3}, 3, 0) == []  # leased by the other connection
    assert all(right.ack(d) for d in claimed)  # receipts are valid across connections
    right.put_many([Task("a", 5)])


def test_get_times_out_with_empty_list(broker: SqliteBroker) -> None:
    started = time.monotonic()
    assert broker.get({"a": 1}, 1, 0.2) == []
    assert time.monotonic() - started >= 0.2


def test_get_wakes_for_a_put_from_another_thread(broker: SqliteBroker) -> None:
    timer = threading.Timer(0.05, broker.put_many, args=([Task("a", "late")],))
    timer.start()
    started = time.monotonic()
    got = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    timer.join()
    assert [d.task.payload for d in got] == ["late"]
    assert time.monotonic() - started < PROMPTLY_S  # the put woke it, not the 30 s timeout


def test_get_sees_a_put_from_another_connection(make: Callable[..., SqliteBroker]) -> None:
    consumer, producer = make(clock=time.time), make(clock=time.time)
    timer = threading.Timer(0.05, producer.put_many, args=([Task("a", "remote")],))
    timer.start()
    got = consumer.get({"a": 1}, 1, GET_TIMEOUT_S)
    timer.join()
    assert [d.task.payload for d in got] == ["remote"]


def test_get_wakes_when_a_delayed_task_is_due(make: Callable[..., SqliteBroker]) -> None:
    broker = make(clock=time.time)
    started = time.monotonic()
    due = time.time() + 0.2
    broker.put_many([Task("a", "soon", not_before=due)])
    got = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    assert [d.task.payload for d in got] == ["soon"]
    assert time.time() >= due  # on the broker's clock, not a moment early
    assert time.monotonic() - started < PROMPTLY_S  # woke when due, not at the 30 s timeout


@pytest.mark.parametrize("action", ["wake", "close"])
def test_wake_and_close_end_a_blocked_get(
    broker: SqliteBroker, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Woken or closed once the get has found nothing and pauses: a get that began after close
    # would raise BrokerClosed instead.
    pausing = threading.Event()
    pause = broker._pause

    def spy(seen: int, seconds: float) -> None:
        pausing.set()
        pause(seen, seconds)

    monkeypatch.setattr(broker, "_pause", spy)
    result: list[list[Delivery]] = []
    waiter = threading.Thread(target=lambda: result.append(broker.get({"a": 1}, 1, 30)))
    waiter.start()
    assert pausing.wait(10), "the get never paused"
    getattr(broker, action)()
    waiter.join(PROMPTLY_S)
    assert not waiter.is_alive()  # the wake or close ended it, not the 30 s timeout
    assert result == [[]]


def test_a_wake_before_get_is_not_lost(broker: SqliteBroker) -> None:
    broker.wake()
    started = time.monotonic()
    assert broker.get({"a": 1}, 1, GET_TIMEOUT_S) == []
    assert time.monotonic() - started < PROMPTLY_S  # the wake ended it, not the 30 s timeout


def test_close_is_idempotent_and_later_calls_raise(broker: SqliteBroker) -> None:
    broker.put_many([Task("a", 1)])
    held = one(broker)
    broker.close()
    broker.close()
    broker.wake()
    calls: list[Callable[[], object]] = [
        lambda: broker.put_many([Task("a", 2)]),
        lambda: broker.put_many([]),
        lambda: broker.get({"a": 1}, 1, 0),
        lambda: broker.ack(held),
        lambda: broker.retry(held, 0, failure(1)),
        lambda: broker.dead(held, dead_record(held)),
        lambda: broker.release(held),
        lambda: broker.extend([]),
        broker.depth,
        lambda: broker.dead_letters(DeadLetterFilter()),
        lambda: broker.replay([held.task.id]),
        lambda: broker.purge(DeadLetterFilter()),
        broker.dead_letter_count,
    ]
    for call in calls:
        with pytest.raises(BrokerClosed):
            call()


def test_threads_sharing_one_broker_consume_each_task_once(
    make: Callable[..., SqliteBroker],
) -> None:
    broker = make(clock=time.time, capacity=1000)
    broker.put_many([Task("a" if i % 2 else "b", i) for i in range(400)])
    acked: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        while got := broker.get({"a": 3, "b": 3}, 4, 0.2):
            for delivery in got:
                assert broker.ack(delivery)
                with lock:
                    acked.append(delivery.task.payload)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(acked) == list(range(400))
    assert broker.depth() == {}
