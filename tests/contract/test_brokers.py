"""The broker contract suite (runner.testing.contract) against our three brokers: every test
runs once per broker, as test_...[memory], [redis] and [sqlite].

A built-in broker joins with one param below and one branch in ``broker_factory``; a backend
that is not ours runs the suite the same way (tests/unit/test_plugin_broker_contract.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from runner.brokers.memory import MemoryBroker
from runner.brokers.redis.broker import RedisBroker
from runner.brokers.sqlite.broker import SqliteBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.testing.contract import *  # noqa: F403 (the suite's tests and fixtures)
from runner.testing.contract import BrokerFactory, BrokerSettings
from tests.redis_server import RedisServer


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis), "sqlite"])
def broker_factory(request: pytest.FixtureRequest) -> BrokerFactory:
    if request.param == "memory":
        return _memory
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")  # skips without the binary
        return lambda settings: _redis(server, settings)
    assert request.param == "sqlite"
    tmp_path: Path = request.getfixturevalue("tmp_path")
    return lambda settings: _sqlite(tmp_path, settings)


def _memory(settings: BrokerSettings) -> MemoryBroker:
    return MemoryBroker(
        capacity=settings.capacity,
        enqueue_timeout=settings.enqueue_timeout,
        overflow=settings.overflow,
        visibility_timeout=settings.visibility_timeout,
        dead_letters=MemoryDeadLetters(),
    )


def _redis(server: RedisServer, settings: BrokerSettings) -> RedisBroker:
    return RedisBroker(
        url=server.url,
        namespace=f"contract-{uuid.uuid4().hex[:12]}",  # fresh and empty on the shared server
        capacity=settings.capacity,
        enqueue_timeout=settings.enqueue_timeout,
        overflow=settings.overflow,
        visibility_timeout=settings.visibility_timeout,
    )


def _sqlite(tmp_path: Path, settings: BrokerSettings) -> SqliteBroker:
    return SqliteBroker(
        path=str(tmp_path / f"contract-{uuid.uuid4().hex[:12]}.db"),  # a fresh file per broker
        capacity=settings.capacity,
        enqueue_timeout=settings.enqueue_timeout,
        overflow=settings.overflow,
        visibility_timeout=settings.visibility_timeout,
    )
