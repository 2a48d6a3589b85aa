"""The whole engine on the memory broker over a dead-letter store that fails now and then (a
`file` store on a disk that is full at times): tasks that succeed, that succeed after a retry,
and that die, through 4 worker threads. Audited at the end: nothing wedges (every task leaves
the broker), every task that must die is a dead letter exactly once, no healthy task is one, and
every outcome reaches the summary once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from runner.app import build_runtime
from runner.brokers.base import DeadLetterFilter
from runner.brokers.memory import MemoryBroker
from runner.config.models import PipelineConfig
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import BrokerUnavailable
from runner.model import DeadLetter
from tests.integration.audit_handlers import read_runs

HERE = Path(__file__).resolve().parent


class FlakyStore(MemoryDeadLetters):
    """Writes fail (as the file store says a full disk does) with probability ``rate``."""

    def __init__(self, rate: float, seed: int) -> None:
        super().__init__()
        self.rate = rate
        self.failed = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def _write(self) -> None:
        with self._lock:
            failing = self._random.random() < self.rate
            self.failed += failing
        if failing:
            raise BrokerUnavailable("dead-letter file: cannot write: No space left on device")

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        self._write()
        super().add_many(records)

    def add(self, record: DeadLetter) -> None:
        self.add_many([record])


def test_a_store_that_fails_now_and_then_loses_wedges_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": "memory", "capacity": 1000, "visibility_timeout": 5.0},
            "workers": 4,
            "handler_paths": [str(HERE.parent.parent)],
            "retry": {"max_attempts": 2, "backoff": {"initial": 0.01, "max": 0.02}},
            "task_types": {"work": {"handler": "tests.integration.audit_handlers:work"}},
            "metrics": {"enabled": False},
            "logging": {"level": "ERROR"},
        }
    )
    store = FlakyStore(rate=0.5, seed=7)
    broker = MemoryBroker(
        capacity=1000,
        enqueue_timeout=1.0,
        overflow="block",
        visibility_timeout=5.0,
        dead_letters=store,
    )
    runner = build_runtime(config, broker=broker, observe=False)
    audit = str(tmp_path)
    # fail: 0 succeeds at once, 1 after a retry, 9 never (dead after its 2 attempts)
    plan = {i: random.Random(i).choice([0, 0, 1, 9]) for i in range(200)}
    with runner:
        ids = {
            runner.publish("work", {"audit": audit, "fail": fail, "n": i}): fail
            for i, fail in plan.items()
        }
        deadline = time.monotonic() + 60
        while _held(broker) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {t: d for t, d in broker.depth().items() if d.ready + d.delayed + d.leased}
        store.rate = 0.0  # the shutdown drain writes whatever is left: let it
    assert not left, f"wedged: {left} still in the broker"
    assert store.failed > 10  # the store did fail, often

    dead = [r.id for r in MemoryDeadLetters.records(store, DeadLetterFilter())]
    must_die = {task_id for task_id, fail in ids.items() if fail >= 2}
    assert sorted(dead) == sorted(must_die)  # each once, and no healthy task

    runs = read_runs(tmp_path)
    returned = {r.id for r in runs if r.end is not None}
    assert returned == {task_id for task_id, fail in ids.items() if fail < 2}
    totals = runner.summary.to_dict()["totals"]
    assert (totals["succeeded"], totals["dead"]) == (len(ids) - len(must_die), len(must_die))


def _held(broker: MemoryBroker) -> int:
    return sum(d.ready + d.delayed + d.leased for d in broker.depth().values())
