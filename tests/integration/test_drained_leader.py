"""The leader on brokers of many processes (SQLite, Redis): while the queue is drained, an idle
worker thread makes the blocking get and runs what it brings (one thread hand-off from publish
to start, not two); under a backlog the dispatcher keeps fetching ahead in batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.brokers.base import Broker, Delivery
from runner.brokers.sqlite.broker import SqliteBroker
from runner.engine.books import Reservation, _came_back_drained
from runner.model import Task, TaskContext
from tests.integration.conftest import MakeBroker
from tests.unit.engine_kit import Engine, type_runtime, watch_gets

MakeShared = Callable[[], Broker]


@pytest.fixture(params=["sqlite", "redis"])
def make_shared(request: pytest.FixtureRequest, tmp_path: Path) -> MakeShared:
    if request.param == "sqlite":
        return lambda: SqliteBroker(str(tmp_path / "q.db"), 10_000, 1.0, "block", 30.0)
    make_broker: MakeBroker = request.getfixturevalue("make_broker")
    return lambda: make_broker(capacity=10_000, visibility_timeout=30.0)


def test_an_idle_worker_runs_what_its_own_get_brought(
    make_shared: MakeShared, engines: list[Engine]
) -> None:
    """Tasks published one at a time to idle threads: once a fetch found the queue drained,
    each is fetched by a worker thread (the leader) and run by that same thread. Without the
    leader every get is the dispatcher's, and another thread runs what it brought."""
    getters: dict[str, str] = {}  # task id -> the thread whose get brought it
    runners: dict[str, str] = {}  # task id -> the thread that ran it

    def record(payload: Any, ctx: TaskContext) -> None:
        runners[ctx.task_id] = threading.current_thread().name

    engine = Engine(
        [type_runtime("t", record, limit=4)], threads=4, prefetch=4, broker=make_shared()
    )
    engines.append(engine)

    def seen(deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            getters[delivery.task.id] = threading.current_thread().name

    watch_gets(engine, seen)
    ids = []
    for n in range(1, 11):
        engine.wait_quiet()  # every thread idle, the queue drained
        ids.append(engine.publish("t"))
        engine.wait_finished(n)
    later = ids[2:]  # the first may come before any fetch found the queue drained
    assert all(getters[i].startswith("dq-worker-") for i in later), getters
    assert all(runners[i] == getters[i] for i in later), (getters, runners)


def test_under_a_backlog_the_dispatcher_fetches_ahead(
    make_shared: MakeShared, engines: list[Engine]
) -> None:
    """While tasks wait in the queue, fetches come back full and the dispatcher keeps the
    wait: a worker thread leads only once a fetch found the queue drained. So one worker
    thread's get at most comes back full: the leader's that met the burst on an idle worker
    (with a leader always on, threads keep fetching: most gets would be theirs, and full)."""
    gets: list[tuple[str, int, int]] = []  # (thread, tasks brought, room)
    engine = Engine(
        [type_runtime("t", lambda payload, ctx: None, limit=4)],
        threads=4,
        prefetch=4,
        broker=make_shared(),
    )
    engines.append(engine)
    get = engine.broker.get

    def watched_get(slots: Any, limit: int, timeout: float) -> list[Delivery]:
        deliveries = get(slots, limit, timeout)
        gets.append((threading.current_thread().name, len(deliveries), limit))
        return deliveries

    engine.broker.get = watched_get  # type: ignore[method-assign]
    engine.broker.wake()  # the get under way returns; the next one is watched
    engine.broker.put_many([Task(type="t", payload=None, enqueued_at=time.time())
                            for _ in range(2000)])  # fmt: skip
    engine.wait_finished(2000, timeout=60)
    full = [name for name, n, room in gets if name.startswith("dq-worker-") and n >= room]
    assert len(full) <= 1, gets


def test_a_fetch_is_drained_when_no_type_it_asked_for_filled_its_slots() -> None:
    def fetch(*types: str) -> list[Delivery]:
        return [Delivery(Task(type=name, payload=None), receipt=str(i))
                for i, name in enumerate(types)]  # fmt: skip

    room = Reservation({"busy": 2, "idle": 2}, 8)
    assert _came_back_drained(fetch("busy"), room)
    assert not _came_back_drained(fetch("busy", "busy"), room)  # a busy type filled its slots
    assert not _came_back_drained(fetch(*["busy", "idle"] * 4), Reservation({"busy": 9}, 8))
    assert _came_back_drained([], room)
