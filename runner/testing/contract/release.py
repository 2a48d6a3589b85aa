"""Broker contract, release: the task keeps its place in its type's queue, its attempt and its
redelivered flag.

The engine hands back every prefetched task before it runs one that was handed out again after
its worker died (runner/engine/books.py, ``Books.isolate``); on a busy queue a released task that
went to the back waited for the whole backlog (issue 13 item 5: a SIGKILLed worker's tasks ran again
only seconds after their lease expired), and one that lost its redelivered flag lost its
isolation too.
"""

from __future__ import annotations

from runner.brokers.base import Answer, Broker, Settle
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import GET_TIMEOUT_S, SHORT_LEASE_S, get_one, put, task


def test_released_tasks_come_back_before_tasks_not_handed_out_yet(broker: Broker) -> None:
    put(broker, task("a", 0), task("a", 1), task("a", 2))
    held = broker.get({"a": 2}, 2, 0)
    assert [d.task.payload for d in held] == [0, 1]
    assert all(broker.release(d) for d in held)
    put(broker, task("a", 3))
    again = [d.task.payload for d in broker.get({"a": 10}, 10, 0)]
    assert again == [0, 1, 2, 3]


def test_tasks_released_together_keep_their_order(broker: Broker) -> None:
    # What Books.isolate hands back is a batch of tasks fetched in order: a broker that put each
    # at the very front would run them last-first.
    put(broker, *(task("a", i) for i in range(5)))
    held = broker.get({"a": 3}, 3, 0)
    assert broker.settle_many([Settle(d, "release") for d in held]) == [Answer.DONE] * 3
    assert [d.task.payload for d in broker.get({"a": 10}, 10, 0)] == [0, 1, 2, 3, 4]


def test_a_released_redelivery_keeps_its_place_attempt_and_flag(make_broker: BrokerMaker) -> None:
    broker = make_broker(visibility_timeout=SHORT_LEASE_S)  # the new leases hold to the end
    put(broker, task("a", "orphan"))
    get_one(broker)  # its worker "dies": never settled
    redelivered = get_one(broker, timeout=GET_TIMEOUT_S)
    assert (redelivered.task.payload, redelivered.redelivered) == ("orphan", True)
    assert redelivered.task.attempt == 2
    put(broker, task("a", "newer"))
    assert broker.release(redelivered)
    first, second = broker.get({"a": 2}, 2, 0)
    assert (first.task.payload, first.redelivered, first.task.attempt) == ("orphan", True, 2)
    assert (second.task.payload, second.redelivered, second.task.attempt) == ("newer", False, 1)
    assert broker.ack(first)
    assert broker.ack(second)
