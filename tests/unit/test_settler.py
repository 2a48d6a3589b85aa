"""The Settler: many finished tasks per broker call, each answered on its own, none left behind."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from runner.brokers.base import Answer, Delivery, Settle, SettleIncomplete
from runner.engine.settle import MAX_BATCH, Outcome, Settler
from runner.errors import BrokerError
from runner.model import Task


def outcome(n: int) -> Outcome:
    task = Task(type="t", payload=n, id=f"task-{n}")
    return Outcome(Settle(Delivery(task, receipt=f"r{n}"), "ack"), "task.succeeded")


class GatedBroker:
    """settle_many answers DONE per op, but waits until ``gate`` is set; ``ack`` is one op."""

    def __init__(self, poison: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.poison = poison

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        ids = [op.delivery.task.id for op in ops]
        self.calls.append(ids)
        self.entered.set()
        self.gate.wait(5)
        if self.poison in ids and len(ids) > 1:
            raise BrokerError("one op in this batch is bad")
        if self.poison in ids:
            raise BrokerError("bad op")
        return [Answer.DONE] * len(ops)

    def ack(self, delivery: Delivery) -> Answer:
        return self.settle_many([Settle(delivery, "ack")])[0]


class Reports:
    def __init__(self) -> None:
        self.answers: dict[str, Answer | None] = {}
        self.threads: set[str] = set()

    def __call__(self, outcome: Outcome, answer: Answer | None) -> None:
        self.threads.add(threading.current_thread().name)
        self.answers[outcome.settle.delivery.task.id] = answer


def test_tasks_finished_during_a_call_share_the_next_call() -> None:
    broker, reports = GatedBroker(), Reports()
    settler = Settler(broker, reports, background=True)  # type: ignore[arg-type]
    settler.start()
    settler.submit(outcome(0))
    assert broker.entered.wait(5)  # the first call is under way ...
    for n in range(1, 11):
        settler.submit(outcome(n))  # ... while ten more tasks finish
    broker.gate.set()
    settler.stop(timeout=5)
    assert broker.calls == [["task-0"], [f"task-{n}" for n in range(1, 11)]]
    assert reports.answers == {f"task-{n}": Answer.DONE for n in range(11)}
    assert reports.threads == {"dq-settler"}


def test_a_batch_is_never_larger_than_max_batch() -> None:
    broker, reports = GatedBroker(), Reports()
    settler = Settler(broker, reports, background=True)  # type: ignore[arg-type]
    settler.start()
    settler.submit(outcome(0))
    assert broker.entered.wait(5)
    for n in range(1, MAX_BATCH + 6):
        settler.submit(outcome(n))
    broker.gate.set()
    settler.stop(timeout=5)
    assert [len(c) for c in broker.calls] == [1, MAX_BATCH, 5]
    assert len(reports.answers) == MAX_BATCH + 6


def test_one_bad_op_does_not_sink_its_batch() -> None:
    broker, reports = GatedBroker(poison="task-3"), Reports()
    broker.gate.set()
    settler = Settler(broker, reports, background=False)  # type: ignore[arg-type]
    settler.settle([outcome(n) for n in range(5)])
    done = Answer.DONE
    assert reports.answers == {"task-0": done, "task-1": done, "task-2": done,
                               "task-3": None, "task-4": done}  # fmt: skip
    assert broker.calls[0] == [f"task-{n}" for n in range(5)]  # tried together first


class HalfBroker:
    """settle_many takes every op but those in ``failing``, whose store is down: it raises
    SettleIncomplete with the others' answers, as the memory broker does when a dead letter
    cannot be written; ``failing`` empties after ``fail_times`` calls."""

    def __init__(self, failing: set[str], fail_times: int) -> None:
        self.calls: list[list[str]] = []
        self.failing = failing
        self.fail_times = fail_times

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        ids = [op.delivery.task.id for op in ops]
        self.calls.append(ids)
        if len(self.calls) > self.fail_times:
            self.failing = set()
        answers = [None if i in self.failing else Answer.DONE for i in ids]
        if None in answers:
            raise SettleIncomplete("dead-letter file: cannot write", answers)
        return [Answer.DONE] * len(ops)


@pytest.mark.parametrize("fail_times", [2, 9])
def test_after_an_incomplete_settle_only_the_ops_that_failed_are_sent_again(
    fail_times: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("runner.engine.settle.SETTLE_PAUSES_S", (0.0, 0.0, 0.0))
    broker, reports = HalfBroker({"task-1", "task-3"}, fail_times), Reports()
    settler = Settler(broker, reports, background=False)  # type: ignore[arg-type]
    settler.settle([outcome(n) for n in range(5)])
    assert broker.calls[0] == [f"task-{n}" for n in range(5)]
    assert all(call == ["task-1", "task-3"] for call in broker.calls[1:])
    gave_up = fail_times > 3  # the first call and three more
    done = Answer.DONE
    assert reports.answers == {"task-0": done, "task-1": None if gave_up else done,
                               "task-2": done, "task-3": None if gave_up else done,
                               "task-4": done}  # fmt: skip


def test_stop_settles_everything_submitted_before_it() -> None:
    broker, reports = GatedBroker(), Reports()
    settler = Settler(broker, reports, background=True)  # type: ignore[arg-type]
    settler.start()
    for n in range(100):
        settler.submit(outcome(n))
    broker.gate.set()
    settler.stop(timeout=5)
    assert len(reports.answers) == 100


@pytest.mark.parametrize("background", [False, True])
def test_inline_settles_in_the_callers_thread(background: bool) -> None:
    broker, reports = GatedBroker(), Reports()
    broker.gate.set()
    settler = Settler(broker, reports, background=background)  # type: ignore[arg-type]
    settler.start()
    settler.submit(outcome(1))
    settler.stop(timeout=5)
    expected = "dq-settler" if background else threading.current_thread().name
    assert reports.threads == {expected}
    assert reports.answers == {"task-1": Answer.DONE}
