"""The contract suite's fixtures, built on the one a user defines: ``broker_factory``.

``broker_factory`` (a fixture of the test module or a conftest, never of this package) returns a
``BrokerFactory``: ``build(settings)`` makes a fresh, empty broker with exactly those settings,
every call (a test may make several), and returns it, or ``(broker, admin)`` when the
``BrokerAdmin`` side is another object. The suite's fixtures:

- ``make_broker``: a ``BrokerMaker``. ``make_broker(capacity=2)`` builds a broker with those
  settings changed, ``make_broker.admin(broker)`` is its admin; every broker it built is closed
  after the test.
- ``broker``, ``admin``: one broker with the default settings, and its admin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import pytest

from runner.brokers.base import Broker, BrokerAdmin


@dataclass(frozen=True)
class BrokerSettings:
    """The knobs a contract test may turn; a short enqueue timeout keeps the suite fast."""

    capacity: int = 100
    enqueue_timeout: float = 0.3
    overflow: Literal["block", "reject"] = "block"
    # Long: a lease expires only in the tests that ask for a short one, never because a loaded
    # machine paused a test between a get and its settle.
    visibility_timeout: float = 30.0


#: What a factory returns: a broker that is its own admin, or a broker and its admin.
Built = Broker | tuple[Broker, BrokerAdmin]
#: What ``broker_factory`` returns: settings in, a fresh and empty broker out.
BrokerFactory = Callable[[BrokerSettings], Built]


class BrokerMaker:
    """``make_broker(capacity=2)`` builds a fresh broker; ``make_broker.admin(b)`` its admin."""

    def __init__(self, factory: BrokerFactory) -> None:
        self._factory = factory
        self._admins: dict[int, BrokerAdmin] = {}
        self.made: list[Broker] = []

    def __call__(self, **overrides: Any) -> Broker:
        built = self._factory(replace(BrokerSettings(), **overrides))
        broker, admin = built if isinstance(built, tuple) else (built, built)
        assert isinstance(broker, Broker), f"{broker!r} does not implement Broker"
        assert isinstance(admin, BrokerAdmin), f"{admin!r} does not implement BrokerAdmin"
        self._admins[id(broker)] = admin
        self.made.append(broker)
        return broker

    def admin(self, broker: Broker) -> BrokerAdmin:
        return self._admins[id(broker)]


@pytest.fixture
def make_broker(broker_factory: BrokerFactory) -> Iterator[BrokerMaker]:
    maker = BrokerMaker(broker_factory)
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
