"""The broker contract suite against a backend that is not ours: WrappedBroker, the third-party
example in tests/unit/plugin_brokers.py, proves itself with one fixture, as a user's would.

WrappedBroker implements the single calls only (``settle_many`` and ``exchange`` are
BaseBroker's defaults) and has no operator side of its own: its admin is the MemoryBroker it
hands every call to, which holds its tasks and dead letters.
"""

from __future__ import annotations

import pytest

from runner.deadletter.memory import MemoryDeadLetters
from runner.testing.contract import *  # noqa: F403 (the suite's tests and fixtures)
from runner.testing.contract import BrokerFactory, BrokerSettings, Built
from tests.unit.plugin_brokers import WrappedBroker


@pytest.fixture(params=["wrapped"])
def broker_factory() -> BrokerFactory:
    def build(settings: BrokerSettings) -> Built:
        broker = WrappedBroker(
            capacity=settings.capacity,
            enqueue_timeout=settings.enqueue_timeout,
            overflow=settings.overflow,
            visibility_timeout=settings.visibility_timeout,
            dead_letters=MemoryDeadLetters(),
        )
        return broker, broker.inner

    return build
