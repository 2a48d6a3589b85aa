"""Lease renewal by a real Worker, on every broker: held tasks outlive their leases.

Every delivery a live worker holds (running, overrunning, prefetched in the buffer) has its
lease renewed every visibility_timeout / 3, so nothing it holds is handed out again however
long it holds it; and a renewal the broker refuses (FENCED: another consumer owns the task
now) drops an unstarted task without running or settling it. Here the visibility timeout is
short (VISIBILITY_S), tasks are held for several of them, and a second consumer on the same
store (the same MemoryBroker, a second SqliteBroker on the file, a second RedisBroker in the
namespace: another worker, as far as the broker can tell) polls meanwhile.

The config keeps a task's timeout below the lease, so a task runs past its lease only by
overrunning: here ``timeout_action: cancel`` with a handler that ignores ``ctx.cancelled``
until the test lets it go (the attempt then fails as a TimeoutError and, with one attempt
allowed, is dead-lettered).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from runner.brokers.base import Answer, Broker, Delivery
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.engine.worker import Worker
from runner.events import EventBus
from runner.model import Task, TaskContext
from tests.unit.engine_kit import Recorder, plan, type_runtime

#: The brokers' lease: renewed every VISIBILITY_S / 3, so a renewal may be up to two thirds of
#: a lease late before anything is handed out again: 1 s, for a loaded machine's stalls.
VISIBILITY_S = 1.5
#: How long the held tasks are held: past three leases.
HOLD_S = 3.5 * VISIBILITY_S
#: How often the second consumer polls the broker.
POLL_S = 0.05


class Store:
    """One empty task store of a kind; ``open()`` is another consumer's broker on it."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self._request = request
        self._opened: list[Broker] = []
        self._memory: MemoryBroker | None = None
        self._name = f"leases-{uuid.uuid4().hex[:12]}"

    def open(self) -> Broker:
        broker = self._make()
        self._opened.append(broker)
        return broker

    def _make(self) -> Broker:
        if self.kind == "memory":  # in-process only: every consumer shares the one broker
            if self._memory is None:
                self._memory = MemoryBroker(100, 1.0, "block", VISIBILITY_S, MemoryDeadLetters())
            return self._memory
        if self.kind == "sqlite":
            from runner.brokers.sqlite.broker import SqliteBroker

            tmp_path: Path = self._request.getfixturevalue("tmp_path")
            return SqliteBroker(str(tmp_path / f"{self._name}.db"), 100, 1.0, "block", VISIBILITY_S)
        from runner.brokers.redis.broker import RedisBroker

        server = self._request.getfixturevalue("redis_server")  # skips without redis-server
        return RedisBroker(server.url, self._name, 100, 1.0, "block", VISIBILITY_S)

    def close(self) -> None:
        for broker in self._opened:
            broker.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    made = Store(str(request.param), request)
    yield made
    made.close()


class Workers:
    """Started Workers, stopped in teardown."""

    def __init__(self) -> None:
        self.started: list[Worker] = []

    def start(self, store: Store, broker: Broker, recorder: Recorder,
              handler: Callable[[Any, TaskContext], Any], prefetch: int) -> Worker:  # fmt: skip
        # An overrunning handler (see the module docstring): cancelled at half a lease,
        # it runs on until it returns; one attempt, so it is dead-lettered, never retried.
        rt = type_runtime(
            "t", handler, limit=1, timeout_s=VISIBILITY_S / 2, interrupt=False,
            retry=plan(max_attempts=1),
        )  # fmt: skip
        worker = Worker(
            broker,
            {"t": rt},
            threads=1,
            events=EventBus([recorder]),
            visibility_timeout_s=VISIBILITY_S,
            prefetch=prefetch,
            settle_in_background=store.kind != "memory",  # as the app does
        )
        worker.start()
        self.started.append(worker)
        return worker


@pytest.fixture
def workers() -> Iterator[Workers]:
    made = Workers()
    yield made
    for worker in made.started:
        worker.stop(grace_s=1.0)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def leased(broker: Broker) -> int:
    return sum(depth.leased for depth in broker.depth().values())


def test_held_tasks_outlive_several_leases_and_are_never_handed_out_again(
    store: Store, workers: Workers
) -> None:
    """One task runs (overrunning) and two wait in the prefetch buffer behind it, all for
    HOLD_S (3.5 leases): the other consumer gets none of them, and each runs exactly once."""
    broker, other = store.open(), store.open()
    recorder = Recorder()
    release = threading.Event()
    runs: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(payload: Any, ctx: TaskContext) -> None:
        with lock:
            runs[payload] += 1
        if payload == "long":
            release.wait(HOLD_S * 3)  # ignores ctx.cancelled: overruns

    broker.put_many([Task("t", "long"), Task("t", "a"), Task("t", "b")])
    workers.start(store, broker, recorder, handler, prefetch=2)  # holds 1 + 2: all three
    wait_until(lambda: runs["long"] == 1 and leased(other) == 3, "the worker holds all three")

    stolen: list[Delivery] = []
    held_until = time.monotonic() + HOLD_S
    while time.monotonic() < held_until:
        stolen += other.get({"t": 10}, 10, 0)
        time.sleep(POLL_S)
    assert stolen == [], "handed out again while the worker held it"
    assert runs == Counter({"long": 1}), "the prefetched tasks started while the first ran"

    release.set()
    recorder.wait_for(lambda: recorder.finished() == 3)
    assert other.get({"t": 10}, 10, 0) == []
    time.sleep(0.1)  # a second run would show up here
    assert runs == Counter({"long": 1, "a": 1, "b": 1})
    assert [e.attempt for e in recorder.named("task.started")] == [1, 1, 1]
    assert recorder.named("task.lease_lost") == []
    [dead] = recorder.named("task.dead")
    assert dead.error_type == "TimeoutError"  # the overrunning one, settled under its lease
    assert len(recorder.named("task.succeeded")) == 2
    assert sum(depth.total for depth in other.depth().values()) == 0


class Renewals:
    """Wraps one broker's ``extend``, and records every settle it is sent.

    Once ``stall`` is set, the next renewal waits until ``resume`` is set (a broker slow to
    answer, a network partition), then goes through to the broker."""

    def __init__(self, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stall = threading.Event()
        self.stalled = threading.Event()
        self.resume = threading.Event()
        self.stalled_with: list[Delivery] = []
        self.stalled_answers: list[Answer] = []  # the broker's answers to the stalled renewal
        self.settled: set[str] = set()  # receipts
        self._extend = broker.extend
        monkeypatch.setattr(broker, "extend", self.extend)
        for name in ("ack", "retry", "dead", "release"):
            monkeypatch.setattr(broker, name, self._spy_one(getattr(broker, name)))
        settle_many, exchange = broker.settle_many, broker.exchange

        def spy_settle_many(ops: Sequence[Any]) -> Any:
            self.settled.update(op.delivery.receipt for op in ops)
            return settle_many(ops)

        def spy_exchange(ops: Sequence[Any], *args: Any) -> Any:
            self.settled.update(op.delivery.receipt for op in ops)
            return exchange(ops, *args)

        monkeypatch.setattr(broker, "settle_many", spy_settle_many)
        monkeypatch.setattr(broker, "exchange", spy_exchange)

    def _spy_one(self, call: Callable[..., Answer]) -> Callable[..., Answer]:
        def spy(delivery: Delivery, *args: Any) -> Answer:
            self.settled.add(delivery.receipt)
            return call(delivery, *args)

        return spy

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]:
        if not self.stall.is_set() or self.stalled.is_set():
            return self._extend(deliveries)
        self.stalled_with = list(deliveries)
        self.stalled.set()
        self.resume.wait(30)
        self.stalled_answers = self._extend(deliveries)
        return self.stalled_answers


def test_a_fenced_renewal_drops_the_prefetched_task_unrun_and_unsettled(
    store: Store, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's renewal stalls past the lease; another consumer takes both tasks (the
    running one and the prefetched one) and acks them (DONE). When the renewal goes through,
    the broker answers FENCED: the prefetched task is dropped without being run, acked or
    released (task.lease_lost), and the running one's own settle is fenced too."""
    broker, other = store.open(), store.open()
    renewals = Renewals(broker, monkeypatch)
    recorder = Recorder()
    release = threading.Event()
    ran: list[Any] = []

    def handler(payload: Any, ctx: TaskContext) -> None:
        ran.append(payload)
        if payload == "first":
            release.wait(30)  # ignores ctx.cancelled: overruns

    first, second = Task("t", "first"), Task("t", "second")
    broker.put_many([first, second])
    workers.start(store, broker, recorder, handler, prefetch=1)  # holds 1 + 1: both
    wait_until(lambda: ran == ["first"] and leased(other) == 2, "the worker holds both")

    renewals.stall.set()
    assert renewals.stalled.wait(5), "the worker never asked the broker to renew its leases"
    assert {d.task.id for d in renewals.stalled_with} == {first.id, second.id}
    mine = {d.task.payload: d for d in renewals.stalled_with}

    taken: list[Delivery] = []

    def take() -> bool:
        taken.extend(other.get({"t": 10}, 10, 0))
        return len(taken) >= 2

    wait_until(take, "the other consumer takes both once their leases expire")
    assert {d.task.id for d in taken} == {first.id, second.id}
    assert all(d.redelivered and d.task.attempt == 2 for d in taken)
    assert [other.ack(d) for d in taken] == [Answer.DONE, Answer.DONE]

    renewals.resume.set()
    recorder.wait_for(
        lambda: any(e.task_id == second.id for e in recorder.named("task.lease_lost"))
    )
    assert renewals.stalled_answers == [Answer.FENCED, Answer.FENCED]
    release.set()
    [worker] = workers.started
    recorder.wait_for(
        lambda: any(e.detail and e.detail.startswith("dead refused") for e in recorder.events)
    )  # the first task's own settle (dead-lettered: it overran) is fenced too
    wait_until(worker.idle, "the worker holds nothing")
    time.sleep(0.1)  # a late start would show up here
    assert ran == ["first"], "the fenced prefetched task ran"
    assert [e.task_id for e in recorder.named("task.started")] == [first.id]
    assert mine["second"].receipt not in renewals.settled, "the worker settled a fenced task"
    lost = recorder.named("task.lease_lost")
    # Each lost lease once: the prefetched task's by the renewal that dropped it, the running
    # one's by its refused settle (not also by the renewal).
    assert sorted((e.task_id, e.detail) for e in lost) == sorted(
        [(second.id, "extend refused"), (first.id, "dead refused: another delivery owns the task")]
    )
    assert recorder.named("task.succeeded") == recorder.named("task.dead") == []
    assert sum(depth.total for depth in other.depth().values()) == 0
