"""The memory broker against a dead-letter store that fails now and then (a `file` store on a
full disk): random puts, hand-outs, settles with hand-offs, retries, releases, lease expiries,
cancels and replays, audited after every step. Each task ever started is in exactly one
place (queued, delayed or leased in the broker, a record in the store, or acked), whatever
failed: a failed write leaves things as they were, and tried again later, takes effect once.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

import pytest

from runner.brokers.base import Answer, Arrival, DeadLetterFilter, Delivery, Effects, Settle
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.model import AttemptRecord, DeadLetter, DeadReason, Task

TYPE = "a"
#: The prefix of the join records a dead task of no group writes (a join that never fires).
UPSTREAM = "U-"
#: The header of a group's members: [group, index] (two members join).
GROUP = "group"


class FlakyStore(MemoryDeadLetters):
    """A store whose writes raise while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def _write(self) -> None:
        if self.failing:
            raise OSError("disk full")

    def add(self, record: DeadLetter) -> None:
        self._write()
        super().add(record)

    def add_many(self, records: Sequence[DeadLetter]) -> None:
        self._write()
        super().add_many(records)

    def take(self, ids: Collection[str]) -> list[DeadLetter]:
        self._write()
        return super().take(ids)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """The broker, its store, and what the test knows must exist."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.store = FlakyStore()
        self.broker = MemoryBroker(
            capacity=10_000,
            enqueue_timeout=0.0,
            overflow="reject",
            visibility_timeout=1.0,
            dead_letters=self.store,
            clock=self.clock,
        )
        self.born: set[str] = set()  # every task id that must be somewhere
        self.acked: set[str] = set()
        self.upstream: set[str] = set()  # the join records that must be in the store
        self.held: list[Delivery] = []  # handed out, not settled by us yet
        self.pending: list[Settle] = []  # a batch that raised: sent again once the store works
        self.roots = 0
        self.endings = 0
        self.arrived: dict[str, set[int]] = {}  # a join's parts kept

    # -- steps ---------------------------------------------------------------------------

    def step(self) -> None:
        rng = self.rng
        self.store.failing = rng.random() < 0.3
        action = rng.choice(
            ["put", "get", "get", "settle", "settle", "settle", "time", "cancel", "replay"]
        )
        if self.pending and not self.store.failing:
            self._send(self.pending)
        elif action == "put":
            tasks = self._group() if rng.random() < 0.4 else [self._root()]
            self.broker.put_many(tasks)
            self.born.update(t.id for t in tasks)
        elif action == "get":
            self.held += self.broker.get({TYPE: 8}, rng.randint(1, 4), 0)
        elif action == "settle" and self.held and not self.pending:
            batch = [self._settle(self.held.pop(rng.randrange(len(self.held))))
                     for _ in range(min(len(self.held), rng.randint(1, 3)))]  # fmt: skip
            self._send(batch)
        elif action == "time" and not self.pending:
            # Leases run out (their tasks come back); settles remembered are forgotten.
            self.clock.now += rng.choice([0.3, 1.5, 3.0])
        elif action == "cancel":
            roots = sorted({t.headers.get("root_id", t.id) for t in self._in_broker()})
            if roots:
                try:
                    cancelled = self.broker.cancel(rng.choice(roots), "cancelled")
                except OSError:
                    return
                assert all(i in self.born for i in cancelled)
        elif action == "replay":
            ids = [r.id for r in self._records() if r.reason != DeadReason.UPSTREAM_DEAD]
            if ids:
                try:
                    self.broker.replay(rng.sample(ids, min(len(ids), 2)))
                except OSError:
                    return

    def _root(self) -> Task:
        self.roots += 1
        return Task(TYPE, None, id=f"r{self.roots}")

    def _group(self) -> list[Task]:
        """Two tasks whose successes join (as a fan-out's members do)."""
        self.roots += 1
        g = self.roots
        return [Task(TYPE, None, id=f"m{g}.{i}", headers={GROUP: [g, i]}) for i in range(2)]

    def _settle(self, delivery: Delivery) -> Settle:
        """A random ending for ``delivery``, with hand-offs like a pipeline's."""
        task, rng = delivery.task, self.rng
        # Ids of this ending's own (a replayed task may end again): a batch sent again carries
        # the same ones.
        self.endings += 1
        own = f"{task.id}.{self.endings}"
        lineage = {"root_id": task.headers.get("root_id", task.id), "parent_id": task.id}
        kind = rng.choice(["ack", "ack", "dead", "retry", "release"])
        member = task.headers.get(GROUP)
        if kind == "ack" and member:
            g, index = member
            arrival = Arrival(f"join:{g}", index, 2, str(index), Task(TYPE, None, id=f"J{g}"))
            return Settle(delivery, "ack", effects=Effects(arrivals=(arrival,)))
        if kind == "ack":
            children = tuple(
                Task(TYPE, None, id=f"{own}.{k}", headers=lineage)
                for k in range(rng.choice([0, 0, 1, 2]))
            )
            return Settle(delivery, "ack", effects=Effects(puts=children) if children else None)
        if kind == "dead":
            record = DeadLetter(task, DeadReason.EXHAUSTED, "E", "m", "", 1, 0, 0, self.clock.now)
            if not member and rng.random() < 0.5:
                return Settle(delivery, "dead", record=record)
            # Its join (a fake one, never fired, for a task of no group) is dead too; and an
            # on_dead task starts.
            joined = f"J{member[0]}" if member else f"{UPSTREAM}{own}"
            upstream = DeadLetter(
                Task(TYPE, None, id=joined), DeadReason.UPSTREAM_DEAD, "U", "m", "", 0, 0, 0, 0
            )
            on_dead = Task(TYPE, None, id=f"{own}.dead", headers=lineage)
            effects = Effects(puts=(on_dead,), dead_letters=(upstream,))
            return Settle(delivery, "dead", record=record, effects=effects)
        if kind == "retry":
            failure = AttemptRecord(task.attempt, "E", "m", "", self.clock.now, 0.0, "w:1")
            return Settle(delivery, "retry", rng.choice([0.0, 2.0]), failure)
        return Settle(delivery, "release")

    def _send(self, batch: list[Settle]) -> None:
        try:
            answers = self.broker.settle_many(batch)
        except OSError:
            self.pending = batch
            return
        self.pending = []
        for op, answer in zip(batch, answers, strict=True):
            if answer is Answer.FENCED:
                continue  # its lease ran out: the task is back in the broker
            if op.kind == "ack":
                self.acked.add(op.delivery.task.id)
            if op.effects is None:
                continue
            self.born.update(t.id for t in op.effects.puts)
            self.upstream.update(r.id for r in op.effects.dead_letters)
            for arrival in op.effects.arrivals:
                parts = self.arrived.setdefault(arrival.key, set())
                parts.add(arrival.index)
                if len(parts) == arrival.size:  # the join fires: its task starts, its record goes
                    self.born.add(arrival.task.id)
                    self.upstream.discard(arrival.task.id)

    # -- the audit -----------------------------------------------------------------------

    def _in_broker(self) -> list[Task]:
        with self.broker._cond:
            return [q.task for q in self.broker._queued()]

    def _records(self) -> list[DeadLetter]:
        return MemoryDeadLetters.records(self.store, DeadLetterFilter())

    def audit(self, step: int) -> None:
        """Each task in one place. Not while a batch that raised waits to be sent again: the
        ops before the failing one have taken effect (their answers come with the resend, as
        ALREADY_DONE), which the test cannot know until then."""
        if self.pending:
            return
        held = [t.id for t in self._in_broker()]
        records = self._records()
        stored = [r.id for r in records if r.reason != DeadReason.UPSTREAM_DEAD]
        places = held + stored + sorted(self.acked)
        where = f"step {step}"
        assert len(places) == len(set(places)), f"{where}: a task in two places or twice"
        assert set(places) == self.born, (
            f"{where}: lost {sorted(self.born - set(places))}, "
            f"unknown {sorted(set(places) - self.born)}"
        )
        joins = {r.id for r in records if r.reason == DeadReason.UPSTREAM_DEAD}
        assert joins == self.upstream, f"{where}: join records {joins} != {self.upstream}"


@pytest.mark.parametrize("seed", range(12))
def test_no_task_is_lost_or_doubled_when_the_store_fails_now_and_then(seed: int) -> None:
    world = World(seed)
    for step in range(400):
        world.step()
        world.audit(step)
    # Everything settles in the end, once the store works again.
    world.store.failing = False
    if world.pending:
        world._send(world.pending)
    world.clock.now += 10
    world.held = []
    while deliveries := world.broker.get({TYPE: 50}, 50, 0):
        world._send([Settle(d, "ack") for d in deliveries])
        world.audit(-1)
    assert world.acked | {r.id for r in world._records()} >= world.born
    assert any(task_id.startswith("J") for task_id in world.acked)  # joins fired
