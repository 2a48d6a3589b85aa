"""Broker contract, ``oldest_enqueued_at`` (for ``dq-run stats``): ready, delayed and leased
tasks all count; acked and dead-lettered ones do not; the first publish time survives retries.

Runs once per broker that ``broker_factory`` gives.
"""

from __future__ import annotations

import time

import pytest

from runner.brokers.base import Broker, BrokerAdmin
from runner.model import Task
from runner.testing.contract.helpers import dead_record, failure, get_one, put


def task(type_: str, payload: int, enqueued_at: float, not_before: float = 0.0) -> Task:
    return Task(type=type_, payload=payload, enqueued_at=enqueued_at, not_before=not_before)


def test_empty_broker_has_no_oldest_task(admin: BrokerAdmin) -> None:
    assert admin.oldest_enqueued_at() == {}


def test_oldest_counts_ready_delayed_and_leased_tasks(broker: Broker, admin: BrokerAdmin) -> None:
    now = time.time()
    put(
        broker,
        task("a", 1, enqueued_at=now - 30),  # will be leased
        task("a", 2, enqueued_at=now - 10),
        task("b", 3, enqueued_at=now - 50, not_before=now + 60),  # delayed
        task("c", 4, enqueued_at=now - 5),
    )
    leased = get_one(broker, "a")
    assert leased.task.payload == 1
    oldest = admin.oldest_enqueued_at()
    assert oldest == {
        "a": pytest.approx(now - 30),
        "b": pytest.approx(now - 50),
        "c": pytest.approx(now - 5),
    }


def test_retry_keeps_the_first_publish_time_and_ack_forgets_it(
    broker: Broker, admin: BrokerAdmin
) -> None:
    now = time.time()
    put(broker, task("a", 1, enqueued_at=now - 40), task("b", 2, enqueued_at=now - 20))
    first = get_one(broker, "a")
    assert broker.retry(first, 60, failure(1))
    assert admin.oldest_enqueued_at()["a"] == pytest.approx(now - 40)
    other = get_one(broker, "b")
    assert broker.dead(other, dead_record(other))
    assert "b" not in admin.oldest_enqueued_at()
