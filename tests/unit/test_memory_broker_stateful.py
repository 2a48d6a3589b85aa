"""A hypothesis state machine drives the memory broker against a small model of its contract.

The clock is fake and every get is non-blocking, so each step is deterministic. The model mirrors
the broker's lazy reclaim: expired leases and due delays take effect at the next get or depth.
It also models the settled receipts: an op under a receipt settled less than a visibility
timeout ago answers ALREADY_DONE, any other op that finds no lease answers FENCED.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from runner.brokers.base import Answer, DeadLetterFilter, Delivery, Depth
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import QueueFull
from runner.model import AttemptRecord, DeadLetter, Task

CAPACITY = 5
VISIBILITY = 1.0
TYPES = ("a", "b")


@dataclass
class Modelled:
    """What the model knows about one task."""

    type: str
    order: int  # put order, for FIFO among never-delivered tasks
    state: str = "ready"  # ready | delayed | leased | done | dead
    attempt: int = 0
    receipt: str | None = None
    redelivered_next: bool = False
    due: float = 0.0  # delayed: not_before; leased: lease expiry
    handed_out: bool = False
    history: list[int] = field(default_factory=list)


class MemoryBrokerMachine(RuleBasedStateMachine):
    deliveries = Bundle("deliveries")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.store = MemoryDeadLetters()
        self.broker = MemoryBroker(
            capacity=CAPACITY,
            enqueue_timeout=0,
            overflow="block",
            visibility_timeout=VISIBILITY,
            dead_letters=self.store,
            clock=lambda: self.now,
        )
        self.tasks: dict[str, Modelled] = {}
        self.put_count = 0
        self.settled: dict[str, float] = {}  # receipt -> when its settle took effect

    # -- model helpers -------------------------------------------------------------------------

    def held(self) -> int:
        return sum(t.state in ("ready", "delayed", "leased") for t in self.tasks.values())

    def reclaim(self) -> None:
        for t in self.tasks.values():
            if t.state == "delayed" and t.due <= self.now:
                t.state = "ready"
            elif t.state == "leased" and t.due <= self.now:
                t.state, t.receipt, t.redelivered_next = "ready", None, True

    def current(self, d: Delivery) -> Modelled | None:
        t = self.tasks[d.task.id]
        return t if t.state == "leased" and t.receipt == d.receipt else None

    def answer(self, d: Delivery) -> Answer:
        """What a settle or renewal under ``d``'s receipt must answer now."""
        if self.current(d) is not None:
            return Answer.DONE
        at = self.settled.get(d.receipt)
        if at is not None and at > self.now - VISIBILITY:
            return Answer.ALREADY_DONE
        return Answer.FENCED

    def settle(self, d: Delivery, answer: Answer) -> Modelled | None:
        """Check ``answer`` against the model; the task if the settle took effect now."""
        assert answer is self.answer(d)
        if answer is not Answer.DONE:
            return None
        self.settled[d.receipt] = self.now
        return self.tasks[d.task.id]

    # -- rules ---------------------------------------------------------------------------------

    @rule(type_=st.sampled_from(TYPES), n=st.integers(1, 3))
    def put(self, type_: str, n: int) -> None:
        tasks = [Task(type=type_, payload=i) for i in range(n)]
        if self.held() + n > CAPACITY:
            with pytest.raises(QueueFull):
                self.broker.put_many(tasks, timeout=0)
            return
        self.broker.put_many(tasks, timeout=0)
        for task in tasks:
            self.put_count += 1
            self.tasks[task.id] = Modelled(type=type_, order=self.put_count)

    @rule(
        target=deliveries,
        slots_a=st.integers(0, 3),
        slots_b=st.integers(0, 3),
        limit=st.integers(0, 4),
    )
    def get(self, slots_a: int, slots_b: int, limit: int) -> list[Delivery]:
        self.reclaim()
        slots = {"a": slots_a, "b": slots_b}
        got = self.broker.get(slots, limit, 0)
        ready = {
            k: sum(t.state == "ready" and t.type == k for t in self.tasks.values()) for k in TYPES
        }
        assert len(got) == min(limit, sum(min(slots[k], ready[k]) for k in TYPES))
        for k in TYPES:
            assert sum(d.task.type == k for d in got) <= slots[k]
        for d in got:
            t = self.tasks[d.task.id]
            assert t.state == "ready" and d.task.type == t.type
            if not t.handed_out:  # FIFO: no older never-delivered task of its type is waiting
                assert not any(
                    o.type == t.type
                    and o.state == "ready"
                    and not o.handed_out
                    and o.order < t.order
                    for o in self.tasks.values()
                )
            assert d.task.attempt == t.attempt + 1
            assert d.redelivered == t.redelivered_next
            assert [h.attempt for h in d.task.history] == t.history
            t.state, t.receipt, t.due = "leased", d.receipt, self.now + VISIBILITY
            t.attempt, t.redelivered_next, t.handed_out = t.attempt + 1, False, True
        return got  # a list: hypothesis stores it whole, so pick from it below

    @rule(batch=deliveries, pick=st.integers(0, 3))
    def ack(self, batch: list[Delivery], pick: int) -> None:
        if not batch:
            return
        d = batch[pick % len(batch)]
        t = self.settle(d, self.broker.ack(d))
        if t:
            t.state, t.receipt = "done", None

    @rule(batch=deliveries, pick=st.integers(0, 3), delay=st.sampled_from([0.0, 0.5, 2.0]))
    def retry(self, batch: list[Delivery], pick: int, delay: float) -> None:
        if not batch:
            return
        d = batch[pick % len(batch)]
        failure = AttemptRecord(d.task.attempt, "E", "m", "tb", self.now, 0.1, "w")
        t = self.settle(d, self.broker.retry(d, delay, failure))
        if t:
            t.history.append(d.task.attempt)
            t.state, t.receipt, t.due = (
                ("delayed" if delay > 0 else "ready"),
                None,
                self.now + delay,
            )

    @rule(batch=deliveries, pick=st.integers(0, 3))
    def dead(self, batch: list[Delivery], pick: int) -> None:
        if not batch:
            return
        d = batch[pick % len(batch)]
        record = DeadLetter(d.task, "error", "E", "m", "tb", d.task.attempt, 0, 0, self.now)
        t = self.settle(d, self.broker.dead(d, record))
        if t:
            t.state, t.receipt = "dead", None

    @rule(batch=deliveries, pick=st.integers(0, 3))
    def release(self, batch: list[Delivery], pick: int) -> None:
        if not batch:
            return
        d = batch[pick % len(batch)]
        t = self.settle(d, self.broker.release(d))
        if t:
            t.state, t.receipt, t.attempt, t.redelivered_next = (
                "ready",
                None,
                t.attempt - 1,
                d.redelivered,
            )

    @rule(batch=deliveries)
    def extend(self, batch: list[Delivery]) -> None:
        expected = [self.answer(d) for d in batch]
        assert self.broker.extend(batch) == expected
        for d, answer in zip(batch, expected, strict=True):
            if answer is Answer.DONE:
                self.tasks[d.task.id].due = self.now + VISIBILITY

    @rule(batch=consumes(deliveries))
    def forget(self, batch: list[Delivery]) -> None:
        """A worker that dies holding these deliveries: they are simply never finished."""

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def depth(self) -> None:
        self.reclaim()
        got = self.broker.depth()
        for k in TYPES:
            mine = [t for t in self.tasks.values() if t.type == k]
            expected = Depth(
                ready=sum(t.state == "ready" for t in mine),
                delayed=sum(t.state == "delayed" for t in mine),
                leased=sum(t.state == "leased" for t in mine),
            )
            assert got.get(k, Depth()) == expected

    @invariant()
    def dead_letters_match(self) -> None:
        dead = {i for i, t in self.tasks.items() if t.state == "dead"}
        assert {r.id for r in self.store.records(DeadLetterFilter())} == dead

    def teardown(self) -> None:
        self.broker.close()


MemoryBrokerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
test_memory_broker_state_machine = MemoryBrokerMachine.TestCase
