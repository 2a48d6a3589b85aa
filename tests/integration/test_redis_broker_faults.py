"""RedisBroker under faults: idle longer than every timeout, and Redis killed and restarted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from runner.brokers.redis.broker import RedisBroker
from runner.eventlog import FIELDS_ATTR
from runner.model import Task
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

#: Upper bound for what takes well under a second when the broker works: room for a loaded
#: machine, far short of the 30 s get timeouts a missed wake-up would run out.
PROMPTLY_S = 5.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_idle_consumer_still_gets_a_task_published_later(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    # Every client timeout is short here, so the idle period outlasts all of them several times.
    options = {"socket_timeout": 0.5, "connect_timeout": 0.5, "health_check_interval": 1}
    consumer = RedisBroker(redis_server.url, redis_namespace, 10, 1.0, "block", 5.0, **options)
    producer = RedisBroker(redis_server.url, redis_namespace, 10, 1.0, "block", 5.0)
    try:
        idle_until = time.monotonic() + 2.5
        while time.monotonic() < idle_until:
            assert consumer.get({"a": 1}, 1, 0.8) == []
        publishing = threading.Event()
        published = threading.Event()

        def publish() -> None:
            publishing.set()
            producer.put_many([Task("a", "late")])
            published.set()

        timer = threading.Timer(0.3, publish)
        timer.start()
        (delivery,) = consumer.get({"a": 1}, 1, 30.0)
        # The task may reach the consumer before put_many's reply reaches the producer; it
        # must not arrive before the put began, and the put must complete.
        assert publishing.is_set()
        assert published.wait(PROMPTLY_S)
        assert delivery.task.payload == "late"
        timer.join()
        assert consumer.ack(delivery)
    finally:
        consumer.close()
        producer.close()


def test_delivery_arrives_promptly_after_publish(
    redis_server: RedisServer, redis_namespace: str
) -> None:
    consumer = RedisBroker(redis_server.url, redis_namespace, 10, 1.0, "block", 5.0)
    producer = RedisBroker(redis_server.url, redis_namespace, 10, 1.0, "block", 5.0)
    try:
        published_at: list[float] = []

        def publish() -> None:
            published_at.append(time.monotonic())
            producer.put_many([Task("a", 1)])

        timer = threading.Timer(0.5, publish)
        timer.start()
        (delivery,) = consumer.get({"a": 1}, 1, 30.0)
        latency = time.monotonic() - published_at[0]
        timer.join()
        # An XREAD BLOCK wakes at once (a poll, within its 0.1 s slice): the get is not left
        # to its 30 s timeout. The bound is loose for a loaded machine.
        assert latency < PROMPTLY_S
        consumer.ack(delivery)
    finally:
        consumer.close()
        producer.close()


@pytest.mark.slow
def test_redis_killed_and_restarted_loses_nothing_published(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    broker = RedisBroker(server.url, "loss", 1000, 5.0, "block", 30.0, reconnect_timeout=20.0)
    try:
        published = [Task("a", i) for i in range(50)]
        broker.put_many(published[:25])
        first = broker.get({"a": 10}, 10, 1.0)
        acked = {d.task.id for d in first[:5]}
        for delivery in first[:5]:
            assert broker.ack(delivery)

        server.kill()
        restarter = threading.Timer(0.5, server.start)
        restarter.start()
        with caplog.at_level("WARNING", logger="runner.broker"):
            broker.put_many(published[25:])  # retried until Redis is back
        restarter.join()
        events = [getattr(r, FIELDS_ATTR, {}).get("event") for r in caplog.records]
        assert "broker.reconnecting" in events

        # The five unacked deliveries survive in the pending list; reclaim them quickly.
        fresh = RedisBroker(server.url, "loss", 1000, 5.0, "block", 0.2)
        try:
            seen: dict[str, int] = {}
            deadline = time.monotonic() + 20.0
            while len(seen) < 45 and time.monotonic() < deadline:
                for delivery in fresh.get({"a": 20}, 20, 0.5):
                    seen[delivery.task.id] = seen.get(delivery.task.id, 0) + 1
                    assert fresh.ack(delivery)
            assert set(seen) == {t.id for t in published} - acked
            assert fresh.depth()["a"].total == 0
        finally:
            fresh.close()
    finally:
        broker.close()


@pytest.mark.slow
def test_blocked_get_survives_a_restart(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    consumer = RedisBroker(server.url, "restart", 10, 1.0, "block", 30.0, reconnect_timeout=20.0)
    try:
        results: list[object] = []

        def consume() -> None:
            results.append(consumer.get({"a": 1}, 1, 15.0))

        thread = threading.Thread(target=consume)
        thread.start()
        client = server.client()
        wait_until(lambda: int(client.info("clients")["blocked_clients"]) >= 1, "the get blocks")
        client.close()
        server.kill()
        time.sleep(0.3)
        server.start()
        producer = RedisBroker(server.url, "restart", 10, 1.0, "block", 30.0)
        producer.put_many([Task("a", "after restart")])
        producer.close()
        thread.join(20.0)
        assert not thread.is_alive()
        (batch,) = results
        assert [d.task.payload for d in batch] == ["after restart"]  # type: ignore[attr-defined]
    finally:
        consumer.close()
