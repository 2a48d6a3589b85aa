"""Broker contract, rate limits: a ``RateLimit`` gate is a token bucket evaluated inside ``get``'s
claim, on the broker's clock: at most ``burst`` at once and ``rate`` per second over time, for
the type alone; a blocked ``get`` wakes for the next token; the bucket is reported and kept
across a ``set_gate`` of a new rate.

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
``gates_in_get``. Time bounds are from the broker's own clock (``now``), so a slow machine only
makes the tests wait longer, never fail.
"""

from __future__ import annotations

import time

import pytest

from runner.brokers.base import Broker, Depth, Pause, RateLimit
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    PROMPTLY_S,
    get_one,
    put,
    task,
)


def _limited(make_broker: BrokerMaker) -> Broker:
    broker = make_broker()
    if not broker.gates_in_get:
        pytest.skip(f"{type(broker).__name__} declares gates_in_get = False")
    return broker


def _types(deliveries: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(d.task.type for d in deliveries)


def test_a_rate_limit_hands_out_at_most_a_burst_and_leaves_other_types_alone(
    make_broker: BrokerMaker,
) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(10)), task("b", 0), task("b", 1))
    began = broker.now()
    broker.set_gate("a", RateLimit(rate=0.5, burst=3))
    first = broker.get(ALL, 100, 0)
    second = broker.get(ALL, 100, 0)
    elapsed = broker.now() - began
    handed_a = [d for d in first + second if d.task.type == "a"]
    assert len(handed_a) <= 3 + elapsed * 0.5  # the burst, and what refilled meanwhile
    assert len(handed_a) >= 3
    assert _types([d for d in first if d.task.type == "b"]) == ["b", "b"]  # not limited
    # Held back, not taken: the rest of "a" stays ready, no attempt used.
    assert broker.depth()["a"].ready == 10 - len(handed_a)


def test_tokens_come_at_the_rate_and_a_blocked_get_wakes_for_one(
    make_broker: BrokerMaker,
) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(5)))
    broker.set_gate("a", RateLimit(rate=4, burst=1))
    got = get_one(broker, "a")
    taken_at = broker.now()
    assert got.task.attempt == 1

    waited = time.monotonic()
    more = broker.get({"a": 5}, 5, GET_TIMEOUT_S)  # blocks for the next token, not 30 s
    assert len(more) == 1
    assert time.monotonic() - waited < PROMPTLY_S
    assert broker.now() - taken_at >= 0.25 - 0.02  # a token every 0.25 s, not before


def test_over_time_a_type_runs_at_its_rate(make_broker: BrokerMaker) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(60)))
    broker.set_gate("a", RateLimit(rate=20, burst=2))
    began = broker.now()
    handed = 0
    while broker.now() - began < 1.0:
        handed += len(broker.get({"a": 60}, 60, 0.05))
    elapsed = broker.now() - began
    assert handed <= 2 + 20 * elapsed
    assert handed >= 10  # 20/s for a second: half of it at the very least


def test_exchange_obeys_the_rate_limit_too(make_broker: BrokerMaker) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(5)))
    broker.set_gate("a", RateLimit(rate=0.1, burst=2))
    answers, handed = broker.exchange([], {"a": 5}, 5)
    assert (answers, len(handed)) == ([], 2)
    assert broker.exchange([], {"a": 5}, 5) == ([], [])


def test_a_new_rate_keeps_the_buckets_tokens(make_broker: BrokerMaker) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(5)))
    broker.set_gate("a", RateLimit(rate=0.1, burst=3))
    assert len(broker.get({"a": 5}, 5, 0)) == 3
    broker.set_gate("a", RateLimit(rate=0.1, burst=5))  # not a fresh, full bucket
    assert broker.get({"a": 5}, 5, 0.2) == []
    assert broker.buckets()["a"].tokens < 1


def test_a_cleared_rate_limit_hands_out_freely_and_drops_its_bucket(
    make_broker: BrokerMaker,
) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(4)))
    broker.set_gate("a", RateLimit(rate=0.1, burst=1))
    assert len(broker.get({"a": 4}, 4, 0)) == 1
    assert broker.clear_gate("a", RateLimit) is True
    assert broker.clear_gate("a", RateLimit) is False
    assert broker.gates() == {}
    assert broker.buckets() == {}
    assert len(broker.get({"a": 4}, 4, 0)) == 3


def test_gates_lists_a_rate_limit_beside_a_pause(make_broker: BrokerMaker) -> None:
    broker = _limited(make_broker)
    put(broker, task("a", 0))
    limit = RateLimit(rate=5, burst=2)
    broker.set_gate("a", limit)
    broker.set_gate("a", Pause())
    assert broker.gates() == {"a": (Pause(), limit)}
    assert broker.get(ALL, 10, 0.1) == []  # the pause holds it, tokens or not
    assert broker.clear_gate("a", Pause) is True
    assert broker.gates() == {"a": (limit,)}
    assert broker.depth()["a"] == Depth(ready=1)
    assert len(broker.get(ALL, 10, 0)) == 1


def test_buckets_report_tokens_and_the_time_spent_empty(make_broker: BrokerMaker) -> None:
    broker = _limited(make_broker)
    put(broker, *(task("a", i) for i in range(3)))
    broker.set_gate("a", RateLimit(rate=2, burst=1))
    fresh = broker.buckets()["a"]
    assert fresh.tokens == 1 and fresh.limited_s == 0  # a new bucket starts full
    emptied = broker.now()
    assert len(broker.get({"a": 3}, 3, 0)) == 1
    time.sleep(0.3)
    bucket = broker.buckets()["a"]
    now = broker.now()
    assert 0.25 <= bucket.limited_s <= now - emptied + 0.01
    assert bucket.tokens < 1
    time.sleep(0.3)  # one token came after 0.5 s: empty no longer
    assert broker.buckets()["a"].limited_s <= 0.5 + 0.01
