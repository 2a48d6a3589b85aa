"""Broker contract, gates: a type held back inside ``get``'s claim uses no attempt and holds no
lease, other types run on, and a cleared or expired gate lets a waiting ``get`` go on.

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
``gates_in_get``.
"""

from __future__ import annotations

import time

import pytest

from runner.brokers.base import Answer, Broker, Depth, Pause
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    PROMPTLY_S,
    Background,
    get_one,
    put,
    task,
)


def _gated(make_broker: BrokerMaker) -> Broker:
    broker = make_broker()
    if not broker.gates_in_get:
        pytest.skip(f"{type(broker).__name__} declares gates_in_get = False")
    return broker


def test_a_paused_type_is_not_handed_out_and_others_run_on(make_broker: BrokerMaker) -> None:
    broker = _gated(make_broker)
    put(broker, task("a", 1), task("b", 2))
    broker.set_gate("a", Pause())

    got = broker.get(ALL, 10, 0.2)
    assert [d.task.type for d in got] == ["b"]
    assert broker.get(ALL, 10, 0.2) == []
    assert broker.gates() == {"a": (Pause(),)}
    # Held back, not taken: still ready, and exchange (the engine's other fetch) holds it too.
    assert broker.depth()["a"] == Depth(ready=1)
    answers, more = broker.exchange([], ALL, 10)
    assert (answers, more) == ([], [])


def test_a_cleared_gate_hands_the_task_out_with_no_attempt_used(make_broker: BrokerMaker) -> None:
    broker = _gated(make_broker)
    put(broker, task("a", 1))
    broker.set_gate("a", Pause())
    assert broker.get(ALL, 10, 0.2) == []

    assert broker.clear_gate("a", Pause) is True
    assert broker.clear_gate("a", Pause) is False  # nothing left to clear
    assert broker.gates() == {}
    got = get_one(broker, "a")
    assert got.task.attempt == 1
    assert got.redelivered is False


def test_clearing_a_gate_wakes_a_blocked_get(make_broker: BrokerMaker) -> None:
    broker = _gated(make_broker)
    put(broker, task("a", 1))
    broker.set_gate("a", Pause())
    waiting = Background(lambda: broker.get({"a": 1}, 1, GET_TIMEOUT_S))
    # Blocked, the gate holding it (a fixed wait only aims: the get returns the same either way).
    assert waiting.blocked_for(0.3)

    cleared_at = time.monotonic()
    broker.clear_gate("a", Pause)
    waiting.join(GET_TIMEOUT_S)
    assert waiting.error is None
    assert [d.task.payload for d in waiting.result] == [1]
    assert time.monotonic() - cleared_at < PROMPTLY_S


def test_a_pause_until_a_time_ends_by_itself_on_the_brokers_clock(
    make_broker: BrokerMaker,
) -> None:
    broker = _gated(make_broker)
    put(broker, task("a", 1))
    until = broker.now() + 1.0
    broker.set_gate("a", Pause(until=until))
    assert broker.gates() == {"a": (Pause(until=until),)}

    got = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    assert [d.task.payload for d in got] == [1]
    # Never before the gate's time (on the broker's clock, the one it is evaluated by).
    assert broker.now() >= until - 0.01
    assert broker.gates() == {}  # an expired pause is no longer listed


def test_a_gate_does_not_touch_deliveries_already_out(make_broker: BrokerMaker) -> None:
    """Leased tasks of a gated type settle and renew as usual; a retry of one waits for the
    gate like any ready task."""
    broker = _gated(make_broker)
    put(broker, task("a", 1), task("a", 2))
    first = get_one(broker, "a")
    broker.set_gate("a", Pause())

    assert broker.extend([first]) == [Answer.DONE]
    assert bool(broker.release(first))
    assert broker.get(ALL, 10, 0.2) == []
    assert broker.depth()["a"] == Depth(ready=2)
    broker.clear_gate("a", Pause)
    got = broker.get({"a": 5}, 5, GET_TIMEOUT_S)
    assert sorted(d.task.payload for d in got) == [1, 2]
    assert [d.task.attempt for d in got] == [1, 1]


def test_setting_a_gate_again_replaces_it(make_broker: BrokerMaker) -> None:
    broker = _gated(make_broker)
    put(broker, task("a", 1))
    broker.set_gate("a", Pause())
    until = broker.now() + 0.5
    broker.set_gate("a", Pause(until=until))  # the indefinite pause becomes a short one
    assert broker.gates() == {"a": (Pause(until=until),)}
    got = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    assert [d.task.payload for d in got] == [1]
