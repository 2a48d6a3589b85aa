"""Broker contract, unique tasks: ``put_unique`` puts a task only when its unique key is free,
holds the key (``unique:<key>`` -> the task's id) in the same step, and answers the holder's id
for a task whose key is held; the key stays held until a settle's effect sets its ttl or
deletes it.

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
``settle_effects``.
"""

from __future__ import annotations

import threading
import time

import pytest

from runner.brokers.base import Answer, Broker, Depth, Effects, Settle, SetValue
from runner.errors import QueueFull
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import GET_TIMEOUT_S, failure, get_one, put, task


def _unique(make_broker: BrokerMaker, **settings: object) -> Broker:
    broker = make_broker(**settings)
    if not broker.settle_effects:
        pytest.skip(f"{type(broker).__name__} declares settle_effects = False")
    return broker


def test_a_task_whose_key_is_held_is_not_put_and_answers_the_holder(
    make_broker: BrokerMaker,
) -> None:
    broker = _unique(make_broker)
    first = task("a", 1, unique_key="a:user-7")
    assert broker.put_unique([first]) == [first.id]
    assert broker.read_values(["unique:a:user-7"]) == {"unique:a:user-7": first.id}

    again = task("a", 2, unique_key="a:user-7")
    other = task("a", 3, unique_key="a:user-8")
    plain = task("a", 4)
    assert broker.put_unique([again, other, plain]) == [first.id, other.id, plain.id]
    assert broker.depth()["a"] == Depth(ready=3)
    got = broker.get({"a": 10}, 10, GET_TIMEOUT_S)
    assert sorted(d.task.payload for d in got) == [1, 3, 4]
    assert {d.task.payload: d.task.unique_key for d in got}[1] == "a:user-7"  # kept when stored


def test_two_tasks_of_one_call_with_one_key_put_the_first(make_broker: BrokerMaker) -> None:
    broker = _unique(make_broker)
    first, second = task("a", 1, unique_key="a:k"), task("a", 2, unique_key="a:k")
    assert broker.put_unique([first, second]) == [first.id, first.id]
    assert broker.depth()["a"] == Depth(ready=1)


def test_the_key_is_held_through_retries_until_a_settle_lets_it_go(
    make_broker: BrokerMaker,
) -> None:
    broker = _unique(make_broker)
    first = task("a", 1, unique_key="a:k")
    broker.put_unique([first])
    delivery = get_one(broker, "a")
    assert broker.retry(delivery, 0, failure(1))
    assert broker.put_unique([task("a", 2, unique_key="a:k")]) == [first.id]  # a retry keeps it
    delivery = get_one(broker, "a", timeout=GET_TIMEOUT_S)
    # The engine's ack sets the key's ttl: held for that long after the task is done.
    done = Effects(sets=(SetValue("unique:a:k", first.id, ttl_s=0.3),))
    assert broker.settle_many([Settle(delivery, "ack", effects=done)])
    assert broker.put_unique([task("a", 3, unique_key="a:k")]) == [first.id]
    deadline = time.monotonic() + GET_TIMEOUT_S
    later = task("a", 4, unique_key="a:k")
    while broker.put_unique([later]) != [later.id]:
        assert time.monotonic() < deadline, "a 0.3 s ttl never ran out"
        time.sleep(0.05)
    assert broker.depth()["a"] == Depth(ready=1)


def test_a_full_broker_puts_nothing_and_holds_no_key(make_broker: BrokerMaker) -> None:
    broker = _unique(make_broker, capacity=2, overflow="reject")
    put(broker, task("b", 0), task("b", 1))
    with pytest.raises(QueueFull):
        broker.put_unique([task("a", 1, unique_key="a:k")])
    assert broker.read_values(["unique:a:k"]) == {}
    assert broker.ack(get_one(broker, "b"))
    fresh = task("a", 2, unique_key="a:k")
    assert broker.put_unique([fresh]) == [fresh.id]


def test_a_full_broker_still_answers_a_held_keys_holder(make_broker: BrokerMaker) -> None:
    # A duplicate puts nothing, so it needs no room: even a broker full, or over its capacity
    # (retries and hand-offs may overshoot it), answers the holder at once.
    broker = _unique(make_broker, capacity=2, overflow="reject")
    first = task("a", 1, unique_key="a:k")
    assert broker.put_unique([first]) == [first.id]
    put(broker, task("b", 0))
    assert broker.settle_many(
        [Settle(get_one(broker, "b"), "ack", effects=Effects(puts=(task("b", 1), task("b", 2))))]
    ) == [Answer.DONE]  # three held now, of two
    assert broker.put_unique([task("a", 2, unique_key="a:k")], timeout=0) == [first.id]
    assert broker.put_unique([], timeout=0) == []
    broker.put_many([], timeout=0)
    with pytest.raises(QueueFull):
        broker.put_unique([task("a", 3, unique_key="a:other")], timeout=0)


def test_concurrent_publishers_of_one_key_put_one_task(make_broker: BrokerMaker) -> None:
    broker = _unique(make_broker)
    start = threading.Barrier(8)
    answers: list[str] = []

    def publish(n: int) -> None:
        start.wait()
        answers.extend(broker.put_unique([task("a", n, unique_key="a:once")]))

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GET_TIMEOUT_S)
    assert len(answers) == 8 and len(set(answers)) == 1
    assert broker.depth()["a"] == Depth(ready=1)
    assert get_one(broker, "a").task.id == answers[0]
