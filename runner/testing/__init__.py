"""Test support for code built on the runner: the broker contract suite, for pytest.

``runner.testing.contract`` is the suite every broker passes: memory, SQLite and Redis run it in
tests/contract, and a backend of your own proves itself the same way, with one fixture::

    # tests/test_postgres_broker_contract.py
    import pytest

    from runner.testing.contract import *  # noqa: F403 (the suite's tests and fixtures)
    from runner.testing.contract import BrokerFactory, BrokerSettings
    from myapp.queue import PostgresBroker


    @pytest.fixture(params=["postgres"])  # the param names the run: test_...[postgres]
    def broker_factory(postgres_dsn: str) -> BrokerFactory:
        def build(settings: BrokerSettings) -> PostgresBroker:
            return PostgresBroker(
                dsn=postgres_dsn,
                capacity=settings.capacity,
                enqueue_timeout=settings.enqueue_timeout,
                overflow=settings.overflow,
                visibility_timeout=settings.visibility_timeout,
            )

        return build

Every contract test then runs against ``PostgresBroker``. ``build`` makes a fresh, empty broker
on every call (a test may make several, with different settings) and returns it, or ``(broker,
admin)`` when the ``BrokerAdmin`` side is another object; the suite closes what it built after
each test. The fixture may take any fixture it needs (a server, ``tmp_path``), call
``pytest.skip`` when the backend cannot run here, and have several params, one run each; a
mark goes on its param (``pytest.param("redis", marks=pytest.mark.redis)``).

Only where pytest is installed: this package imports pytest, a dev dependency of the runner, not
one of its own. Nothing in runner/ imports runner.testing, so running tasks never needs pytest.
From runner, the suite imports only the contract's own types (runner.brokers.base, runner.model,
runner.errors); tests/unit/test_layering.py allows it no more than the base modules,
runner.brokers.base and itself.

pytest rewrites the asserts (to say what differed) only in test modules and conftest files, and
the suite's modules are neither: they are registered here, before anything imports them, as
pytest documents for a package of test helpers. Without it a broken contract would fail with a
bare ``AssertionError``.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("runner.testing.contract")
