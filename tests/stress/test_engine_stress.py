"""Every published task ends exactly once under a thread-switch storm (our stand-in for -race)."""

from __future__ import annotations

import random
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from runner.brokers.base import DeadLetterFilter
from runner.model import TaskContext
from tests.unit.engine_kit import Engine, plan, type_runtime


@pytest.fixture
def switch_storm() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_thousand_tasks_each_end_exactly_once(switch_storm: None) -> None:
    lock = threading.Lock()
    succeeded: Counter[str] = Counter()

    def make(type_name: str, failure_rate: float) -> Any:
        def handler(payload: Any, ctx: TaskContext) -> None:
            rng = random.Random(f"{payload}:{ctx.attempt}")
            if rng.random() < failure_rate:
                raise RuntimeError("random failure")
            with lock:
                succeeded[ctx.task_id] += 1

        return handler

    types = [
        type_runtime("a", make("a", 0.2), limit=2, retry=plan(max_attempts=3, initial=0.001)),
        type_runtime("b", make("b", 0.5), limit=3, retry=plan(max_attempts=2, initial=0.001)),
        type_runtime("c", make("c", 0.0), limit=1),
    ]
    engine = Engine(types, threads=4, capacity=20_000)
    try:
        rng = random.Random(3)
        n = 10_000
        published = [engine.publish(rng.choice("abc"), i) for i in range(n)]
        engine.wait_finished(n, timeout=240)
    finally:
        engine.stop(grace=2.0)
    dead = Counter(r.id for r in engine.dead_letters.records(DeadLetterFilter()))
    assert all(count == 1 for count in succeeded.values())
    assert all(count == 1 for count in dead.values())
    assert not set(succeeded) & set(dead), "a task both succeeded and died"
    assert set(succeeded) | set(dead) == set(published), "a task was lost"
    assert len(dead) > 0, "the workload never dead-lettered anything"
