"""Build a Worker on a MemoryBroker from plain closures, for engine tests."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from runner.brokers.base import Broker, Delivery
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.engine.books import View
from runner.engine.retry import RetryPlan
from runner.engine.worker import TypeRuntime, Worker
from runner.events import Event, EventBus
from runner.model import Task, TaskContext

#: How long a test waits for a condition before it fails: generous, as the machine running the
#: suite may be loaded (a condition that holds is usually met within milliseconds).
WAIT_S = 10.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; fail, naming ``what``, once ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def view(worker: Worker) -> View:
    """The worker's books at one moment."""
    with worker.books.observe() as books:
        return books


class Recorder:
    """Collects events; lets a test wait until a condition over them holds."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def handle(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def named(self, name: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.name == name]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, "timed out waiting for events"
                self._cond.wait(left)

    def finished(self) -> int:
        return sum(1 for e in self.events if e.name in ("task.succeeded", "task.dead"))


class Concurrency:
    """Measures, from inside handlers, how many run at once (per type and in all)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now: defaultdict[str, int] = defaultdict(int)
        self.peak: defaultdict[str, int] = defaultdict(int)
        self.total_now = 0
        self.total_peak = 0

    def enter(self, type_name: str) -> None:
        with self._lock:
            self.now[type_name] += 1
            self.total_now += 1
            self.peak[type_name] = max(self.peak[type_name], self.now[type_name])
            self.total_peak = max(self.total_peak, self.total_now)

    def leave(self, type_name: str) -> None:
        with self._lock:
            self.now[type_name] -= 1
            self.total_now -= 1


def plan(max_attempts: int = 3, initial: float = 0.01, maximum: float = 0.1,
         multiplier: float = 2.0, jitter: float = 0.0,
         never_retry: tuple[type[BaseException], ...] = ()) -> RetryPlan:  # fmt: skip
    return RetryPlan(
        max_attempts,
        initial=initial,
        maximum=maximum,
        multiplier=multiplier,
        jitter=jitter,
        never_retry=never_retry,
    )


def type_runtime(
    name: str,
    handler: Callable[[Any, TaskContext], Any],
    limit: int = 1,
    timeout_s: float = 5.0,
    interrupt: bool = True,
    retry: RetryPlan | None = None,
) -> TypeRuntime:
    return TypeRuntime(name, handler, limit, timeout_s, interrupt, retry or plan())


#: Whether Engine settles in the Settler's thread (as on durable brokers) or inline (as on the
#: memory broker); tests that must hold in both modes parametrize it (see test_engine.py).
SETTLE_IN_BACKGROUND = False


class Engine:
    """A started Worker over a MemoryBroker (or ``broker``); stop() in teardown."""

    def __init__(
        self,
        types: list[TypeRuntime],
        threads: int = 3,
        capacity: int = 100_000,
        visibility_timeout: float = 30.0,
        settle_in_background: bool | None = None,
        prefetch: int | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.recorder = Recorder()
        self.dead_letters = MemoryDeadLetters()
        if broker is None:
            broker = MemoryBroker(
                capacity=capacity,
                enqueue_timeout=5.0,
                overflow="block",
                visibility_timeout=visibility_timeout,
                dead_letters=self.dead_letters,
            )
        self.broker = broker
        self.worker = Worker(
            self.broker,
            {t.name: t for t in types},
            threads=threads,
            events=EventBus([self.recorder]),
            visibility_timeout_s=visibility_timeout,
            prefetch=prefetch,
            settle_in_background=(
                SETTLE_IN_BACKGROUND if settle_in_background is None else settle_in_background
            ),
        )
        self.worker.start()

    def publish(self, type_name: str, payload: Any = None) -> str:
        task = Task(type=type_name, payload=payload, enqueued_at=time.time())
        self.broker.put_many([task])
        return task.id

    def wait_finished(self, n: int, timeout: float = 20.0) -> None:
        self.recorder.wait_for(lambda: self.recorder.finished() >= n, timeout)

    def quiet(self) -> bool:
        """Whether nothing is left to run: the broker holds no task (ready, delayed or leased),
        the worker none (prefetched, running or being settled), and every thread waits for work.
        From then on nothing runs until a task is published, and every run so far has ended
        and emitted its outcome: a run twice, or a retry too many, is in the counts by now."""
        # The books held still while the broker is asked (brokers never take the books' lock),
        # so both answers describe one moment.
        with self.worker.books.observe() as books:
            if books.held or books.settling or books.sleeping + books.leading < books.threads:
                return False
            return all(depth.total == 0 for depth in self.broker.depth().values())

    def wait_quiet(self, timeout: float = WAIT_S) -> None:
        wait_until(self.quiet, "the broker and the worker hold nothing", timeout)

    def done_fetching(self) -> bool:
        """Whether the worker fetches no more: no fetch is under way and none is due, or the
        one under way waits for types the broker has no task of. While no task ends and none
        is published, the worker holds all it will (an over-fetch has happened by now)."""
        with self.worker.books.observe() as books:  # as in quiet()
            if not books.reserved:
                return not books.fetch_due
            if not books.blocked_in_get:
                return False
            depth = self.broker.depth()
            return all(name not in depth or not depth[name].ready for name in books.asking)

    def stop(self, grace: float = 5.0) -> int:
        forced = self.worker.stop(grace)
        self.broker.close()
        return forced


def watch_gets(engine: Engine, seen: Callable[[list[Delivery]], None]) -> None:
    """Wrap the engine's broker.get so that ``seen`` gets what each call brought (on the
    calling thread), and return once the wrapped get is the one waiting: the get already
    blocked in the unwrapped one is ended (a wake is sticky, so this holds even if it is not
    waiting yet)."""
    get = engine.broker.get
    wrapped_get_called = threading.Event()

    def watched_get(slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]:
        wrapped_get_called.set()
        deliveries = get(slots, limit, timeout)
        seen(deliveries)
        return deliveries

    engine.broker.get = watched_get  # type: ignore[method-assign]
    engine.broker.wake()
    assert wrapped_get_called.wait(10), "no idle thread is waiting in get for work"
