"""The Redis broker's settle calls from many threads at once: every caller gets its own answer.

Many deliveries, stale ones among them, are settled concurrently against a real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from runner.brokers.base import Answer, DeadLetterFilter, Delivery
from runner.brokers.redis.broker import RedisBroker
from runner.model import AttemptRecord, DeadLetter, Task

MakeBroker = Callable[..., RedisBroker]


@pytest.fixture
def make_broker(make_broker: MakeBroker) -> MakeBroker:
    """The shared factory (tests/integration/conftest.py), with room for 200 tasks."""
    return partial(make_broker, capacity=200, overflow="reject")


def take(broker: RedisBroker, n: int) -> list[Delivery]:
    out: list[Delivery] = []
    deadline = time.monotonic() + 10.0
    while len(out) < n:
        assert time.monotonic() < deadline
        out += broker.get({"a": n - len(out)}, n - len(out), 1.0)
    return out


@pytest.mark.redis
def test_concurrent_acks_each_get_their_fenced_answer(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.2)
    broker.put_many([Task("a", 0)])
    (stale,) = take(broker, 1)
    (fresh,) = take(broker, 1)  # the same task, reclaimed after the visibility timeout
    assert fresh.task.id == stale.task.id
    broker.put_many([Task("a", i) for i in range(1, 41)])
    deliveries = take(broker, 40)
    calls = [stale, fresh, stale, *deliveries]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(broker.ack, calls))
    # The stale receipt is fenced whichever thread sends it; fresh wins once and only once.
    assert answers[0] is Answer.FENCED
    assert answers[1] is Answer.DONE
    assert answers[2] is Answer.FENCED
    assert answers[3:] == [Answer.DONE] * 40
    assert broker.depth()["a"].total == 0
    broker.put_many([Task("a", i) for i in range(200)])  # every capacity slot came back


@pytest.mark.redis
def test_concurrent_retry_dead_release_and_ack_all_land(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.put_many([Task("a", i) for i in range(4)])
    by_payload = {d.task.payload: d for d in take(broker, 4)}
    now = time.time()
    failure = AttemptRecord(1, "RuntimeError", "boom", "tb", now, 0.01, "test:1")
    doomed = by_payload[2]
    record = DeadLetter(
        doomed.task.with_failure(failure), "error", "RuntimeError", "boom", "tb", 1, now, now, now
    )
    calls: list[Callable[[], Answer]] = [
        lambda: broker.ack(by_payload[0]),
        lambda: broker.retry(by_payload[1], 0.0, failure),
        lambda: broker.dead(doomed, record),
        lambda: broker.release(by_payload[3]),
    ]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda call: call(), calls)) == [Answer.DONE] * 4
    back = {d.task.payload: d.task for d in take(broker, 2)}
    assert back[1].attempt == 2 and len(back[1].history) == 1  # retried: one more attempt
    assert back[3].attempt == 1  # released: the attempt it used is given back
    (dead,) = broker.dead_letters(DeadLetterFilter())
    assert dead.task.id == doomed.task.id
    assert broker.ack(by_payload[0]) is Answer.ALREADY_DONE  # settled once means settled
