"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runner.brokers.redis.broker import RedisBroker
from tests.redis_server import RedisServer

MakeBroker = Callable[..., RedisBroker]


@pytest.fixture
def make_broker(redis_server: RedisServer, redis_namespace: str) -> Iterator[MakeBroker]:
    """Brokers on the shared server, all in this test's namespace (so they see each other)."""
    brokers: list[RedisBroker] = []

    def make(**overrides: Any) -> RedisBroker:
        options: dict[str, Any] = {
            "url": redis_server.url,
            "namespace": redis_namespace,
            "capacity": 100,
            "enqueue_timeout": 0.2,
            "overflow": "block",
            "visibility_timeout": 5.0,
        }
        options.update(overrides)
        broker = RedisBroker(**options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()
