"""The broker contract suite: ``from runner.testing.contract import *`` in a test module that
defines (or sees, in a conftest) a ``broker_factory`` fixture runs every test against it.

How to use it is in runner/testing/__init__.py; the fixtures are in ``fixtures``. The star
import brings the suite's tests (every ``test_*`` function of its modules, in the order of
``MODULES``), its fixtures and the names a factory is written with.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from runner.testing.contract import (
    capacity,
    circuits,
    compare,
    delivery,
    effects,
    gates,
    oldest,
    pipelines,
    rates,
    release,
    settle,
    unique,
)
from runner.testing.contract.fixtures import (
    BrokerFactory,
    BrokerMaker,
    BrokerSettings,
    Built,
    admin,
    broker,
    make_broker,
)

#: The suite's modules, in the order their tests run.
MODULES: tuple[ModuleType, ...] = (
    capacity,
    delivery,
    oldest,
    release,
    settle,
    gates,
    rates,
    circuits,
    effects,
    compare,
    unique,
    pipelines,
)


def _tests(modules: tuple[ModuleType, ...]) -> dict[str, Callable[..., Any]]:
    """Every test function of ``modules``; two of one name would hide one of them."""
    tests: dict[str, Callable[..., Any]] = {}
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("test_") and inspect.isfunction(value):
                if name in tests:
                    raise ImportError(f"two contract tests named {name}: rename one")
                tests[name] = value
    return tests


TESTS = _tests(MODULES)
globals().update(TESTS)  # so that a star import puts them in the user's test module

__all__ = [
    "BrokerFactory",
    "BrokerMaker",
    "BrokerSettings",
    "Built",
    "admin",
    "broker",
    "make_broker",
]
__all__.extend(TESTS)
