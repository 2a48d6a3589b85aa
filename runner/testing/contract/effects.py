"""Broker contract, settle effects: tasks to put and keys to set or delete ride on a settle op and
take effect in the same step, only when the settle answers DONE (never when FENCED, never twice
when a resend answers ALREADY_DONE); puts overshoot capacity rather than fail; ttls run on the
broker's clock.

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
``settle_effects``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from runner.brokers.base import Answer, Broker, Delivery, Depth, Effects, Settle, SetValue
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


def _effective(make_broker: BrokerMaker, **settings: object) -> Broker:
    broker = make_broker(**settings)
    if not broker.settle_effects:
        pytest.skip(f"{type(broker).__name__} declares settle_effects = False")
    return broker


def _op(delivery: Delivery, kind: str, effects: Effects) -> Settle:
    if kind == "retry":
        return Settle(delivery, "retry", 30, failure(delivery.task.attempt), effects=effects)
    if kind == "dead":
        return Settle(delivery, "dead", record=dead_record(delivery), effects=effects)
    return Settle(delivery, "ack" if kind == "ack" else "release", effects=effects)


@pytest.mark.parametrize("kind", KINDS)
def test_effects_apply_with_a_settle_that_is_done(make_broker: BrokerMaker, kind: str) -> None:
    broker = _effective(make_broker)
    put(broker, task("a", 0))
    delivery = get_one(broker, "a")
    effects = Effects(
        puts=(task("b", 1), task("c", 2)),
        sets=(SetValue("result:one", '{"ok": true}'), SetValue("gone", "x")),
        deletes=("gone", "never-set"),
    )

    assert broker.settle_many([_op(delivery, kind, effects)]) == [DONE]
    got = broker.get(ALL, 10, GET_TIMEOUT_S)
    handed = sorted((d.task.type, d.task.payload, d.task.attempt) for d in got)
    released = [("a", 0, 1)] if kind == "release" else []  # ready again, its attempt given back
    assert handed == [*released, ("b", 1, 1), ("c", 2, 1)]
    # A key set and deleted by the same settle: the deletes come after the sets.
    assert broker.read_values(["result:one", "gone", "never-set"]) == {"result:one": '{"ok": true}'}


def test_a_fenced_settle_applies_none_of_its_effects(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker, visibility_timeout=SHORT_LEASE_S)
    put(broker, task("a", 0))
    stale = get_one(broker, "a")
    fresh = get_one(broker, "a", timeout=GET_TIMEOUT_S)  # the stale lease expired; redelivered
    assert fresh.redelivered

    effects = Effects(puts=(task("b", 1),), sets=(SetValue("k", "v"),), deletes=("kept",))
    broker.settle_many([Settle(fresh, "release", effects=Effects(sets=(SetValue("kept", "1"),)))])
    assert broker.read_values(["kept"]) == {"kept": "1"}
    answers = broker.settle_many([Settle(stale, "ack", effects=effects)])
    assert answers == [FENCED]
    assert broker.read_values(["k", "kept"]) == {"kept": "1"}
    assert "b" not in broker.depth() or broker.depth()["b"] == Depth()


def test_a_resent_settle_does_not_apply_its_effects_twice(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    put(broker, task("a", 0))
    delivery = get_one(broker, "a")
    effects = Effects(puts=(task("b", 1),), sets=(SetValue("k", "first"),))
    assert broker.settle_many([Settle(delivery, "ack", effects=effects)]) == [DONE]

    again = Effects(puts=(task("b", 1),), sets=(SetValue("k", "second"),))
    assert broker.settle_many([Settle(delivery, "ack", effects=again)]) == [ALREADY_DONE]
    assert broker.depth()["b"] == Depth(ready=1)
    assert broker.read_values(["k"]) == {"k": "first"}


def test_effects_ride_on_exchange_and_apply_per_op(make_broker: BrokerMaker) -> None:
    """In one settle_many / exchange, each op's effects follow that op's own answer."""
    broker = _effective(make_broker, visibility_timeout=SHORT_LEASE_S)
    put(broker, task("a", 0), task("a", 1))
    first = get_one(broker, "a")
    assert broker.extend([first]) == [DONE]
    second = get_one(broker, "a")
    # Let the second's lease lapse while the first's is renewed, so the second is fenced.
    deadline = time.monotonic() + GET_TIMEOUT_S
    while True:
        assert broker.extend([first]) == [DONE]
        again = broker.get({"a": 1}, 1, 0.1)
        if again:
            break
        assert time.monotonic() < deadline, "the unrenewed lease never expired"
    ops = [
        Settle(first, "ack", effects=Effects(sets=(SetValue("from-first", "1"),))),
        Settle(second, "ack", effects=Effects(sets=(SetValue("from-second", "1"),))),
    ]
    answers, handed = broker.exchange(ops, {"a": 1, "b": 1}, 2)  # its own script, not settle_many
    assert answers == [DONE, FENCED]
    assert handed == []  # the one task left is out (``again``)
    assert broker.read_values(["from-first", "from-second"]) == {"from-first": "1"}


def test_effect_puts_overshoot_capacity_and_count_from_then_on(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker, capacity=1, overflow="reject")
    put(broker, task("a", 0))
    delivery = get_one(broker, "a")
    fanout = Effects(puts=tuple(task("b", i) for i in range(3)))
    assert broker.settle_many([Settle(delivery, "ack", effects=fanout)]) == [DONE]
    assert broker.depth()["b"] == Depth(ready=3)
    with pytest.raises(QueueFull):
        put(broker, task("a", 9))  # three held, capacity one: full until they are done
    for d in broker.get({"b": 3}, 3, GET_TIMEOUT_S):
        assert broker.ack(d) == DONE
    put(broker, task("a", 10))


def test_an_effect_put_in_the_future_is_delayed(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    put(broker, task("a", 0))
    delivery = get_one(broker, "a")
    later = task("b", 1, not_before=broker.now() + 30)
    assert broker.settle_many([Settle(delivery, "ack", effects=Effects(puts=(later,)))]) == [DONE]
    assert broker.depth()["b"] == Depth(delayed=1)


def test_a_set_with_a_ttl_reads_as_absent_after_it(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    put(broker, task("a", 0))
    delivery = get_one(broker, "a")
    effects = Effects(sets=(SetValue("short", "s", ttl_s=0.5), SetValue("long", "l", ttl_s=60)))
    set_at = broker.now()
    assert broker.settle_many([Settle(delivery, "ack", effects=effects)]) == [DONE]
    assert broker.read_values(["short", "long"]) == {"short": "s", "long": "l"}

    deadline = time.monotonic() + GET_TIMEOUT_S
    while "short" in broker.read_values(["short"]):
        assert time.monotonic() < deadline, "a 0.5 s ttl never ran out"
        time.sleep(0.05)
    assert broker.now() >= set_at + 0.5 - 0.01  # not before its time, on the broker's clock
    assert broker.read_values(["short", "long"]) == {"long": "l"}


def test_an_ack_may_put_its_own_task_back(make_broker: BrokerMaker) -> None:
    """The ack removes the task and its effect puts it again, under its own id, in one step
    (how ``Retry(count=False)`` hands an attempt back): handed out again with the attempt
    number the put names plus one, and held once in the capacity count."""
    broker = _effective(make_broker, capacity=1, overflow="reject")
    first = put(broker, task("a", 0))[0]
    delivery = get_one(broker, "a")
    again = replace(delivery.task, attempt=delivery.task.attempt - 1)
    assert broker.settle_many([Settle(delivery, "ack", effects=Effects(puts=(again,)))]) == [DONE]
    assert broker.depth()["a"] == Depth(ready=1)
    second = get_one(broker, "a", timeout=GET_TIMEOUT_S)
    assert (second.task.id, second.task.attempt, second.redelivered) == (first.id, 1, False)
    assert broker.ack(second) == DONE
    assert broker.ack(delivery) == ALREADY_DONE  # the first receipt stays settled
    put(broker, task("a", 1))  # nothing else held: the one place is free again
