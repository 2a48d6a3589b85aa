"""Broker contract, delivery side: slots, FIFO, delays, attempts, leases, fencing, wake, close.

Runs once per broker that ``broker_factory`` gives. Timing checks: lower bounds strict, upper
bounds loose (helpers.PROMPTLY_S: far from what they tell apart, so a loaded machine passes
them).
"""

from __future__ import annotations

import threading
import time

import pytest

from runner.brokers.base import (
    Answer,
    Broker,
    BrokerAdmin,
    DeadLetterFilter,
    Delivery,
    Depth,
    Settle,
)
from runner.errors import BrokerClosed
from runner.model import DeadReason
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    PROMPTLY_S,
    SHORT_LEASE_S,
    Background,
    dead_record,
    failure,
    get_one,
    put,
    task,
)


def test_get_honours_slots_per_type_and_reaches_them(broker: Broker) -> None:
    put(broker, *(task("a", i) for i in range(5)), *(task("b", i) for i in range(5)))
    got = broker.get({"a": 2, "b": 3}, 100, 0)
    assert sorted(d.task.type for d in got) == ["a", "a", "b", "b", "b"]


def test_get_honours_limit_and_never_exceeds_slots(broker: Broker) -> None:
    put(broker, *(task("a", i) for i in range(5)), *(task("b", i) for i in range(5)))
    got = broker.get({"a": 2, "b": 3}, 3, 0)
    assert len(got) == 3
    assert sum(d.task.type == "a" for d in got) <= 2
    assert sum(d.task.type == "b" for d in got) <= 3


def test_get_skips_types_without_free_slots(broker: Broker) -> None:
    put(broker, task("a"), task("b"))
    got = broker.get({"a": 0, "b": 1}, 10, 0)
    assert [d.task.type for d in got] == ["b"]
    assert broker.get({"b": 1}, 10, 0) == []  # and never a type that was not asked for


def test_fifo_within_a_type(broker: Broker) -> None:
    put(broker, *(task("a" if i % 2 else "b", i) for i in range(10)))
    one_by_one = [get_one(broker, "a").task.payload for _ in range(3)]
    batch = [d.task.payload for d in broker.get({"a": 10}, 10, 0)]
    assert one_by_one + batch == [1, 3, 5, 7, 9]


def test_put_with_future_not_before_is_delayed(broker: Broker) -> None:
    delay = 0.3
    start = time.time()
    put(broker, task("a", "later", not_before=start + delay), task("a", "now"))
    (now,) = broker.get({"a": 10}, 10, 0)
    assert now.task.payload == "now"
    assert broker.ack(now)
    got = broker.get({"a": 10}, 10, GET_TIMEOUT_S)
    assert [d.task.payload for d in got] == ["later"]
    waited = time.time() - start
    assert waited >= delay
    assert waited < PROMPTLY_S  # due at 0.3 s: the get woke for it, not at its 30 s timeout


def test_retry_is_neither_early_nor_left_until_the_get_times_out(broker: Broker) -> None:
    delay = 0.4
    put(broker, task("a"))
    delivery = get_one(broker)
    start = time.time()
    assert broker.retry(delivery, delay, failure(1))
    assert broker.get(ALL, 10, 0) == []
    again = get_one(broker, timeout=GET_TIMEOUT_S)
    waited = time.time() - start
    assert waited >= delay
    assert waited < PROMPTLY_S  # due at 0.4 s: the get woke for it, not at its 30 s timeout
    assert again.task.id == delivery.task.id
    assert again.task.attempt == 2
    assert not again.redelivered


def test_retry_keeps_the_failure_in_history(broker: Broker) -> None:
    put(broker, task("a"))
    assert broker.retry(get_one(broker), 0, failure(1, "KeyError"))
    again = get_one(broker, timeout=GET_TIMEOUT_S)
    assert [(h.attempt, h.error_type) for h in again.task.history] == [(1, "KeyError")]


def test_attempts_counted_at_hand_out_and_redelivered_after_lease_expiry(
    make_broker: BrokerMaker,
) -> None:
    # Short, as no lease here must hold for long: only the last one is settled, by the very
    # next call (and an expired lease moves on only when a get hands its task out again).
    vt = 0.3
    broker = make_broker(visibility_timeout=vt)
    admin = make_broker.admin(broker)
    (sent,) = put(broker, task("a"))
    before = time.time()
    first = get_one(broker)
    assert (first.task.attempt, first.redelivered) == (1, False)
    # The worker "dies": the delivery is dropped without ack.
    second = get_one(broker, timeout=GET_TIMEOUT_S)
    assert time.time() - before > vt - 0.001  # Redis times a lease in whole milliseconds
    assert (second.task.id, second.task.attempt, second.redelivered) == (sent.id, 2, True)
    third = get_one(broker, timeout=GET_TIMEOUT_S)
    assert (third.task.attempt, third.redelivered) == (3, True)
    # The engine sees attempt > max_attempts on the next one and dead-letters it.
    fourth = get_one(broker, timeout=GET_TIMEOUT_S)
    assert broker.dead(fourth, dead_record(fourth, reason=DeadReason.MAX_DELIVERIES))
    (record,) = admin.dead_letters(DeadLetterFilter())
    assert (record.id, record.reason, record.attempts) == (sent.id, DeadReason.MAX_DELIVERIES, 4)
    assert broker.get(ALL, 10, 2 * vt) == []


def test_stale_receipt_is_fenced_and_the_task_completes_once(make_broker: BrokerMaker) -> None:
    vt = SHORT_LEASE_S  # the fresh lease must hold through the checks below
    broker = make_broker(visibility_timeout=vt)
    admin = make_broker.admin(broker)
    put(broker, task("a"))
    stale = get_one(broker)
    fresh = get_one(broker, timeout=GET_TIMEOUT_S)
    assert fresh.task.id == stale.task.id and fresh.receipt != stale.receipt

    assert broker.ack(stale) is Answer.FENCED
    assert broker.retry(stale, 0, failure(1)) is Answer.FENCED
    assert broker.dead(stale, dead_record(stale)) is Answer.FENCED
    assert broker.release(stale) is Answer.FENCED
    assert broker.extend([stale]) == [Answer.FENCED]
    # ... and none of them changed anything.
    assert admin.dead_letters(DeadLetterFilter()) == []
    assert broker.depth().get("a", Depth()) == Depth(leased=1)
    assert broker.get(ALL, 10, 0) == []

    assert broker.ack(fresh) is Answer.DONE  # the new holder's lease is intact
    assert broker.get(ALL, 10, 2 * vt) == []
    assert broker.depth().get("a", Depth()).total == 0


def test_settle_many_answers_each_op_as_its_own_call_would(make_broker: BrokerMaker) -> None:
    broker = make_broker(visibility_timeout=30)  # every answer below is given well within it
    admin = make_broker.admin(broker)
    put(broker, *(task("a", i) for i in range(5)))
    d = broker.get({"a": 5}, 5, 0)
    ops = [
        Settle(d[0], "ack"),
        Settle(d[1], "retry", 30, failure(1)),
        Settle(d[2], "dead", record=dead_record(d[2])),
        Settle(d[3], "release"),
        Settle(d[0], "ack"),  # already acked earlier in this very batch
    ]
    done, again = Answer.DONE, Answer.ALREADY_DONE
    assert broker.settle_many(ops) == [done, done, done, done, again]
    assert broker.depth()["a"] == Depth(ready=1, delayed=1, leased=1)  # released, retried, d[4]
    assert [r.id for r in admin.dead_letters(DeadLetterFilter())] == [d[2].task.id]
    assert broker.settle_many([]) == []
    assert broker.settle_many([Settle(d[4], "ack"), Settle(d[1], "ack")]) == [done, again]


def test_settle_many_fences_each_ack_by_its_own_receipt(make_broker: BrokerMaker) -> None:
    broker = make_broker(visibility_timeout=30)
    put(broker, task("a", 0), task("a", 1), task("a", 2))
    d0, d1, d2 = broker.get({"a": 3}, 3, 0)
    assert broker.release(d1)
    (d1_again,) = broker.get({"a": 1}, 1, 0)  # the same task under a new receipt
    assert d1_again.task.id == d1.task.id
    ops = [
        Settle(d1, "ack"),  # its receipt was settled (released): the task is not acked
        Settle(d0, "ack"),
        Settle(d1_again, "ack"),
        Settle(d2, "ack"),
        Settle(d0, "ack"),  # already acked in this batch
    ]
    done, again = Answer.DONE, Answer.ALREADY_DONE
    assert broker.settle_many(ops) == [again, done, done, done, again]
    assert broker.depth().get("a", Depth()).total == 0


def test_exchange_is_safe_from_several_threads_at_once(broker: Broker) -> None:
    """The engine's threads fetch (and settle) through exchange concurrently: every task is
    handed out once and acked once."""
    put(broker, *(task("a", i) for i in range(60)))
    seen: list[str] = []
    answers: list[Answer] = []
    lock = threading.Lock()

    def consume() -> None:
        held: list[Delivery] = []
        while True:
            got_answers, held = broker.exchange([Settle(d, "ack") for d in held], {"a": 2}, 2)
            with lock:
                answers.extend(got_answers)
                seen.extend(d.task.id for d in held)
            if not held:
                return

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen) == len(set(seen)) == 60
    assert answers == [Answer.DONE] * 60
    assert broker.depth().get("a", Depth()).total == 0


def test_exchange_settles_then_hands_out_without_blocking(make_broker: BrokerMaker) -> None:
    broker = make_broker(visibility_timeout=30)  # every answer below is given well within it
    admin = make_broker.admin(broker)
    put(broker, *(task("a", i) for i in range(4)), task("b", "b0"))
    first, second = broker.get({"a": 2}, 2, 0)
    ops = [Settle(first, "ack"), Settle(second, "dead", record=dead_record(second))]
    answers, got = broker.exchange(ops, {"a": 1, "b": 5}, 10)
    assert answers == [Answer.DONE, Answer.DONE]
    assert sorted(str(d.task.payload) for d in got) == ["2", "b0"]  # slots per type still hold
    assert [r.id for r in admin.dead_letters(DeadLetterFilter())] == [second.task.id]
    # A resent op answers in place; nothing to hand out returns at once, not after a wait
    # (for a "c" task, which never comes: a wait would end at some timeout, or never).
    start = time.monotonic()
    answers, none = broker.exchange([Settle(first, "ack")], {"c": 1}, 1)
    assert (answers, none) == ([Answer.ALREADY_DONE], [])
    assert time.monotonic() - start < PROMPTLY_S
    # Settled before the hand-out, in the same call: a released task can be handed out again.
    (third,) = broker.get({"a": 1}, 1, 0)
    answers, again = broker.exchange([Settle(third, "release")], {"a": 1}, 1)
    assert answers == [Answer.DONE] and [d.task.id for d in again] == [third.task.id]


def test_extend_keeps_a_lease_alive_past_twice_the_visibility_timeout(
    make_broker: BrokerMaker,
) -> None:
    vt = SHORT_LEASE_S
    broker = make_broker(visibility_timeout=vt)
    put(broker, task("a"))
    held = get_one(broker)
    until = time.monotonic() + 2.5 * vt
    while time.monotonic() < until:
        assert broker.extend([held]) == [Answer.DONE]
        # Doubles as the pause between renewals: nothing may be redelivered meanwhile. A
        # renewal every tenth of a lease leaves nine tenths for a loaded machine's stalls (a
        # 0.3 s lease renewed every 0.1 s has lapsed under load).
        assert broker.get(ALL, 10, vt / 10) == []
    assert broker.ack(held) is Answer.DONE


def test_release_hands_the_task_to_another_consumer_at_once(make_broker: BrokerMaker) -> None:
    broker = make_broker(visibility_timeout=30)
    put(broker, task("a", "x"), task("a", "y"))
    prefetched = broker.get({"a": 2}, 2, 0)
    start = time.monotonic()
    assert all(broker.release(d) for d in reversed(prefetched))
    again = broker.get({"a": 2}, 2, PROMPTLY_S)
    assert time.monotonic() - start < PROMPTLY_S  # well before the 30 s lease would expire
    assert sorted(d.task.payload for d in again) == ["x", "y"]
    # The attempt was given back: this is still the first run.
    assert [d.task.attempt for d in again] == [1, 1]


def test_get_blocks_up_to_its_timeout(broker: Broker) -> None:
    start = time.monotonic()
    assert broker.get(ALL, 10, 0.3) == []
    waited = time.monotonic() - start
    assert waited >= 0.3
    assert waited < PROMPTLY_S  # ends at its timeout, not at some longer wait of its own


def test_put_ends_a_blocked_get(broker: Broker) -> None:
    call = Background(lambda: broker.get({"a": 1}, 1, GET_TIMEOUT_S))
    put(broker, task("a", "hello"))
    call.join(PROMPTLY_S)  # asserts the call ended: the put woke it, the 30 s timeout did not
    assert [d.task.payload for d in call.result] == ["hello"]


def test_wake_ends_a_blocked_get_early(broker: Broker) -> None:
    call = Background(lambda: broker.get(ALL, 10, GET_TIMEOUT_S))
    while call.alive() and time.monotonic() - call.started_at < PROMPTLY_S:
        broker.wake()  # repeated: the call may not be waiting yet the first time
        time.sleep(0.02)
    call.join(1)  # asserts the call ended: a wake did, the 30 s timeout would come much later
    assert call.error is None and call.result == []


def test_a_wake_just_before_get_still_ends_it_early(broker: Broker) -> None:
    """The engine wakes the get it is about to make when a slot frees in between."""
    broker.wake()
    t0 = time.monotonic()
    assert broker.get(ALL, 10, GET_TIMEOUT_S) == []
    assert time.monotonic() - t0 < PROMPTLY_S  # the wake ended it, not the 30 s timeout


def test_close_ends_a_blocked_get(broker: Broker) -> None:
    call = Background(lambda: broker.get(ALL, 10, GET_TIMEOUT_S))
    # Still running after 1 s of a 30 s get on an empty queue: it is waiting, not starting (a
    # get that began after close would raise BrokerClosed, which is not what this tests). Its
    # thread needs a few bytecodes to get past that check; 1 s leaves a loaded machine room.
    assert call.blocked_for(1.0)
    closed_at = time.monotonic()
    broker.close()
    call.join(PROMPTLY_S)  # asserts the call ended: close woke it, the 30 s timeout did not
    # The contract: a get waiting when close() comes returns [] (it does not raise).
    assert call.error is None and call.result == []
    assert call.ended_at is not None and call.ended_at - closed_at < PROMPTLY_S


def test_calls_after_close_raise_broker_closed(broker: Broker, admin: BrokerAdmin) -> None:
    put(broker, task("a"))
    d = get_one(broker)
    broker.close()
    broker.close()  # idempotent
    broker.wake()  # harmless
    calls = {
        "put_many": lambda: broker.put_many([task("a")]),
        "get": lambda: broker.get(ALL, 10, 0),
        "ack": lambda: broker.ack(d),
        "retry": lambda: broker.retry(d, 0, failure(1)),
        "dead": lambda: broker.dead(d, dead_record(d)),
        "release": lambda: broker.release(d),
        "extend": lambda: broker.extend([d]),
        "depth": broker.depth,
    }
    for name, call in calls.items():
        with pytest.raises(BrokerClosed):
            call()
            pytest.fail(f"{name} after close did not raise BrokerClosed")


def test_depth_counts_ready_delayed_and_leased(broker: Broker) -> None:
    put(broker, *(task("a", i) for i in range(4)), task("b"))
    first, second = broker.get({"a": 2}, 2, 0)
    assert broker.retry(first, 30, failure(1))
    assert broker.depth()["a"] == Depth(ready=2, delayed=1, leased=1)
    assert broker.depth()["b"] == Depth(ready=1)
    assert broker.ack(second)
    assert broker.depth()["a"] == Depth(ready=2, delayed=1, leased=0)


def test_a_tasks_expiry_survives_put_get_and_retry(broker: Broker) -> None:
    """The broker keeps ``expires_at`` (the engine, not the broker, acts on it)."""
    put(broker, task("a", 1, expires_at=1_900_000_000.5))
    first = get_one(broker, "a")
    assert first.task.expires_at == 1_900_000_000.5
    assert broker.retry(first, 0, failure(1))
    again = get_one(broker, "a", timeout=GET_TIMEOUT_S)
    assert (again.task.expires_at, again.task.attempt) == (1_900_000_000.5, 2)
