"""Broker contract, capacity and dead letters: backpressure, all-or-nothing puts, DLQ, replay.

Runs once per broker that ``broker_factory`` gives. Timing checks: lower bounds strict, upper
bounds loose (helpers.PROMPTLY_S: far from what they tell apart, so a loaded machine passes
them).
"""

from __future__ import annotations

import time

import pytest

from runner.brokers.base import Answer, Broker, BrokerAdmin, DeadLetterFilter, Depth, Settle
from runner.errors import BrokerClosed, QueueFull
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    PROMPTLY_S,
    Background,
    dead_record,
    failure,
    get_one,
    put,
    task,
)


def test_capacity_counts_a_task_from_put_until_ack_or_dead(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=3)
    put(broker, task("a"), task("a"), task("a"))
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)
    first, second, third = broker.get({"a": 3}, 3, 0)  # leased still counts
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)
    assert broker.retry(first, 30, failure(1))  # delayed still counts
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)
    assert broker.release(second)  # ready again still counts
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)
    assert broker.ack(third)
    put(broker, task("b"))
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)
    again = get_one(broker)
    assert broker.dead(again, dead_record(again))
    put(broker, task("b"))


def test_one_settle_many_frees_exactly_what_its_acks_and_dead_letters_held(
    make_broker: BrokerMaker,
) -> None:
    broker = make_broker(capacity=5)
    put(broker, *(task("a", i) for i in range(5)))
    d = broker.get({"a": 5}, 5, 0)
    ops = [
        Settle(d[0], "ack"),
        Settle(d[1], "dead", record=dead_record(d[1])),
        Settle(d[0], "ack"),  # already done: frees nothing twice
        Settle(d[2], "retry", 30, failure(1)),
        Settle(d[3], "release"),
    ]
    done, again = Answer.DONE, Answer.ALREADY_DONE
    assert broker.settle_many(ops) == [done, done, again, done, done]
    put(broker, task("b"), task("b"))  # the two slots the ack and the dead letter freed
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)


def test_put_many_is_all_or_nothing(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=3)
    put(broker, task("a", 0), task("a", 1))
    with pytest.raises(QueueFull):
        broker.put_many([task("b"), task("b")], timeout=0)
    assert broker.depth().get("b", Depth()).total == 0
    assert broker.depth()["a"].total == 2


def test_a_batch_larger_than_capacity_fails_at_once(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=2, enqueue_timeout=30)
    start = time.monotonic()
    with pytest.raises(QueueFull):
        broker.put_many([task("a"), task("a"), task("a")])
    assert time.monotonic() - start < PROMPTLY_S  # not after waiting out the 30 s


def test_put_blocks_then_fails_with_queue_full(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=1, enqueue_timeout=0.3)
    put(broker, task("a"))
    start = time.monotonic()
    with pytest.raises(QueueFull, match=r"(?i)full"):
        broker.put_many([task("a")])
    waited = time.monotonic() - start
    assert waited >= 0.3
    assert waited < PROMPTLY_S  # gives up at its timeout, not at some longer wait of its own
    # An explicit timeout wins: against a 30 s enqueue timeout, 0.2 s is told apart loosely.
    patient = make_broker(capacity=1, enqueue_timeout=30)
    put(patient, task("a"))
    start = time.monotonic()
    with pytest.raises(QueueFull):
        patient.put_many([task("a")], timeout=0.2)
    waited = time.monotonic() - start
    assert waited >= 0.2
    assert waited < PROMPTLY_S


def test_blocked_put_proceeds_when_room_frees(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=1, enqueue_timeout=10)
    put(broker, task("a", "first"))
    call = Background(lambda: broker.put_many([task("a", "second")]))
    assert call.blocked_for(0.2), "put did not block on a full queue"
    assert broker.ack(get_one(broker))
    call.join(5)
    assert call.error is None
    assert get_one(broker).task.payload == "second"


def test_overflow_reject_fails_at_once(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=1, overflow="reject", enqueue_timeout=30)
    put(broker, task("a"))
    start = time.monotonic()
    with pytest.raises(QueueFull):
        broker.put_many([task("a")], timeout=30)
    assert time.monotonic() - start < PROMPTLY_S  # not after waiting out the 30 s


def test_retry_and_release_never_block_at_full_capacity(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=2, enqueue_timeout=30)
    put(broker, task("a"), task("a"))
    first, second = broker.get({"a": 2}, 2, 0)
    start = time.monotonic()
    assert broker.retry(first, 0, failure(1))
    assert broker.release(second)
    assert time.monotonic() - start < PROMPTLY_S  # neither waited out the 30 s for room
    assert broker.depth()["a"].total == 2
    again = broker.get({"a": 2}, 2, GET_TIMEOUT_S)
    if len(again) < 2:
        again += broker.get({"a": 2 - len(again)}, 2 - len(again), GET_TIMEOUT_S)
    assert len(again) == 2


def test_a_put_blocked_on_a_full_queue_gets_broker_closed(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=1, enqueue_timeout=30)
    put(broker, task("a"))
    call = Background(lambda: broker.put_many([task("a")]))
    assert call.blocked_for(0.2)
    broker.close()
    call.join(PROMPTLY_S)  # asserts the call ended: close ended it, not the 30 s timeout
    assert isinstance(call.error, BrokerClosed)


def test_dead_letter_keeps_every_attempts_history(make_broker: BrokerMaker) -> None:
    broker = make_broker()
    admin = make_broker.admin(broker)
    (sent,) = put(broker, task("a", {"n": 1}))
    for attempt, error in [(1, "KeyError"), (2, "OSError")]:
        d = get_one(broker, timeout=GET_TIMEOUT_S)
        assert d.task.attempt == attempt
        assert broker.retry(d, 0, failure(attempt, error))
    last = get_one(broker, timeout=GET_TIMEOUT_S)
    assert broker.dead(last, dead_record(last, "error", failure(3, "TimeoutError")))
    (record,) = admin.dead_letters(DeadLetterFilter())
    assert record.id == sent.id and record.task.payload == {"n": 1}
    assert record.attempts == 3 and record.error_type == "TimeoutError"
    assert [(h.attempt, h.error_type) for h in record.task.history] == [
        (1, "KeyError"),
        (2, "OSError"),
        (3, "TimeoutError"),
    ]
    assert all(h.traceback and h.message for h in record.task.history)
    assert broker.depth().get("a", Depth()).total == 0


def test_replay_resets_attempts(make_broker: BrokerMaker) -> None:
    broker = make_broker()
    admin = make_broker.admin(broker)
    (sent,) = put(broker, task("a"))
    assert broker.retry(get_one(broker), 0, failure(1))
    d = get_one(broker, timeout=GET_TIMEOUT_S)
    assert broker.dead(d, dead_record(d, "error", failure(2)))
    assert admin.replay([sent.id, "no-such-id"]) == 1
    assert admin.dead_letters(DeadLetterFilter()) == []
    again = get_one(broker, timeout=GET_TIMEOUT_S)
    assert (again.task.id, again.task.attempt, again.redelivered) == (sent.id, 1, False)


def test_replay_respects_capacity(make_broker: BrokerMaker) -> None:
    broker = make_broker(capacity=2, enqueue_timeout=0.2)
    admin = make_broker.admin(broker)
    (doomed,) = put(broker, task("a"))
    d = get_one(broker)
    assert broker.dead(d, dead_record(d))
    put(broker, task("b"), task("b"))
    with pytest.raises(QueueFull):
        admin.replay([doomed.id])
    assert [r.id for r in admin.dead_letters(DeadLetterFilter())] == [doomed.id]  # not lost
    assert broker.ack(get_one(broker, "b"))
    assert admin.replay([doomed.id]) == 1
    assert get_one(broker, "a").task.id == doomed.id


def test_dead_letter_filters_and_purge(broker: Broker, admin: BrokerAdmin) -> None:
    put(broker, task("a"), task("b"), task("b"))
    for d in broker.get(ALL, 10, 0):
        error = "KeyError" if d.task.type == "a" else "OSError"
        assert broker.dead(d, dead_record(d, "error", failure(1, error)))
    assert len(admin.dead_letters(DeadLetterFilter())) == 3
    assert [r.task.type for r in admin.dead_letters(DeadLetterFilter(type="a"))] == ["a"]
    assert len(admin.dead_letters(DeadLetterFilter(error="OSError"))) == 2
    assert admin.dead_letters(DeadLetterFilter(since=time.time() + 60)) == []
    assert admin.purge(DeadLetterFilter(type="b")) == 2
    assert [r.task.type for r in admin.dead_letters(DeadLetterFilter())] == ["a"]
    assert admin.purge(DeadLetterFilter()) == 1
    assert admin.dead_letters(DeadLetterFilter()) == []
