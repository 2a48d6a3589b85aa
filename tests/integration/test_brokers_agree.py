"""The three brokers agree: the same random sequence of operations (puts into a small capacity,
unique puts, compare-and-set puts, hand-outs, lease renewals, gates (pauses, rate limits,
circuit breakers), settles of every kind with hand-offs, joins, values, cancel guards and
circuit outcomes, settles sent twice, cancels, replays, purges)
applied to memory, SQLite and Redis gets the same answer from each at every step, and leaves
the same tasks in the same states, the same dead letters and the same values. What a
handler's code sees must not depend on the broker under it (the contract suite checks each rule
alone; this checks them together, in orders nobody wrote down).

With Redis, no time passes that matters: leases are long, retries are due at once, so the
brokers' clocks (Redis keeps its own) cannot tell them apart. Memory and SQLite also run on one
clock of the test's, which moves: leases run out (their tasks come back, redelivered), retries
wait, pauses end, buckets refill and circuits open and half-open. `make test-slow` runs many
more seeds, longer.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runner.brokers.base import (
    UNIQUE_PREFIX,
    Answer,
    Arrival,
    Broker,
    CircuitBreaker,
    DeadLetterFilter,
    Delivery,
    Effects,
    Gate,
    Pause,
    RateLimit,
    Settle,
    SetValue,
)
from runner.brokers.memory import MemoryBroker
from runner.brokers.redis.broker import RedisBroker
from runner.brokers.sqlite.broker import SqliteBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import QueueFull
from runner.model import AttemptRecord, DeadLetter, DeadReason, Task
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

TYPES = ("a", "b")
SETTINGS: dict[str, Any] = {
    "capacity": 40,  # reached now and then: a put that does not fit is refused on all
    "enqueue_timeout": 0.0,
    "overflow": "reject",
    "visibility_timeout": 300.0,
}
#: The visibility timeout of the brokers on the test's clock.
VT = 30.0
ALL = DeadLetterFilter()


@pytest.fixture
def make_brokers(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[[], dict[str, Broker]]]:
    """A fresh set of the three, empty, each call; all closed after the test."""
    made: list[Broker] = []

    def make() -> dict[str, Broker]:
        fresh = uuid.uuid4().hex[:12]
        brokers: dict[str, Broker] = {
            "memory": MemoryBroker(dead_letters=MemoryDeadLetters(), **SETTINGS),
            "sqlite": SqliteBroker(path=str(tmp_path / f"agree-{fresh}.db"), **SETTINGS),
            "redis": RedisBroker(url=redis_server.url, namespace=f"agree-{fresh}", **SETTINGS),
        }
        made.extend(brokers.values())
        return brokers

    yield make
    for broker in made:
        broker.close()


class Run:
    """One random sequence, applied to every broker in turn."""

    def __init__(self, seed: int, brokers: dict[str, Broker], clock: Clock | None = None) -> None:
        self.rng = random.Random(seed)
        self.brokers = brokers
        # With a clock (memory and SQLite share it): time passes too, so leases expire,
        # retries wait, pauses end, buckets refill and circuits half-open.
        self.clock = clock
        self.n = 0
        # What each broker handed out and we have not settled, by task id (the same ids on
        # every broker: the tasks are built once, here).
        self.held: dict[str, dict[str, Delivery]] = {name: {} for name in brokers}
        # Settles sent once, kept to be sent again (ALREADY_DONE).
        self.sent: list[tuple[float, dict[str, Settle]]] = []  # (sent at, the op on each)
        self.roots: list[str] = []
        self.groups = 0
        self.seen: set[Answer] = set()  # the answers to settles sent again
        self.delays: dict[str, float] = {}  # task id -> its planned retry's delay
        self.joined = 0  # joined tasks handed out

    def each(self, call: Any) -> dict[str, Any]:
        return {name: call(name, broker) for name, broker in self.brokers.items()}

    def agree(self, what: str, answers: dict[str, Any]) -> Any:
        first = answers["memory"]
        assert all(a == first for a in answers.values()), f"{what}: {answers}"
        return first

    # -- steps ---------------------------------------------------------------------------

    def step(self) -> None:
        action = self.rng.choice(
            ["put", "put", "get", "get", "settle", "settle", "settle", "again", "cancel",
             "replay", "purge", "unique", "put_if", "pause", "extend", "time"]
        )  # fmt: skip
        getattr(self, action)()
        self.check()

    def time(self) -> None:
        """Time passes. The tasks handed out are first either renewed (as a live worker's
        lease keeper does: none of them expires during a step shorter than a lease) or left
        for good (their worker froze or died: they come back once their leases run out). A
        settle under a lease that ran out is not sent: the memory broker takes the task back
        when anything reads it (a get, depth), the others when another worker claims it, and
        only that differs."""
        if self.clock is None:
            return
        step = self.rng.choice([0.5, 3.0, 12.0, 40.0])
        if step < VT and self.rng.random() < 0.7:
            self.extend()
        else:
            self.held = {name: {} for name in self.brokers}
        self.clock.now += step

    def _now(self) -> float:
        return self.clock.now if self.clock is not None else 0.0

    def put(self) -> None:
        rng = self.rng
        tasks: list[Task] = []
        if rng.random() < 0.5:  # two tasks whose successes join
            self.groups += 1
            g = self.groups
            tasks = [self._task(rng.choice(TYPES), headers={"group": [g, i]}) for i in range(2)]
        else:
            tasks = [self._task(rng.choice(TYPES)) for _ in range(rng.randint(1, 3))]
        self.agree("put", self.each(lambda _, b: _refused(b.put_many, tasks)))
        self.roots += [t.id for t in tasks]

    def unique(self) -> None:
        """Tasks with unique keys from a small pool: put unless their key is held."""
        tasks = [
            self._task(self.rng.choice(TYPES), unique_key=f"k{self.rng.randint(1, 4)}")
            for _ in range(self.rng.randint(1, 2))
        ]
        self.agree("put_unique", self.each(lambda _, b: _refused(b.put_unique, tasks, 0)))
        self.roots += [t.id for t in tasks]

    def put_if(self) -> None:
        """A schedule's tick: a compare-and-set of a value with a put."""
        expected = self.rng.choice([None, "t1", "t2"])
        value = self.rng.choice(["t1", "t2"])
        tasks = [self._task(self.rng.choice(TYPES))]
        fired = self.each(lambda _, b: _refused(b.put_if, "tick", expected, value, tasks))
        if self.agree(f"put_if {expected} -> {value}", fired) is True:
            self.roots += [t.id for t in tasks]

    def pause(self) -> None:
        """A gate set or cleared: a pause, a rate limit too slow to refill during the test (so
        its whole tokens are the same on every clock), or a circuit breaker that stays open;
        with the test's clock, ones that time changes.
        Each type's burst is its own: a bucket no claim has stored yet reads as full at the
        burst in force, and when a claim stores it (one that hands nothing out because a pause
        or an open circuit holds the type back: memory and Redis store it, SQLite does not)
        differs between the brokers; a new burst would show that, which no task can tell."""
        rng = self.rng
        type_ = rng.choice(TYPES)
        burst = TYPES.index(type_) + 1
        gates: list[Gate] = [Pause(), RateLimit(0.001, burst), CircuitBreaker(0.5, 2, 600.0, 600.0)]
        if self.clock is not None:  # gates that time changes: a pause's end, refills, probes
            until = self._now() + rng.choice([5.0, 30.0])
            gates = [Pause(until), RateLimit(0.25, burst), CircuitBreaker(0.5, 2, 60.0, 20.0)]
        gate = rng.choice(gates)
        if rng.random() < 0.5:
            self.each(lambda _, b: b.set_gate(type_, gate))
        else:
            kind = type(gate)
            cleared = self.each(lambda _, b: b.clear_gate(type_, kind))
            self.agree(f"clear {kind.__name__} of {type_}", cleared)

    def extend(self) -> None:
        ids = sorted(self.held["memory"])
        extended = self.each(lambda n, b: b.extend([self.held[n][i] for i in ids]))
        self.agree(f"extend {ids}", extended)

    def get(self) -> None:
        """Every ready task of a type: the brokers differ in where a retried or released task
        goes back in its queue (docs/brokers.md), so a partial hand-out could differ too."""
        type_ = self.rng.choice(TYPES)
        got = self.each(lambda _, b: b.get({type_: 1000}, 1000, 0))
        gated = self.brokers["memory"].gates().get(type_, ())
        if any(isinstance(g, RateLimit | CircuitBreaker) for g in gated):
            # As many as its whole tokens (or its circuit's probes) allow, but which ones
            # depends on the order of its queue: compared by number, then handed back on each.
            self.agree(f"get {type_} (limited)", {n: len(ds) for n, ds in got.items()})
            released = self.each(lambda n, b: b.settle_many([Settle(d, "release") for d in got[n]]))
            self.agree("release", released)
            return
        self.agree(
            f"get {type_}",
            {
                name: sorted(
                    (d.task.id, d.task.attempt, d.redelivered, d.task.payload) for d in deliveries
                )
                for name, deliveries in got.items()
            },
        )
        for name, deliveries in got.items():
            for d in deliveries:
                self.held[name][d.task.id] = d
        self.joined += sum(d.task.id.startswith("join-") for d in got["memory"])

    def settle(self) -> None:
        ids = sorted(self.held["memory"])
        if not ids:
            return
        chosen = self.rng.sample(ids, min(len(ids), self.rng.randint(1, 3)))
        plans = [self._plan(task_id) for task_id in chosen]
        ops = {
            name: [
                self._op(self.held[name].pop(task_id), *plan)
                for task_id, plan in zip(chosen, plans, strict=True)
            ]
            for name in self.brokers
        }
        answers = self.each(lambda n, b: b.settle_many(ops[n]))
        self.agree(f"settle {[p[0] for p in plans]} of {chosen}", answers)
        for i in range(len(chosen)):
            self.sent.append((self._now(), {name: ops[name][i] for name in self.brokers}))

    def again(self) -> None:
        """A settle sent before, sent again, as when its reply was lost: ALREADY_DONE, even
        once a newer hand-out of its task owns it."""
        # A broker remembers a settled receipt for at least a visibility timeout (how much
        # longer is its own): only those sent well within one are sent again.
        recent = [ops for at, ops in self.sent[-20:] if self._now() - at < VT / 2]
        if not recent:
            return
        ops = self.rng.choice(recent)
        answers = self.each(lambda n, b: b.settle_many([ops[n]]))
        (answer,) = self.agree(f"{ops['memory'].kind} of {ops['memory'].delivery.task.id} again",
                               answers)  # fmt: skip
        self.seen.add(answer)

    def cancel(self) -> None:
        if not self.roots:
            return
        root = self.rng.choice(self.roots)
        # As `dq-run cancel` does: the guard every later hand-off of the pipeline checks, then
        # its waiting tasks dead-lettered.
        guard = [SetValue(f"cancel:{root}", "cancelled", 3600.0)]
        self.each(lambda _, b: b.set_values(guard))
        cancelled = self.each(lambda _, b: sorted(b.cancel(root, "cancelled")))
        self.agree(f"cancel {root}", cancelled)

    def replay(self) -> None:
        records = self.brokers["memory"].dead_letters(ALL)  # type: ignore[attr-defined]
        ids = [r.id for r in records if r.reason != DeadReason.UPSTREAM_DEAD]
        if ids:
            # One at a time: the order of a call's tasks is not the contract's (FIFO by put).
            for task_id in self.rng.sample(ids, min(len(ids), 2)):
                replayed = self.each(lambda _, b, i=task_id: _refused(b.replay, [i]))
                self.agree(f"replay {task_id}", replayed)

    def purge(self) -> None:
        if self.rng.random() < 0.7:
            return
        records = self.brokers["memory"].dead_letters(ALL)  # type: ignore[attr-defined]
        if records:
            where = DeadLetterFilter(ids=frozenset([self.rng.choice(records).id]))
            self.agree("purge", self.each(lambda _, b: b.purge(where)))

    # -- what a settle does --------------------------------------------------------------

    def _task(self, type_: str, **fields: Any) -> Task:
        self.n += 1
        return Task(type_, {"n": self.n}, id=f"t{self.n:05d}-{uuid.uuid4().hex[:6]}", **fields)

    def _plan(self, task_id: str) -> tuple[str, Effects | None]:
        """How the task ends (the same on every broker) and what its ending also does."""
        rng = self.rng
        task = self.held["memory"][task_id].task
        kind = rng.choice(["ack", "ack", "ack", "dead", "retry", "release"])
        if kind == "release":
            return kind, None
        if kind == "retry":  # a failure, for its type's circuit breaker if it has one
            self.delays[task_id] = rng.choice([0.0, 2.0, 20.0]) if self.clock is not None else 0.0
            return kind, Effects(circuit=False)
        root = task.headers.get("root_id", task.id)
        lineage = {"root_id": root, "parent_id": task.id}
        group = task.headers.get("group")
        guard = f"cancel:{root}"
        self.n += 1
        own = f"{task_id}.{self.n}"
        if kind == "dead":
            puts: tuple[Task, ...] = ()
            dead: tuple[DeadLetter, ...] = ()
            if rng.random() < 0.5:
                puts = (Task(rng.choice(TYPES), "on_dead", id=f"{own}.dead", headers=lineage),)
            if group:
                joined = Task("b", None, id=f"join-{group[0]}", headers=lineage)
                dead = (
                    DeadLetter(joined, DeadReason.UPSTREAM_DEAD, "U", "m", "", 0, 1.0, 1.0, 1.0),
                )
            return kind, Effects(puts=puts, dead_letters=dead, circuit=False,
                                 unless=guard if puts or dead else None)  # fmt: skip
        effects = Effects(
            sets=(SetValue(f"trace:{root}:{task_id}", "done", 3600.0),)
            if rng.random() < 0.5
            else (),
            deletes=(f"trace:{root}:{task_id}",) if rng.random() < 0.1 else (),
            unless=guard,
        )
        if group:
            g, index = group
            joined = Task("b", None, id=f"join-{g}", headers=lineage)
            arrival = Arrival(f"join:{g}", index, 2, f'"part {index}"', joined)
            return kind, Effects(arrivals=(arrival,), sets=effects.sets, circuit=True,
                                 unless=guard)  # fmt: skip
        children = tuple(
            Task(rng.choice(TYPES), None, id=f"{own}.{k}", headers=lineage)
            for k in range(rng.choice([0, 0, 1, 2]))
        )
        return kind, Effects(puts=children, sets=effects.sets, deletes=effects.deletes,
                             circuit=True, unless=guard if children else None)  # fmt: skip

    def _op(self, delivery: Delivery, kind: str, effects: Effects | None) -> Settle:
        task = delivery.task
        if task.unique_key and kind in ("ack", "dead"):  # its key let go, as the engine does
            effects = effects or Effects()
            effects = replace(effects, deletes=(*effects.deletes, UNIQUE_PREFIX + task.unique_key))
        if kind == "retry":
            failure = AttemptRecord(task.attempt, "E", "m", "", 1.0, 0.0, "w:1")
            return Settle(delivery, "retry", self.delays[task.id], failure, effects=effects)
        if kind == "dead":
            record = DeadLetter(task, DeadReason.EXHAUSTED, "E", "m", "", 1, 1.0, 1.0, 1.0)
            return Settle(delivery, "dead", record=record, effects=effects)
        return Settle(delivery, kind, effects=effects)  # type: ignore[arg-type]

    # -- the check -----------------------------------------------------------------------

    def check(self) -> None:
        self.agree("depth", self.each(lambda _, b: _depth(b)))
        self.agree(
            "dead letters",
            self.each(lambda _, b: sorted((r.id, r.reason) for r in b.dead_letters(ALL))),
        )
        self.agree("gates", self.each(lambda _, b: b.gates()))
        self.agree(
            "circuits",
            self.each(
                lambda _, b: {t: (c.state, c.calls, c.failures) for t, c in b.circuits().items()}
            ),
        )
        self.agree(
            "tokens",
            self.each(
                lambda _, b: {
                    t: round(k.tokens, 6) if self.clock is not None else int(k.tokens)
                    for t, k in b.buckets().items()
                }
            ),
        )
        for prefix in ("trace:", "cancel:", UNIQUE_PREFIX, "tick"):
            self.agree(f"values {prefix}", self.each(lambda _, b, p=prefix: b.scan_values(p)))


def _refused(call: Any, *args: Any) -> Any:
    """What ``call`` answers, or "full" when the broker had no room."""
    try:
        return call(*args)
    except QueueFull:
        return "full"


def _depth(broker: Broker) -> dict[str, tuple[int, int, int]]:
    return {
        name: (d.ready, d.delayed, d.leased)
        for name, d in broker.depth().items()
        if (d.ready, d.delayed, d.leased) != (0, 0, 0)
    }


class Clock:
    """The time memory and SQLite both read (Redis reads its own: it is left out)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _agree_to_the_end(run: Run) -> None:
    """Every gate lifted, everything handed out and acked: the same tasks done on each."""
    run.each(
        lambda _, b: [b.clear_gate(t, k) for t in TYPES for k in (Pause, RateLimit, CircuitBreaker)]
    )
    for _ in range(200):
        run.get()
        acked = run.each(
            lambda n, b: b.settle_many([Settle(d, "ack") for d in run.held[n].values()])
        )
        run.agree("acks", acked)
        run.held = {name: {} for name in run.brokers}
        if not any(run.each(lambda _, b: _depth(b)).values()):
            break
    run.check()
    assert _depth(run.brokers["memory"]) == {}


@pytest.mark.parametrize(
    ("seeds", "steps"),
    [
        (range(4), 200),
        (range(4, 8), 200),
        pytest.param(range(8, 24), 400, marks=pytest.mark.slow),  # `make test-slow`: more
    ],
)
def test_the_brokers_agree_step_by_step(
    seeds: range, steps: int, make_brokers: Callable[[], dict[str, Broker]]
) -> None:
    seen: set[Answer] = set()
    joined = 0
    for seed in seeds:
        run = Run(seed, make_brokers())
        for _ in range(steps):
            run.step()
        _agree_to_the_end(run)
        seen |= run.seen
        joined += run.joined
    assert Answer.ALREADY_DONE in seen and joined  # both exercised


@pytest.mark.parametrize(
    ("seeds", "steps"),
    [
        (range(6), 300),
        (range(6, 12), 300),
        pytest.param(range(12, 52), 400, marks=pytest.mark.slow),  # `make test-slow`: more
    ],
)
def test_memory_and_sqlite_agree_as_time_passes(seeds: range, steps: int, tmp_path: Path) -> None:
    settings = {**SETTINGS, "visibility_timeout": VT}
    for seed in seeds:
        clock = Clock()
        brokers: dict[str, Broker] = {
            "memory": MemoryBroker(dead_letters=MemoryDeadLetters(), clock=clock, **settings),
            "sqlite": SqliteBroker(path=str(tmp_path / f"t{seed}.db"), clock=clock, **settings),
        }
        try:
            run = Run(seed, brokers, clock)
            for _ in range(steps):
                run.step()
            run.held = {name: {} for name in brokers}  # their worker gone: they come back
            clock.now += 3600  # every lease run out, every retry due, every pause over
            _agree_to_the_end(run)
        finally:
            for broker in brokers.values():
                broker.close()
