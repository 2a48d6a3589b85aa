"""The engine when the broker fails a settle: BrokerUnavailable is tried again, nothing else is.

Runs with settling inline (memory broker) and in the Settler's thread (durable brokers).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from runner.brokers.base import Answer, Settle
from runner.engine import settle as settle_module
from runner.errors import BrokerError, BrokerUnavailable
from runner.model import TaskContext
from tests.unit.engine_kit import Engine, type_runtime, wait_until

SettleMany = Callable[[Sequence[Settle]], list[Answer]]


class FlakySettle:
    """Wraps broker.settle_many: raises ``error`` on the first ``failures`` calls (after
    making them when ``lose_reply``: the broker did the work, its reply was lost)."""

    def __init__(
        self, settle_many: SettleMany, failures: int, error: BrokerError, lose_reply: bool = False
    ) -> None:
        self._settle_many = settle_many
        self._failures = failures
        self._error = error
        self._lose_reply = lose_reply
        self.calls = 0
        self.tries: Counter[str] = Counter()  # task id -> calls that carried it
        self.answers: list[Answer] = []
        self.settled = threading.Event()  # set once a call got through to the broker

    def __call__(self, ops: Sequence[Settle]) -> list[Answer]:
        self.calls += 1
        self.tries.update(op.delivery.task.id for op in ops)
        if self.calls <= self._failures:
            if self._lose_reply:
                self._settle_many(ops)
            raise self._error
        answers = self._settle_many(ops)
        self.answers += answers
        self.settled.set()
        return answers


@pytest.fixture(params=["inline", "background"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(settle_module, "SETTLE_PAUSES_S", (0.01, 0.01, 0.01))

    def handler(payload: Any, ctx: TaskContext) -> None:
        return None

    made = Engine(
        [type_runtime("t", handler)],
        threads=1,
        visibility_timeout=30.0,
        settle_in_background=request.param == "background",
    )
    yield made
    made.stop(grace=1.0)


def flaky(
    engine: Engine, failures: int, error: BrokerError, lose_reply: bool = False
) -> FlakySettle:
    """Make the broker's settles flaky: ``settle_many`` (the Settler's thread batches with it,
    and retries with it) and ``ack`` (what inline settling calls first; the handler succeeds)."""
    ack = engine.broker.ack
    wrapper = FlakySettle(lambda ops: [ack(op.delivery) for op in ops], failures, error, lose_reply)
    engine.broker.settle_many = wrapper  # type: ignore[method-assign]
    engine.broker.ack = lambda d: wrapper([Settle(d, "ack")])[0]  # type: ignore[method-assign]
    return wrapper


def test_a_settle_failing_with_broker_unavailable_is_tried_again(engine: Engine) -> None:
    settle = flaky(engine, failures=3, error=BrokerUnavailable("database is locked"))
    task_id = engine.publish("t")
    assert settle.settled.wait(5.0)
    assert settle.tries == {task_id: 4} and settle.answers == [Answer.DONE]
    assert sum(d.total for d in engine.broker.depth().values()) == 0
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.succeeded")) == 1)
    assert not engine.recorder.named("task.lease_lost")


def test_a_settle_whose_reply_was_lost_is_answered_already_done_and_counted_once(
    engine: Engine,
) -> None:
    """The broker acked, but its reply was lost (a connection dropped): the resent ack answers
    ALREADY_DONE, which is the task's success, not a lost lease."""
    settle = flaky(engine, failures=1, error=BrokerUnavailable("connection reset"), lose_reply=True)
    engine.publish("t")
    assert settle.settled.wait(5.0)
    assert settle.answers == [Answer.ALREADY_DONE]
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.succeeded")) == 1)
    engine.wait_quiet()  # a second report of the settle would have to come before this holds
    assert not engine.recorder.named("task.lease_lost")
    assert len(engine.recorder.named("task.succeeded")) == 1


def test_giving_up_is_not_reported_as_a_lost_lease_and_frees_the_slot(engine: Engine) -> None:
    settle = flaky(engine, failures=10**6, error=BrokerUnavailable("database is locked"))
    first, second = engine.publish("t"), engine.publish("t")
    # One thread: the second task starts only once the first one's slot was freed.
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.started")) == 2)
    tries = len(settle_module.SETTLE_PAUSES_S) + 1
    wait_until(lambda: sum(settle.tries.values()) >= 2 * tries, "both settles were tried")
    wait_until(engine.worker.idle, "both settles were given up on")
    # A further try (which must not come) would show up within this sleep: nothing marks the
    # Settler's thread as done trying, so there is no condition to wait for. Under load the
    # sleep can only miss a try, never fail a correct run.
    time.sleep(0.05)
    # In the background one more try may come first: the one the dispatcher carried along with
    # its fetch (Broker.exchange) before handing the settle to the Settler.
    assert set(settle.tries) == {first, second}
    assert all(tries <= n <= tries + 1 for n in settle.tries.values()), settle.tries
    assert not engine.recorder.named("task.lease_lost")
    assert not engine.recorder.named("task.succeeded")
    # Still leased: the broker hands both out again once their leases expire.
    assert engine.broker.depth()["t"].leased == 2


def test_other_broker_errors_are_not_tried_again(engine: Engine) -> None:
    settle = flaky(engine, failures=10**6, error=BrokerError("something else"))
    task_id = engine.publish("t")
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.started")) == 1)
    wait_until(lambda: settle.calls >= 1, "the settle was tried")
    wait_until(engine.worker.idle, "the settle was given up on")
    time.sleep(0.05)  # as above: a try again (which must not come) would show up here
    assert set(settle.tries) == {task_id}
    assert settle.tries[task_id] <= 2  # at most the dispatcher's carried try, then the Settler's
    assert not engine.recorder.named("task.lease_lost")


class BrokenOnce:
    """Wraps a broker method: the first call raises an error no broker wraps (a bug, say)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("not a BrokerError")
        return self._method(*args)


def test_an_unexpected_fetch_error_does_not_stop_the_dispatcher(engine: Engine) -> None:
    broken = BrokenOnce(engine.broker.get)
    engine.broker.get = broken  # type: ignore[method-assign]
    # End the get the dispatcher may be blocked in (made before the patch; a wake is sticky,
    # so this holds even if it is not waiting yet): its next get is the broken one.
    engine.broker.wake()
    wait_until(lambda: broken.calls >= 1, "the dispatcher met the error")
    engine.publish("t")
    engine.wait_finished(1, timeout=10)  # the worker still consumes


def test_an_unexpected_settle_error_keeps_the_books(engine: Engine) -> None:
    # Only the background Settler calls settle_many on its own; make every other route fail
    # the same way, so whichever route the settle takes meets the error.
    failing = RuntimeError("not a BrokerError")

    def boom(*args: Any) -> Any:
        raise failing

    engine.broker.settle_many = boom  # type: ignore[method-assign]
    engine.broker.exchange = boom  # type: ignore[method-assign]
    engine.broker.ack = boom  # type: ignore[method-assign]
    engine.publish("t")
    engine.recorder.wait_for(lambda: len(engine.recorder.named("task.started")) == 1)
    wait_until(engine.worker.idle, "the settle was given up on")  # not held forever
    assert not engine.recorder.named("task.succeeded")
    assert engine.broker.depth()["t"].leased == 1  # comes back when its lease expires
