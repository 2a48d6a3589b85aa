"""Fixtures for the broker contract suite: every test in tests/contract runs once per broker.

Adding a broker takes ONE entry in ``BROKERS`` below: a factory ``(request, settings) -> broker``
that builds a fresh, empty broker with exactly the given settings. The broker must implement both
``Broker`` and ``BrokerAdmin``; if the admin side is a separate object, return ``(broker, admin)``.
Use ``request.getfixturevalue(...)`` for what the backend needs (``tmp_path`` for a SQLite file, a
session-scoped server fixture and a unique namespace for Redis), and ``pytest.skip`` inside the
factory when the backend cannot run here. Optional marks per kind go in ``BROKER_MARKS``.
The tests themselves must pass unchanged on every broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import pytest

from runner.brokers.base import Broker, BrokerAdmin
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters


@dataclass(frozen=True)
class BrokerSettings:
    """The knobs a contract test may turn; a short enqueue timeout keeps the suite fast."""

    capacity: int = 100
    enqueue_timeout: float = 0.3
    overflow: Literal["block", "reject"] = "block"
    # Long: a lease expires only in the tests that ask for a short one, never because a loaded
    # machine paused a test between a get and its settle.
    visibility_timeout: float = 30.0


Made = Broker | tuple[Broker, BrokerAdmin]
Factory = Callable[[pytest.FixtureRequest, BrokerSettings], Made]


def _memory(request: pytest.FixtureRequest, settings: BrokerSettings) -> Made:
    return MemoryBroker(
        capacity=settings.capacity,
        enqueue_timeout=settings.enqueue_timeout,
        overflow=settings.overflow,
        visibility_timeout=settings.visibility_timeout,
        dead_letters=MemoryDeadLetters(),
    )


def _redis(request: pytest.FixtureRequest, settings: BrokerSettings) -> Made:
    from runner.brokers.redis.broker import RedisBroker

    server = request.getfixturevalue("redis_server")  # skips when redis-server is missing
    return RedisBroker(
        url=server.url,
        namespace=f"contract-{uuid.uuid4().hex[:12]}",  # fresh and empty on the shared server
        capacity=settings.capacity,
        enqueue_timeout=settings.enqueue_timeout,
        overflow=settings.overflow,
        visibility_timeout=settings.visibility_timeout,
    )


def _sqlite(request: pytest.FixtureRequest, settings: BrokerSettings) -> Made:
    from runner.brokers.sqlite.broker import SqliteBroker

    tmp_path = request.getfixturevalue("tmp_path")
    return SqliteBroker(
        path=str(tmp_path / f"contract-{uuid.uuid4().hex[:12]}.db"),  # fresh file per broker
        capacity=settings.capacity,
        enqueue_timeout=settings.enqueue_timeout,
        overflow=settings.overflow,
        visibility_timeout=settings.visibility_timeout,
    )


BROKERS: dict[str, Factory] = {
    "memory": _memory,
    "redis": _redis,
    "sqlite": _sqlite,
}

BROKER_MARKS: dict[str, list[pytest.MarkDecorator]] = {"redis": [pytest.mark.redis]}


class BrokerMaker:
    """``make_broker(capacity=2)`` builds a fresh broker; ``make_broker.admin(b)`` its admin."""

    def __init__(self, request: pytest.FixtureRequest, factory: Factory) -> None:
        self._request = request
        self._factory = factory
        self._admins: dict[int, BrokerAdmin] = {}
        self.made: list[Broker] = []

    def __call__(self, **overrides: Any) -> Broker:
        made = self._factory(self._request, replace(BrokerSettings(), **overrides))
        broker, admin = made if isinstance(made, tuple) else (made, made)
        assert isinstance(broker, Broker)
        assert isinstance(admin, BrokerAdmin)
        self._admins[id(broker)] = admin
        self.made.append(broker)
        return broker

    def admin(self, broker: Broker) -> BrokerAdmin:
        return self._admins[id(broker)]


@pytest.fixture(
    params=[pytest.param(kind, marks=BROKER_MARKS.get(kind, [])) for kind in sorted(BROKERS)]
)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_broker(request: pytest.FixtureRequest, broker_kind: str) -> Iterator[BrokerMaker]:
    maker = BrokerMaker(request, BROKERS[broker_kind])
    yield maker
    for broker in maker.made:
        broker.close()


@pytest.fixture
def broker(make_broker: BrokerMaker) -> Broker:
    """A broker with the default contract settings."""
    return make_broker()


@pytest.fixture
def admin(make_broker: BrokerMaker, broker: Broker) -> BrokerAdmin:
    return make_broker.admin(broker)
