"""A third-party broker and dead-letter store, written as a user writes one outside this package.

Configured by ``module:Class`` (``broker: {kind: "tests.unit.plugin_brokers:WrappedBroker"}``);
tests/unit/test_broker_plugins.py and the tests/cli/invalid corpus use them. ``WrappedBroker``
subclasses BaseBroker and implements only the single calls (handed to a MemoryBroker inside),
so ``settle_many`` and ``exchange`` are BaseBroker's defaults; it counts the settles that reach
``settle_many`` (``exchange`` sends its settles there too).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Literal

from runner.brokers.base import Answer, BaseBroker, Delivery, Depth, Settle
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.deadletter.store import DeadLetterStore
from runner.model import AttemptRecord, DeadLetter, Task

#: Every WrappedBroker built, in order (tests read the one a pipeline built).
BUILT: list[WrappedBroker] = []


class WrappedBroker(BaseBroker):
    """In-process like memory (not durable, not shared, settles inline), with one option."""

    durable = False
    shared = False
    batch_settles = False

    def __init__(
        self,
        capacity: int,
        enqueue_timeout: float,
        overflow: Literal["block", "reject"],
        visibility_timeout: float,
        dead_letters: DeadLetterStore | None = None,
        label: str = "",
    ) -> None:
        self.label = label
        self.dead_letters = dead_letters  # as given: only a broker that is not durable gets one
        self.inner = MemoryBroker(
            capacity,
            enqueue_timeout,
            overflow,
            visibility_timeout,
            dead_letters or MemoryDeadLetters(),
        )
        self.batched_settles = 0
        self._lock = threading.Lock()
        BUILT.append(self)

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        with self._lock:
            self.batched_settles += len(ops)
        return super().settle_many(ops)

    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None:
        self.inner.put_many(tasks, timeout)

    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]:
        return self.inner.get(slots, limit, timeout)

    def ack(self, delivery: Delivery) -> Answer:
        return self.inner.ack(delivery)

    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer:
        return self.inner.retry(delivery, delay_s, failure)

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer:
        return self.inner.dead(delivery, record)

    def release(self, delivery: Delivery) -> Answer:
        return self.inner.release(delivery)

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]:
        return self.inner.extend(deliveries)

    def wake(self) -> None:
        self.inner.wake()

    def depth(self) -> dict[str, Depth]:
        return self.inner.depth()

    def close(self) -> None:
        self.inner.close()


class BatchingBroker(WrappedBroker):
    """Asks for its settles in batches, as a broker whose calls cost a round trip."""

    batch_settles = True


class SharedBroker(WrappedBroker):
    """Says other processes may reach it (it has no operator side, though)."""

    shared = True


class DurableBroker(WrappedBroker):
    """Says it outlives the process, so it keeps its own dead letters and is given no store."""

    durable = True
    shared = True


class FlaglessBroker:
    """Declares no capability flags (and does not subclass BaseBroker)."""


class NotABroker:
    """Declares the flags but none of the calls."""

    durable = False
    shared = False
    batch_settles = False
    carry_settles = False
    gates_in_get = False
    settle_effects = False


class TaggedDeadLetters(MemoryDeadLetters):
    """A dead-letter store of one's own, with one option."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self.tag = tag
