"""Without a prefetch buffer, idle worker threads fetch for themselves, one at a time for all
of them: their fetches never over-fetch, survive broker errors, and strand nothing at shutdown.

The broker is the memory broker with a slowed-down ``exchange`` (the call idle threads make),
so that fetches under way are long enough to overlap and to be caught mid-flight.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from runner.brokers.base import Delivery, Settle
from runner.engine import books as books_module
from runner.errors import BrokerUnavailable
from runner.model import Task, TaskContext
from tests.unit.engine_kit import Engine, type_runtime, wait_until, watch_gets

Exchange = Callable[[Sequence[Settle], Mapping[str, int], int], tuple[list[bool], list[Delivery]]]


class SlowExchange:
    """Wraps broker.exchange: takes ``delay_s`` longer, and records who called, how many
    settles each call carried, and how many worker threads' calls were under way at once."""

    def __init__(self, exchange: Exchange, delay_s: float) -> None:
        self._exchange = exchange
        self._delay_s = delay_s
        self._lock = threading.Lock()
        self.threads_in_flight = 0
        self.most_threads_in_flight = 0
        self.callers: set[str] = set()
        self.carried: list[int] = []
        self.after: Callable[[list[Delivery]], None] = lambda deliveries: None

    def __call__(
        self, ops: Sequence[Settle], slots: Mapping[str, int], limit: int
    ) -> tuple[list[bool], list[Delivery]]:
        name = threading.current_thread().name
        by_thread = name.startswith("dq-worker-")
        with self._lock:
            self.threads_in_flight += by_thread
            self.most_threads_in_flight = max(self.most_threads_in_flight, self.threads_in_flight)
            self.callers.add(name)
            self.carried.append(len(ops))
        try:
            time.sleep(self._delay_s)
            answers, deliveries = self._exchange(ops, slots, limit)
            self.after(deliveries)
            return answers, deliveries
        finally:
            with self._lock:
                self.threads_in_flight -= by_thread


def slow_exchange(engine: Engine, delay_s: float) -> SlowExchange:
    wrapper = SlowExchange(engine.broker.exchange, delay_s)
    engine.broker.exchange = wrapper  # type: ignore[method-assign]
    return wrapper


def short_random_sleep(payload: Any, ctx: TaskContext) -> None:
    time.sleep(random.uniform(0.0, 0.01))


@pytest.mark.parametrize("background", [False, True])
def test_idle_threads_fetch_for_themselves_one_at_a_time_for_all(
    engines: list[Engine], background: bool
) -> None:
    """Threads that go idle while a fetch is under way do not start their own: the next fetch
    carries their settles and fetches for them too (one round trip or transaction per batch)."""
    engine = Engine(
        [type_runtime("t", short_random_sleep, limit=4)],
        threads=4,
        prefetch=0,
        settle_in_background=background,
    )
    engines.append(engine)
    wrapper = slow_exchange(engine, 0.03)
    for _ in range(60):
        engine.publish("t")
    engine.wait_finished(60, timeout=30)
    assert any(name.startswith("dq-worker-") for name in wrapper.callers)
    assert wrapper.most_threads_in_flight == 1
    if background:  # inline, each thread settles before it fetches
        assert max(wrapper.carried) >= 2


def test_fetches_under_way_at_once_never_over_fetch(engines: list[Engine]) -> None:
    """Each fetch asks only for room no other fetch under way was promised: what the broker
    has handed out stays within the worker's bounds (settling inline, so that every leased
    task is held by the worker or on its way to it)."""
    engine = Engine(
        [
            type_runtime("a", short_random_sleep, limit=1),
            type_runtime("b", short_random_sleep, limit=3),
        ],
        threads=3,
        prefetch=0,
        settle_in_background=False,
    )
    engines.append(engine)
    wrapper = slow_exchange(engine, 0.01)
    seen: list[tuple[int, int]] = []
    wrapper.after = lambda deliveries: seen.append(
        (engine.broker.depth()["a"].leased, engine.broker.depth()["b"].leased)
    )
    for _ in range(40):
        engine.publish("a")
        engine.publish("b")
    engine.wait_finished(80, timeout=30)
    assert seen, "no thread fetched for itself"
    assert max(a for a, _ in seen) <= 1  # no buffer: each type holds its limit at most
    assert max(b for _, b in seen) <= 3
    assert max(a + b for a, b in seen) <= 3  # and the process its threads


def test_with_a_prefetch_buffer_threads_make_only_the_blocking_get(engines: list[Engine]) -> None:
    """With a buffer, the dispatcher fills it (every exchange is its own); a worker thread
    fetches only as the leader: the blocking get for an empty buffer, made by an idle thread
    so that the task it brings needs no second hand-off. Every task came through one of
    those."""
    engine = Engine([type_runtime("t", short_random_sleep, limit=2)], threads=2, prefetch=4)
    engines.append(engine)
    fetched: list[tuple[str, str, int]] = []  # (call, thread, deliveries)
    wrapper = slow_exchange(engine, 0.0)
    wrapper.after = lambda deliveries: fetched.append(
        ("exchange", threading.current_thread().name, len(deliveries))
    )
    watch_gets(
        engine,
        lambda deliveries: fetched.append(
            ("get", threading.current_thread().name, len(deliveries))
        ),
    )
    for _ in range(20):
        engine.publish("t")
    engine.wait_finished(20, timeout=20)
    assert {name for call, name, _ in fetched if call == "exchange"} <= {"dq-dispatcher"}
    assert any(name.startswith("dq-worker-") for call, name, _ in fetched if call == "get")
    assert sum(n for _, _, n in fetched) == 20


def test_an_idle_worker_runs_what_its_own_get_brought(engines: list[Engine]) -> None:
    """Idle threads, an empty buffer: the task published next is fetched by a worker thread
    (the leader) and run by that same thread, one hand-off from publish to start, never by
    the dispatcher's get and a second thread."""
    getters: dict[str, str] = {}  # task id -> the thread whose get brought it
    runners: dict[str, str] = {}  # task id -> the thread that ran it

    def record(payload: Any, ctx: TaskContext) -> None:
        runners[ctx.task_id] = threading.current_thread().name

    engine = Engine([type_runtime("t", record, limit=4)], threads=4, prefetch=4)
    engines.append(engine)

    def seen(deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            getters[delivery.task.id] = threading.current_thread().name

    watch_gets(engine, seen)
    for n in range(1, 11):
        engine.wait_quiet()  # every thread idle: one of them waits in the broker's get
        engine.publish("t")
        engine.wait_finished(n)
    assert runners.keys() == getters.keys()
    assert all(getters[i].startswith("dq-worker-") for i in getters), getters
    assert all(runners[i] == getters[i] for i in getters), (getters, runners)


def test_the_leader_takes_its_task_without_waking_the_parked_dispatcher(
    engines: list[Engine],
) -> None:
    """While a worker thread leads, the dispatcher is parked; the leader taking the task its
    get brought leaves the next wait to an idle thread and the dispatcher parked (nor does a
    task's end wake it while a thread leads or the offer to lead stands):
    waking it there costs a thread wake-up on the way from publish to start, and all it would
    do is park again. So, task after task, the dispatcher takes no step while a handler runs
    (but for the few below)."""
    running = threading.Event()
    steps_while_running = 0
    handlers = 20

    def hold(payload: Any, ctx: TaskContext) -> None:
        running.set()
        time.sleep(0.05)
        running.clear()

    engine = Engine([type_runtime("t", hold, limit=4)], threads=4, prefetch=4)
    engines.append(engine)
    books = engine.worker.books
    step = books.dispatch_step

    def counted_step() -> Any:
        nonlocal steps_while_running
        steps_while_running += running.is_set()
        return step()

    books.dispatch_step = counted_step  # type: ignore[method-assign]
    for n in range(1, handlers + 1):
        engine.wait_quiet()  # every thread idle: one of them leads, the dispatcher is parked
        engine.publish("t")
        engine.wait_finished(n)
    # Woken by each take, the dispatcher stepped in every one of the 20 handlers. Left
    # parked, it steps in a few: a parked wait of GET_TIMEOUT_S ends in one at most once a
    # second, and the lead changes hands less neatly on a loaded machine (0-2 of 20 here,
    # up to 5 with two CPU burners).
    assert steps_while_running < handlers // 2, steps_while_running


def test_the_leader_wakes_nobody_on_its_way_to_its_task(engines: list[Engine]) -> None:
    """On the memory broker with nothing due by the clock, the leader taking the task its get
    brought leaves the next wait for the next thread to idle: no thread is woken (a wake-up
    costs the thread that sends it 3-15 us, between the publish and the task's start), none
    leads while its handler runs, and when its task is done it leads again itself."""
    seen: list[tuple[int, bool, int]] = []  # (signalled, leading, sleeping) in the handler

    def look(payload: Any, ctx: TaskContext) -> None:
        with engine.worker.books.observe() as books:
            seen.append((books.signalled, books.leading, books.sleeping))

    engine = Engine([type_runtime("t", look, limit=4)], threads=4, prefetch=4)
    engines.append(engine)
    for n in range(1, 6):
        engine.wait_quiet()  # every thread idle: one of them leads
        engine.publish("t")
        engine.wait_finished(n)
    assert seen == [(0, False, 3)] * 5


def holding_engine(engines: list[Engine]) -> tuple[Engine, dict[str, float], threading.Event]:
    """Three threads; each task's start (monotonic) by payload; a task whose payload is "long"
    holds its thread until the event is set."""
    release = threading.Event()
    started: dict[str, float] = {}

    def run(payload: Any, ctx: TaskContext) -> None:
        started[payload] = time.monotonic()
        if payload == "long":
            release.wait(10)

    engine = Engine([type_runtime("t", run, limit=3)], threads=3, prefetch=4)
    engines.append(engine)
    return engine, started, release


def test_a_task_published_while_the_leader_runs_starts_at_once(
    engines: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait the leader left for the next thread to idle is not left to chance: a task put
    while no get waits wakes a sleeping thread to fetch it (the broker's watch hook), so it
    starts while the leader's handler still runs, not when it ends (nor when the parked
    dispatcher looks again, a GET_TIMEOUT_S later: lengthened here so that only the hook can
    start it)."""
    monkeypatch.setattr(books_module, "GET_TIMEOUT_S", 30.0)
    engine, started, release = holding_engine(engines)
    try:
        engine.wait_quiet()
        engine.publish("t", "long")
        wait_until(lambda: "long" in started, "the long task started")
        put_at = time.monotonic()
        engine.publish("t", "short")
        wait_until(lambda: "short" in started, "the short task started", timeout=5)
        assert "short" in started and not release.is_set()
        assert started["short"] - put_at < 2.0
    finally:
        release.set()
    engine.wait_finished(2)


def test_a_delayed_task_starts_on_time_while_the_leader_runs(
    engines: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing calls the broker when a delayed task falls due, so while one waits the leader
    that takes a task still hands the wait on at once (no wait left for the next thread to
    idle): the delayed task starts on time, while the leader's handler runs."""
    monkeypatch.setattr(books_module, "GET_TIMEOUT_S", 30.0)
    engine, started, release = holding_engine(engines)
    try:
        engine.wait_quiet()
        put_at = time.monotonic()
        engine.broker.put_many([Task(type="t", payload="later", not_before=time.time() + 0.3)])
        engine.publish("t", "long")
        wait_until(lambda: "later" in started, "the delayed task started", timeout=5)
        assert not release.is_set()
        assert 0.25 < started["later"] - put_at < 2.0
    finally:
        release.set()
    engine.wait_finished(2)


def test_a_failing_fetch_leaves_the_work_to_the_dispatcher(engines: list[Engine]) -> None:
    engine = Engine([type_runtime("t", short_random_sleep, limit=2)], threads=2, prefetch=0)
    engines.append(engine)

    def unavailable(*args: Any) -> Any:
        raise BrokerUnavailable("down for this test")

    engine.broker.exchange = unavailable  # type: ignore[method-assign]
    for _ in range(6):
        engine.publish("t")
    engine.wait_finished(6, timeout=20)
    assert engine.worker.alive_threads() == 2


def test_stop_waits_for_a_fetch_under_way_and_hands_its_tasks_back(
    engines: list[Engine],
) -> None:
    engine = Engine(
        [type_runtime("t", short_random_sleep)],
        threads=1,
        prefetch=0,
        settle_in_background=False,
    )
    engines.append(engine)
    wrapper = slow_exchange(engine, 0.0)
    in_fetch = threading.Event()
    go_on = threading.Event()

    def hold(deliveries: list[Delivery]) -> None:
        if deliveries:
            in_fetch.set()
            go_on.wait(10)

    wrapper.after = hold
    # stop() waits for the threads' own fetches under way to end: note when it does so with
    # this one still under way.
    books = engine.worker.books
    wait_fetches_done = books.wait_fetches_done
    stop_waits = threading.Event()

    def watched(timeout: float) -> None:
        with books.observe() as now:
            if now.own_fetches:
                stop_waits.set()
        wait_fetches_done(timeout)

    books.wait_fetches_done = watched  # type: ignore[method-assign]
    for _ in range(3):
        engine.publish("t")
    assert in_fetch.wait(10), "the worker thread never fetched for itself"
    stopper = threading.Thread(target=engine.worker.stop, args=(5.0,), name="stopper")
    stopper.start()
    # Either stop() waits for the fetch (as it must), or it goes on and returns without it.
    wait_until(lambda: stop_waits.is_set() or not stopper.is_alive(), "stop() waits or returns")
    assert stop_waits.is_set(), "stop() did not wait for the fetch under way"
    go_on.set()
    stopper.join(10)
    assert not stopper.is_alive()
    depth = engine.broker.depth()["t"]
    assert depth.leased == 0  # the fetched task was handed back, not stranded
    assert depth.ready == 3 - engine.recorder.finished()
