"""The engine when the broker fails an ack: BrokerUnavailable is tried again, nothing else is."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runner import attempt as worker_module
from runner.brokers.base import Delivery
from runner.errors import BrokerError, BrokerUnavailable
from runner.task import TaskContext
from tests.unit.engine_kit import Engine, type_runtime


class FlakyAck:
    """Wraps broker.ack: raises ``error`` on the first ``failures`` calls, then delegates."""

    def __init__(self, ack: Callable[[Delivery], bool], failures: int, error: BrokerError):
        self._ack = ack
        self._failures = failures
        self._error = error
        self.calls = 0
        self.answers: list[bool] = []
        self.settled = threading.Event()  # set once a call got through to the broker
        self.__name__ = "ack"

    def __call__(self, delivery: Delivery) -> bool:
        self.calls += 1
        if self.calls <= self._failures:
            raise self._error
        answer = self._ack(delivery)
        self.answers.append(answer)
        self.settled.set()
        return answer


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(worker_module, "SETTLE_PAUSES_S", (0.01, 0.01, 0.01))

    def handler(payload: Any, ctx: TaskContext) -> None:
        return None

    made = Engine([type_runtime("t", handler)], threads=1, visibility_timeout=30.0)
    yield made
    made.stop(grace=1.0)


def flaky(engine: Engine, failures: int, error: BrokerError) -> FlakyAck:
    wrapper = FlakyAck(engine.broker.ack, failures, error)
    engine.broker.ack = wrapper  # type: ignore[method-assign]
    return wrapper


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_an_ack_failing_with_broker_unavailable_is_tried_again(engine: Engine) -> None:
    ack = flaky(engine, failures=3, error=BrokerUnavailable("database is locked"))
    engine.publish("t")
    assert ack.settled.wait(5.0)
    assert ack.calls == 4 and ack.answers == [True]
    assert sum(d.total for d in engine.broker.depth().values()) == 0
    assert not engine.recorder.named("task.lease_lost")


def test_giving_up_is_not_reported_as_a_lost_lease_and_frees_the_slot(engine: Engine) -> None:
    ack = flaky(engine, failures=10**6, error=BrokerUnavailable("database is locked"))
    engine.publish("t")
    engine.publish("t")
    # One thread: the second task starts only once the first one's slot was freed.
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.started")) == 2)
    wait_until(lambda: ack.calls >= 8)
    time.sleep(0.05)  # a ninth try would show up here
    assert ack.calls == 2 * (len(worker_module.SETTLE_PAUSES_S) + 1)
    assert not engine.recorder.named("task.lease_lost")


def test_other_broker_errors_are_not_tried_again(engine: Engine) -> None:
    ack = flaky(engine, failures=10**6, error=BrokerError("something else"))
    engine.publish("t")
    engine.publish("t")
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.started")) == 2)
    wait_until(lambda: ack.calls >= 2)
    time.sleep(0.05)
    assert ack.calls == 2
    assert not engine.recorder.named("task.lease_lost")
