"""On Redis a worker's settles go apart from its fetches (``RedisBroker.carry_settles`` is False).

The dispatcher hands the settles that waited for its fetch to the Settler's thread as it
fetches, and the fetch goes alone, so the settle script's round trip and the claim's overlap
(docs/performance.md). Every task is still acked exactly once, by ``settle_many``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from runner.brokers.base import Answer, Settle
from runner.brokers.redis.broker import RedisBroker
from runner.engine.worker import Worker
from runner.events import EventBus
from runner.model import Task
from tests.integration.conftest import MakeBroker
from tests.unit.engine_kit import Recorder, type_runtime

pytestmark = pytest.mark.redis

TASKS = 400


def test_a_redis_worker_sends_no_settle_along_with_a_fetch(
    make_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    carried: list[int] = []  # settles per exchange call
    settled: list[str] = []  # task ids acked by settle_many, in order
    exchange, settle_many = RedisBroker.exchange, RedisBroker.settle_many

    def recording_exchange(self: RedisBroker, ops: Sequence[Settle], *args: Any) -> Any:
        carried.append(len(ops))
        return exchange(self, ops, *args)

    def recording_settle_many(self: RedisBroker, ops: Sequence[Settle]) -> list[Answer]:
        answers = settle_many(self, ops)
        settled.extend(
            op.delivery.task.id for op, a in zip(ops, answers, strict=True) if a is Answer.DONE
        )
        return answers

    monkeypatch.setattr(RedisBroker, "exchange", recording_exchange)
    monkeypatch.setattr(RedisBroker, "settle_many", recording_settle_many)
    broker = make_broker(capacity=TASKS)
    assert not broker.carry_settles
    tasks = [Task("t", i) for i in range(TASKS)]
    broker.put_many(tasks)
    recorder = Recorder()
    worker = Worker(
        broker,
        {"t": type_runtime("t", lambda payload, ctx: None, limit=4)},
        threads=4,
        events=EventBus([recorder]),
        visibility_timeout_s=5.0,
        settle_in_background=True,  # as the app does on every built-in broker
    )
    worker.start()
    try:
        recorder.wait_for(lambda: recorder.finished() >= TASKS, 30.0)
    finally:
        worker.stop(5.0)
    assert sum(carried) == 0  # no fetch carried a settle
    assert sorted(settled) == sorted(task.id for task in tasks)  # each acked once, apart
