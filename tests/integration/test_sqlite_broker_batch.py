"""SqliteBroker's fast paths: group commit and skipped promotion stay exact."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.brokers.base import Answer
from runner.brokers.sqlite.broker import SqliteBroker
from runner.model import Task


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(tmp_path: Path, clock: Clock) -> Iterator[tuple[SqliteBroker, SqliteBroker]]:
    """Two brokers on one file: two connections, as two processes would have."""
    path = str(tmp_path / "q.db")
    a = SqliteBroker(path, 1000, 0.1, "reject", 30.0, clock=clock)
    b = SqliteBroker(path, 1000, 0.1, "reject", 30.0, clock=clock)
    yield a, b
    a.close()
    b.close()


def test_concurrent_acks_of_one_delivery_answer_done_exactly_once(
    pair: tuple[SqliteBroker, SqliteBroker],
) -> None:
    broker, _ = pair
    broker.put_many([Task(type="t", payload=i) for i in range(8)])
    deliveries = broker.get({"t": 8}, 8, 0)
    assert len(deliveries) == 8
    start = threading.Barrier(16)
    answers: list[tuple[str, Answer]] = []
    lock = threading.Lock()

    def ack_twice(i: int) -> None:
        delivery = deliveries[i % 8]
        start.wait()
        ok = broker.ack(delivery)
        with lock:
            answers.append((delivery.task.id, ok))

    threads = [threading.Thread(target=ack_twice, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for delivery in deliveries:
        mine = {ok for tid, ok in answers if tid == delivery.task.id}
        assert mine == {Answer.DONE, Answer.ALREADY_DONE}  # one each: the other is a resend
    assert sum(d.total for d in broker.depth().values()) == 0


def test_a_delayed_task_put_by_another_connection_is_promoted_when_due(
    pair: tuple[SqliteBroker, SqliteBroker], clock: Clock
) -> None:
    consumer, producer = pair
    consumer.put_many([Task(type="t", payload=0)])
    assert len(consumer.get({"t": 1}, 1, 0)) == 1  # caches: nothing due before its lease ends
    producer.put_many([Task(type="t", payload=1, not_before=clock.now + 5)])
    assert consumer.get({"t": 1}, 1, 0) == []
    clock.now += 5
    got = consumer.get({"t": 1}, 1, 0)
    assert [d.task.payload for d in got] == [1]


def test_an_expired_lease_of_another_connection_is_redelivered(
    pair: tuple[SqliteBroker, SqliteBroker], clock: Clock
) -> None:
    consumer, other = pair
    consumer.put_many([Task(type="t", payload=i) for i in range(2)])
    assert len(consumer.get({"t": 1}, 1, 0)) == 1
    lost = other.get({"t": 1}, 1, 0)  # "the other process" takes task 1, then dies
    assert [d.task.payload for d in lost] == [1]
    clock.now += 31
    again = consumer.get({"t": 2}, 2, 0)
    assert sorted((d.task.payload, d.redelivered) for d in again) == [(0, True), (1, True)]
