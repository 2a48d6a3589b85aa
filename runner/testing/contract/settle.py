"""Broker contract, settle answers: DONE, ALREADY_DONE (a resend under a settled receipt) and
FENCED (the lease moved on), for single calls, settle_many, exchange and extend.

Runs once per broker that ``broker_factory`` gives. A broker remembers a settled receipt for at
least one visibility timeout, so the tests that expect ALREADY_DONE use a long one.
"""

from __future__ import annotations

import pytest

from runner.brokers.base import Answer, Broker, Delivery, Depth, Settle
from runner.errors import QueueFull
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    SHORT_LEASE_S,
    dead_record,
    failure,
    get_one,
    put,
    task,
)

DONE, ALREADY_DONE, FENCED = Answer.DONE, Answer.ALREADY_DONE, Answer.FENCED
KINDS = ("ack", "retry", "dead", "release")


def op(delivery: Delivery, kind: str) -> Settle:
    """``kind`` as a Settle; a retry waits 30 s, so it stays delayed for the whole test."""
    if kind == "retry":
        return Settle(delivery, "retry", 30, failure(delivery.task.attempt))
    if kind == "dead":
        return Settle(delivery, "dead", record=dead_record(delivery))
    return Settle(delivery, "ack" if kind == "ack" else "release")


def call(broker: Broker, settle: Settle) -> Answer:
    """``settle`` as its own single call."""
    d = settle.delivery
    if settle.kind == "ack":
        return broker.ack(d)
    if settle.kind == "release":
        return broker.release(d)
    if settle.kind == "retry":
        assert settle.failure is not None
        return broker.retry(d, settle.delay_s, settle.failure)
    assert settle.record is not None
    return broker.dead(d, settle.record)


@pytest.mark.parametrize("finish", KINDS)
def test_a_resent_settle_answers_already_done_and_changes_nothing(
    make_broker: BrokerMaker, finish: str
) -> None:
    """A call sent again because the reply to the first was lost: every op under the settled
    receipt (single calls, settle_many, exchange, extend) answers ALREADY_DONE and nothing moves:
    no capacity is freed twice, no attempt refunded twice, no second dead letter or retry."""
    broker = make_broker(capacity=2, overflow="reject", visibility_timeout=30)
    admin = make_broker.admin(broker)
    put(broker, task("a", "x"), task("a", "y"))
    d = get_one(broker)
    assert call(broker, op(d, finish)) is DONE
    depth, dead = broker.depth(), admin.dead_letter_count()

    assert [call(broker, op(d, kind)) for kind in KINDS] == [ALREADY_DONE] * 4
    assert broker.settle_many([op(d, kind) for kind in KINDS]) == [ALREADY_DONE] * 4
    assert broker.exchange([op(d, kind) for kind in KINDS], {"b": 1}, 1) == (
        [ALREADY_DONE] * 4,
        [],
    )
    assert broker.extend([d]) == [ALREADY_DONE]

    assert broker.depth() == depth
    assert admin.dead_letter_count() == dead
    held = 1 if finish in ("ack", "dead") else 2  # "y", and "x" unless it left the queue
    put(broker, *(task("b") for _ in range(2 - held)))  # exactly the room there was
    with pytest.raises(QueueFull):
        broker.put_many([task("b")], timeout=0)
    if finish == "release":  # the attempt was given back once, not once per resend
        again = get_one(broker)
        assert (again.task.payload, again.task.attempt) == ("x", 1)


def test_a_renewal_racing_the_settle_answers_already_done(make_broker: BrokerMaker) -> None:
    """The lease keeper renews a delivery whose ack has just gone through: not a lost lease."""
    broker = make_broker(visibility_timeout=30)
    put(broker, task("a", 0), task("a", 1))
    acked, running = broker.get({"a": 2}, 2, 0)
    assert broker.ack(acked) is DONE
    assert broker.extend([acked, running]) == [ALREADY_DONE, DONE]
    assert broker.ack(running) is DONE
    assert broker.depth().get("a", Depth()).total == 0


@pytest.mark.parametrize("via", ["single", "settle_many", "exchange"])
def test_a_settle_after_the_lease_moved_on_is_fenced_and_the_new_holder_settles(
    make_broker: BrokerMaker, via: str
) -> None:
    # The fresh lease must hold through the checks below, the stale one expire first.
    broker = make_broker(visibility_timeout=SHORT_LEASE_S)
    admin = make_broker.admin(broker)
    put(broker, task("a"))
    stale = get_one(broker)
    fresh = get_one(broker, timeout=GET_TIMEOUT_S)  # the lease expired; handed out again
    assert fresh.task.id == stale.task.id and fresh.receipt != stale.receipt

    ops = [op(stale, kind) for kind in KINDS]
    if via == "single":
        assert [call(broker, o) for o in ops] == [FENCED] * 4
    elif via == "settle_many":
        assert broker.settle_many(ops) == [FENCED] * 4  # a repeat of a fenced op stays fenced
    else:
        assert broker.exchange(ops, {"b": 1}, 1) == ([FENCED] * 4, [])
    assert broker.extend([stale]) == [FENCED]
    assert admin.dead_letter_count() == 0
    assert broker.depth().get("a", Depth()) == Depth(leased=1)

    assert broker.settle_many([Settle(fresh, "ack"), Settle(stale, "ack")]) == [DONE, FENCED]
    assert broker.depth().get("a", Depth()).total == 0
    assert broker.get(ALL, 10, 0) == []


@pytest.mark.parametrize("first", KINDS)
def test_two_ops_on_one_receipt_in_one_batch_answer_done_then_already_done(
    make_broker: BrokerMaker, first: str
) -> None:
    """The second op is not run: a release followed by an ack leaves the task queued."""
    broker = make_broker(visibility_timeout=30)
    admin = make_broker.admin(broker)
    put(broker, task("a", "x"))
    d = get_one(broker)
    second = "ack" if first != "ack" else "dead"
    assert broker.settle_many([op(d, first), op(d, second)]) == [DONE, ALREADY_DONE]
    expected = {
        "ack": Depth(),
        "dead": Depth(),
        "retry": Depth(delayed=1),
        "release": Depth(ready=1),
    }[first]
    assert broker.depth().get("a", Depth()) == expected
    assert admin.dead_letter_count() == (1 if first == "dead" else 0)


def test_exchange_answers_two_ops_on_one_receipt_as_settle_many_does(
    make_broker: BrokerMaker,
) -> None:
    broker = make_broker(visibility_timeout=30)
    admin = make_broker.admin(broker)
    put(broker, task("a", "x"), task("a", "y"))
    x, y = broker.get({"a": 2}, 2, 0)
    ops = [op(x, "release"), op(x, "ack"), op(y, "dead"), op(y, "release")]
    answers, got = broker.exchange(ops, {"a": 5}, 5)
    assert answers == [DONE, ALREADY_DONE, DONE, ALREADY_DONE]
    # Settled before the hand-out: x (released, not acked) comes back in the same call.
    assert [(g.task.payload, g.task.attempt) for g in got] == [("x", 1)]
    assert admin.dead_letter_count() == 1
    assert broker.depth()["a"] == Depth(leased=1)
