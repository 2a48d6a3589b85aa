"""Broker contract, circuit breakers: a ``CircuitBreaker`` gate counts the outcomes settles carry
(``Effects(circuit=True|False)``), opens past its failure rate so that ``get`` hands none of the
type out, lets ``half_open_calls`` probes out once ``open_for_s`` has passed, and closes on a
probe's success or reopens on its failure; a blocked ``get`` wakes when it may probe.

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
both ``gates_in_get`` and ``settle_effects``.
"""

from __future__ import annotations

import time

import pytest

from runner.brokers.base import Broker, CircuitBreaker, Delivery, Depth, Effects, Settle
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    PROMPTLY_S,
    failure,
    put,
    task,
)

#: Opens once half of at least 4 outcomes in a minute failed; a long open, unless a test says.
BREAKER = CircuitBreaker(
    failure_rate=0.5, min_calls=4, window_s=60, open_for_s=60, half_open_calls=2
)


def _breakable(make_broker: BrokerMaker) -> Broker:
    broker = make_broker()
    if not (broker.gates_in_get and broker.settle_effects):
        pytest.skip(f"{type(broker).__name__} lacks gates_in_get or settle_effects")
    return broker


def _outcome(broker: Broker, delivery: Delivery, succeeded: bool) -> None:
    """Settle as the engine does: an ack for a success, a retry for a failure."""
    effects = Effects(circuit=succeeded)
    if succeeded:
        op = Settle(delivery, "ack", effects=effects)
    else:
        op = Settle(delivery, "retry", 0, failure(delivery.task.attempt), effects=effects)
    assert broker.settle_many([op])


def _fail(broker: Broker, count: int, type_: str = "a") -> None:
    got = broker.get({type_: count}, count, GET_TIMEOUT_S)
    assert len(got) == count
    for delivery in got:
        _outcome(broker, delivery, succeeded=False)


def test_a_circuit_opens_past_its_failure_rate_and_holds_the_type_back(
    make_broker: BrokerMaker,
) -> None:
    broker = _breakable(make_broker)
    put(broker, *(task("a", i) for i in range(6)), task("b", 0))
    broker.set_gate("a", BREAKER)
    assert broker.circuits()["a"].state == "closed"
    _fail(broker, 3)
    assert broker.circuits()["a"].state == "closed"  # 3 calls: below min_calls
    _fail(broker, 1)
    assert broker.circuits()["a"].state == "open"

    got = broker.get(ALL, 10, 0.2)
    assert [d.task.type for d in got] == ["b"]  # the open type is held back, others run on
    assert broker.get({"a": 10}, 10, 0.2) == []
    assert broker.depth()["a"] == Depth(ready=6)  # held, not taken: no attempt used
    assert broker.gates() == {"a": (BREAKER,)}


def test_successes_below_the_failure_rate_keep_it_closed(make_broker: BrokerMaker) -> None:
    broker = _breakable(make_broker)
    put(broker, *(task("a", i) for i in range(10)))
    broker.set_gate("a", BREAKER)
    got = broker.get({"a": 10}, 10, 0)
    for i, delivery in enumerate(got):
        _outcome(broker, delivery, succeeded=i < 6)  # then 4 failures: at most 4 of 10
    circuit = broker.circuits()["a"]
    assert (circuit.state, circuit.calls, circuit.failures) == ("closed", 10, 4)


def test_after_open_for_probes_go_out_and_a_success_closes_it(make_broker: BrokerMaker) -> None:
    broker = _breakable(make_broker)
    put(broker, *(task("a", i) for i in range(8)))
    broker.set_gate("a", CircuitBreaker(0.5, 4, window_s=60, open_for_s=0.5, half_open_calls=2))
    _fail(broker, 4)
    opened = broker.circuits()["a"]
    assert opened.state == "open"

    waited = time.monotonic()
    probes = broker.get({"a": 8}, 8, GET_TIMEOUT_S)  # blocks until it may probe
    assert time.monotonic() - waited < PROMPTLY_S
    assert broker.now() >= opened.since + 0.5 - 0.01  # not before open_for
    assert len(probes) == 2  # half_open_calls, though 8 were asked for
    assert broker.get({"a": 8}, 8, 0.2) == []
    half = broker.circuits()["a"]
    assert (half.state, half.probes) == ("half_open", 2)

    _outcome(broker, probes[0], succeeded=True)
    assert broker.circuits()["a"].state == "closed"
    assert len(broker.get({"a": 8}, 8, 0)) == 6  # everything else flows again


def test_a_failed_probe_opens_it_again(make_broker: BrokerMaker) -> None:
    broker = _breakable(make_broker)
    put(broker, *(task("a", i) for i in range(6)))
    broker.set_gate("a", CircuitBreaker(0.5, 4, window_s=60, open_for_s=0.3, half_open_calls=1))
    _fail(broker, 4)
    (probe,) = broker.get({"a": 6}, 6, GET_TIMEOUT_S)
    before = broker.now()
    _outcome(broker, probe, succeeded=False)
    reopened = broker.circuits()["a"]
    assert reopened.state == "open" and reopened.since >= before - 0.01
    assert broker.get({"a": 6}, 6, 0.1) == []


def test_outcomes_of_a_type_without_a_breaker_are_not_kept(make_broker: BrokerMaker) -> None:
    broker = _breakable(make_broker)
    put(broker, *(task("a", i) for i in range(4)))
    _fail(broker, 4)
    assert broker.circuits() == {}
    assert len(broker.get({"a": 4}, 4, GET_TIMEOUT_S)) == 4


def test_a_cleared_breaker_lets_the_type_flow_and_forgets_its_state(
    make_broker: BrokerMaker,
) -> None:
    broker = _breakable(make_broker)
    put(broker, *(task("a", i) for i in range(5)))
    broker.set_gate("a", BREAKER)
    _fail(broker, 4)
    broker.set_gate("a", BREAKER)  # set again (a process starting): the state is kept
    assert broker.circuits()["a"].state == "open"
    assert broker.clear_gate("a", CircuitBreaker) is True
    assert broker.clear_gate("a", CircuitBreaker) is False
    assert broker.circuits() == {} and broker.gates() == {}
    assert len(broker.get({"a": 5}, 5, 0)) == 5
