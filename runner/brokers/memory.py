"""The in-process broker: bounded per-type queues, a delay heap and leases under one condition.

It implements both ``Broker`` and ``BrokerAdmin`` (the admin side works in-process, which is what
tests and library users need; ``dq-run dlq`` in another process sees only a file DLQ). This
module holds the task path (put, get, settles, extend, depth, close); the admin side, the clock,
the gate calls and the value calls (``read_values``, ``put_if``, ``put_unique``, ``scan_values``,
``delete_values``) are in memory_admin.py (``MemoryAdmin``, mixed in, under the same lock).

Limits, written here because they are the price of being in-process:

- Nothing survives the process. At shutdown the engine calls ``drain_to_dead_letters()`` so
  every task still queued or in backoff becomes a dead letter with reason ``shutdown`` (with a
  file DLQ they can be replayed later) instead of vanishing.
- A dead letter is written while the broker's lock is held, so a slow (fsynced file) dead-letter
  store slows every operation for that moment. Dead letters are rare; correctness (never both
  queued and dead) is worth it.

Ordering: each type's ready queue is FIFO. A released task, and a task whose lease expired, go
back to the *front* of their type's queue: they were put before everything still waiting, so
FIFO by put order is kept as closely as it can be. Due retries join the back.

Waiting: ``get`` and a blocked ``put`` sleep on the condition until notified or until the exact
time the next delayed task or lease becomes due; there is no polling. Per-operation work is O(1)
or O(log n); expired-lease bookkeeping is lazy and compacted when it outgrows the live leases.
A change that no waiting get saw (a put, a retry, a hand-off, a resume while no get waits) is
told to the ``watch`` hooks once the lock is released: the engine's leader protocol
(runner.engine.books) leaves the next blocking get to whichever thread idles next, and a hook
wakes one when a task arrives before that.

Settled receipts (for ``ALREADY_DONE``): each settle that takes effect puts its receipt and
time in a dict, which keeps them in settle order; at most every eighth of a
``visibility_timeout`` a settle drops the entries at the front that are a timeout old (reading
no further than the first one that is not), so memory holds little more than one timeout's
worth of settles and no call scans. A receipt answers ``ALREADY_DONE`` for exactly
``visibility_timeout`` after its settle (an older entry not yet dropped answers ``FENCED``).

Size: about 690 lines: the task path of the contract in one lock-guarded structure (queues,
delay heap, leases, settled receipts, capacity, close, and the gates and effects every claim and
settle applies) that is easier to prove right in one place.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Literal

from runner.brokers.base import (
    Answer,
    BaseBroker,
    Bucket,
    Circuit,
    CircuitBreaker,
    Delivery,
    Depth,
    Effects,
    Pause,
    RateLimit,
    Settle,
    settle_apart,
    single_call,
)
from runner.brokers.flow import (
    circuit_allows,
    circuit_at,
    circuit_handed,
    circuit_recorded,
    circuit_reopens_at,
    next_token_at,
    refilled,
    taken,
    whole,
)
from runner.brokers.memory_admin import MemoryAdmin, ringing
from runner.brokers.memory_pipelines import MemoryPipelines
from runner.deadletter.store import DeadLetterStore
from runner.errors import BrokerClosed, QueueFull
from runner.model import HISTORY_LIMIT, AttemptRecord, DeadLetter, Task

#: The answers, read once: an Enum member lookup costs about 0.1 us on Python 3.11, per settle.
_DONE, _ALREADY_DONE, _FENCED = Answer.DONE, Answer.ALREADY_DONE, Answer.FENCED


class _Lease:
    """One outstanding delivery. ``expires_at`` moves forward when the lease is extended."""

    __slots__ = ("expires_at", "receipt", "redelivered", "task")

    def __init__(self, task: Task, receipt: str, expires_at: float, redelivered: bool) -> None:
        self.task = task
        self.receipt = receipt
        self.expires_at = expires_at
        self.redelivered = redelivered


def _with_attempt(task: Task, attempt: int) -> Task:
    # Direct construction: dataclasses.replace costs several times more on the hot path; and
    # positionally, in field order (test_quick_init pins it): a class called with keywords
    # gathers them in a dict first.
    return Task(
        task.type, task.payload, task.id, attempt, task.enqueued_at, task.not_before,
        task.history, task.headers, task.expires_at, task.unique_key,
    )  # fmt: skip


class MemoryBroker(MemoryAdmin, MemoryPipelines, BaseBroker):
    """A bounded in-memory broker; see the module docstring and ``runner.brokers.base``."""

    # In-process: nothing survives the process and no other process takes from (or adds to)
    # this queue. A call costs only a lock round, yet settles still go in batches (one lock
    # hold for a batch): with the publisher and the dispatcher on the same lock, one settle per
    # task from every worker thread is what made threads queue on it behind a holder the
    # interpreter had switched out (twice the CPU per task, half the rate, in one run of three).
    durable = False
    shared = False
    batch_settles = True
    carry_settles = True
    gates_in_get = True
    settle_effects = True

    def __init__(
        self,
        capacity: int,
        enqueue_timeout: float,
        overflow: Literal["block", "reject"],
        visibility_timeout: float,
        dead_letters: DeadLetterStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if visibility_timeout <= 0:
            raise ValueError(f"visibility_timeout must be positive, got {visibility_timeout}")
        self.capacity = capacity
        self.enqueue_timeout = enqueue_timeout
        self.overflow = overflow
        self.visibility_timeout = visibility_timeout
        self.dead_letter_store = dead_letters
        self._clock = clock
        # On an RLock (the default) for its C ownership check: see Books' lock.
        self._cond = threading.Condition()
        self._ready: dict[str, deque[Task]] = {}
        # Per type, how many tasks at the head of its ready queue were handed back (released,
        # or their lease expired): the next one handed back goes behind them, so that tasks
        # handed back together keep their order (types with none are absent).
        self._front: dict[str, int] = {}
        self._redelivered: set[str] = (
            set()
        )  # ids in a ready queue whose next hand-out is a redelivery
        self._delayed: list[tuple[float, int, Task]] = []  # heap by not_before
        self._delayed_count: dict[str, int] = {}
        self._leases: dict[str, _Lease] = {}  # by receipt
        self._leased_count: dict[str, int] = {}
        self._expiry: list[tuple[float, int, _Lease]] = []  # heap; stale entries skipped lazily
        self._held = 0  # everything from put until ack or dead
        # Receipts settled (ack, retry, dead, release) lately: receipt -> settled at, in
        # settle order (a dict keeps insertion order), pruned from the front at _prune_at.
        self._settled: dict[str, float] = {}
        self._prune_at = -math.inf
        self._seq = itertools.count()
        self._rng = random.Random(os.urandom(16))
        self._rotation = 0
        # Sticky: a wake() that lands just before a get() begins still ends that get early
        # (the engine wakes the get it is about to make when a slot frees meanwhile).
        self._wake_pending = False
        self._put_waiting = 0
        self._getters = 0  # gets waiting on the condition now
        # The hook (``watch``) told after a change no waiting get saw (``_unwatched``).
        self._watcher: Callable[[], None] | None = None
        self._unwatched = False
        self._closed = False
        # Gates (a paused type is left out of every claim) and the values settle effects set:
        # key -> (value, expires_at or None): one whose ttl ran out reads as absent, and is
        # dropped when the map has doubled since the last sweep.
        self._pauses: dict[str, Pause] = {}
        self._rates: dict[str, RateLimit] = {}
        self._buckets: dict[str, Bucket] = {}  # of the rate-limited types (runner.brokers.flow)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._circuits: dict[str, Circuit] = {}  # of the types with a breaker
        self._values: dict[str, tuple[str, float | None]] = {}
        self._values_swept_at = 0
        # The ids of every held task (an effect put of one is skipped): kept from the first
        # settle that puts tasks on (None before: a set of every id, rehashed as it grows under
        # the lock, slowed every put and ack by a fifth for brokers that never need it).
        self._ids: set[str] | None = None
        self._joins: dict[str, dict[int, str]] = {}  # a join's parts, by index
        self._dead_joins: set[str] = set()  # joins dead-lettered because a part died
        # The single calls without taking the lock, for a settle that carries effects (made
        # under the lock together with them).
        self._locked = SimpleNamespace(
            ack=self._ack, retry=self._retry, dead=self._dead, release=self._release
        )

    # -- producer side -------------------------------------------------------------------------

    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None:
        """Enqueue all of ``tasks`` or none; block while full (see the contract)."""
        n = len(tasks)
        if n == 0:
            return
        with self._cond:
            self._check_open("put")
            self._wait_for_room(n, timeout, "put")
            self._enqueue(tasks, self._clock())
        if self._unwatched:
            self._ring()

    def _wait_for_room(self, n: int, timeout: float | None, operation: str) -> None:
        """Wait until ``n`` more tasks fit, for the broker method ``operation`` (put, replay)."""
        if self._held + n <= self.capacity:
            return
        where = {"backend": "memory", "operation": operation}
        if n > self.capacity:
            raise QueueFull(
                f"cannot put {n} tasks at once: the broker's capacity is {self.capacity}", **where
            )
        if self.overflow == "reject":
            raise QueueFull(
                f"queue full ({self._held}/{self.capacity} tasks held) and broker.overflow is "
                f"reject: {n} task(s) not enqueued",
                **where,
            )
        wait_s = self.enqueue_timeout if timeout is None else timeout
        end = time.monotonic() + wait_s
        self._put_waiting += 1
        try:
            # Closed while waiting ends the wait even when room was made meanwhile (the
            # shutdown drain makes room after close): the tasks would go nowhere.
            while self._closed or self._held + n > self.capacity:
                if self._closed:
                    message = "broker closed while waiting for room to put tasks"
                    raise BrokerClosed(message, **where)
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise QueueFull(
                        f"queue full ({self._held}/{self.capacity} tasks held): waited {wait_s:g}s "
                        f"(broker.enqueue_timeout) to put {n} task(s)",
                        **where,
                    )
                self._cond.wait(remaining)
        finally:
            self._put_waiting -= 1

    def _enqueue(self, tasks: Sequence[Task], now: float) -> None:
        for given in tasks:
            task = replace(given, enqueued_at=now) if given.enqueued_at == 0.0 else given
            if task.not_before > now:
                self._push_delayed(task)
            else:
                self._queue(task.type).append(task)
            if self._ids is not None:
                self._ids.add(task.id)
        self._held += len(tasks)
        self._notify()

    # -- consumer side -------------------------------------------------------------------------

    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]:
        """Hand out up to ``slots[type]`` ready tasks per type, ``limit`` in all."""
        end = time.monotonic() + timeout
        with self._cond:
            self._check_open("get")
            while True:
                now = self._clock()
                self._promote(now)
                out = self._take(slots, limit, now)
                if out or self._closed or self._wake_pending:
                    self._wake_pending = False
                    return out
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return out
                self._getters += 1
                try:
                    self._cond.wait(min(remaining, self._next_due() - now))
                finally:
                    self._getters -= 1

    def _take(self, slots: Mapping[str, int], limit: int, now: float) -> list[Delivery]:
        budget = {t: n for t, n in slots.items() if n > 0 and self._ready.get(t)}
        if self._pauses:
            budget = {t: n for t, n in budget.items() if not self._gated(t, now)}
        if not self._rates and not self._breakers:
            return self._claim(budget, limit, now)
        limited = [t for t in budget if t in self._rates]
        for type_name in limited:
            bucket = refilled(self._rates[type_name], self._buckets.get(type_name), now)
            self._buckets[type_name] = bucket
            budget[type_name] = min(budget[type_name], whole(bucket))
        broken = [t for t in budget if t in self._breakers]
        for type_name in broken:
            breaker = self._breakers[type_name]
            circuit = circuit_at(breaker, self._circuits.get(type_name), now)
            self._circuits[type_name] = circuit
            allowed = circuit_allows(breaker, circuit)
            if allowed is not None:
                budget[type_name] = min(budget[type_name], allowed)
        out = self._claim({t: n for t, n in budget.items() if n > 0}, limit, now)
        for type_name in limited:
            handed = sum(1 for d in out if d.task.type == type_name)
            self._buckets[type_name] = taken(self._buckets[type_name], handed)
        for type_name in broken:
            handed = sum(1 for d in out if d.task.type == type_name)
            self._circuits[type_name] = circuit_handed(self._circuits[type_name], handed)
        return out

    def _claim(self, budget: dict[str, int], limit: int, now: float) -> list[Delivery]:
        """Hand out up to ``budget[type]`` ready tasks per type, ``limit`` in all."""
        out: list[Delivery] = []
        if not budget or limit <= 0:
            return out
        if len(budget) == 1:  # one type has tasks: no turns to take (the path of an idle worker)
            ((type_name, n),) = budget.items()
            queue = self._ready[type_name]
            for _ in range(min(n, limit, len(queue))):
                out.append(self._hand_out(queue.popleft(), now))
            if self._front:
                self._left_front(type_name, len(out))
            return out
        active = list(budget)
        # Start each call at a different type so that a binding `limit` starves none of them.
        self._rotation += 1
        shift = self._rotation % len(active)
        active = active[shift:] + active[:shift]
        while active:
            still: list[str] = []
            for type_name in active:
                queue = self._ready[type_name]
                out.append(self._hand_out(queue.popleft(), now))
                if self._front:
                    self._left_front(type_name, 1)
                if len(out) >= limit:
                    return out
                budget[type_name] -= 1
                if budget[type_name] > 0 and queue:
                    still.append(type_name)
            active = still
        return out

    def _hand_out(self, task: Task, now: float) -> Delivery:
        redelivered = False
        if self._redelivered and task.id in self._redelivered:
            self._redelivered.discard(task.id)
            redelivered = True
        task = _with_attempt(task, task.attempt + 1)
        receipt = f"{self._rng.getrandbits(64):016x}"
        while receipt in self._leases:  # astronomically unlikely, but fencing depends on it
            receipt = f"{self._rng.getrandbits(64):016x}"
        lease = _Lease(task, receipt, now + self.visibility_timeout, redelivered)
        self._leases[receipt] = lease
        self._push_expiry(lease)
        self._leased_count[task.type] = self._leased_count.get(task.type, 0) + 1
        return Delivery(task, receipt, redelivered)

    def ack(self, delivery: Delivery) -> Answer:
        with self._cond:
            return self._ack(delivery)

    @ringing
    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer:
        with self._cond:
            return self._retry(delivery, delay_s, failure)

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer:
        with self._cond:
            return self._dead(delivery, record)

    @ringing
    def release(self, delivery: Delivery) -> Answer:
        with self._cond:
            return self._release(delivery)

    @ringing
    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        """Each op as its own call, all under one lock hold; one with effects applies them
        right after its call, having written their dead letters first. An op whose dead letters
        the store cannot write (BrokerUnavailable) changes nothing, its task stays leased, and
        the others go on: then SettleIncomplete carries their answers (None for each op that
        failed)."""
        with self._cond:
            if ops:
                self._check_open("settle")
            return settle_apart(self._settle_one, ops, "memory")

    def _settle_one(self, op: Settle) -> Answer:
        effects = op.effects
        if effects is not None and self._hands_off_letters(op.delivery, effects):
            self._write_hand_off_letters(effects)
        answer = single_call(self._locked, op)
        if answer is _DONE and effects is not None:
            self._apply(effects, op.delivery.task.type)
        return answer

    def _hands_off_letters(self, delivery: Delivery, effects: Effects) -> bool:
        """Whether settling ``delivery`` will take effect (its lease is held) with hand-offs
        that write to the dead-letter store (``effects`` not skipped by ``unless``)."""
        return (
            bool(effects.dead_letters or effects.arrivals)
            and delivery.receipt in self._leases
            and (effects.unless is None or self._live_value(effects.unless, self._clock()) is None)
        )

    def _ack(self, delivery: Delivery) -> Answer:
        self._check_open("settle")
        lease = self._end_lease(delivery)
        if lease is None:
            return self._not_leased(delivery)
        now = self._clock()  # _settled_now, inlined: every task's last call goes this way
        self._settled[delivery.receipt] = now
        if now >= self._prune_at:
            self._prune_settled(now)
        if self._ids is not None:
            self._ids.discard(lease.task.id)
        self._forget_one()
        return _DONE

    def _retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer:
        self._check_open("settle")
        lease = self._end_lease(delivery)
        if lease is None:
            return self._not_leased(delivery)
        now = self._clock()
        self._settled_now(delivery.receipt, now)
        task = replace(
            lease.task,
            not_before=now + delay_s if delay_s > 0 else 0.0,
            history=(*lease.task.history, failure)[-HISTORY_LIMIT:],
        )
        if delay_s > 0:
            self._push_delayed(task)
        else:
            self._queue(task.type).append(task)
        self._notify()  # a getter may now have a task, or an earlier due time
        return _DONE

    def _dead(self, delivery: Delivery, record: DeadLetter) -> Answer:
        self._check_open("settle")
        if delivery.receipt not in self._leases:
            return self._not_leased(delivery)
        # Written before the lease ends: if the store fails, the task stays leased (and is
        # redelivered after its lease expires) rather than being lost.
        self.dead_letter_store.add(record)
        self._end_lease(delivery)
        self._settled_now(delivery.receipt, self._clock())
        if self._ids is not None:
            self._ids.discard(delivery.task.id)
        self._forget_one()
        return _DONE

    def _release(self, delivery: Delivery) -> Answer:
        self._check_open("settle")
        lease = self._end_lease(delivery)
        if lease is None:
            return self._not_leased(delivery)
        self._settled_now(delivery.receipt, self._clock())
        # Undo the hand-out exactly: the attempt and the redelivered flag are given back.
        task = lease.task
        self._to_front(_with_attempt(task, task.attempt - 1))
        if lease.redelivered:
            self._redelivered.add(task.id)
        self._notify()
        return _DONE

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]:
        with self._cond:
            self._check_open("extend")
            until = self._clock() + self.visibility_timeout
            renewed = []
            for delivery in deliveries:
                lease = self._leases.get(delivery.receipt)
                if lease is None:
                    renewed.append(self._not_leased(delivery))
                    continue
                if lease.expires_at != until:
                    lease.expires_at = until
                    self._push_expiry(lease)
                renewed.append(_DONE)
            return renewed

    def wake(self) -> None:
        with self._cond:
            self._wake_pending = True
            self._cond.notify_all()

    def depth(self) -> dict[str, Depth]:
        with self._cond:
            self._check_open("depth")
            self._promote(self._clock())
            names = self._ready.keys() | self._delayed_count.keys() | self._leased_count.keys()
            return {
                name: Depth(
                    ready=len(self._ready.get(name, ())),
                    delayed=self._delayed_count.get(name, 0),
                    leased=self._leased_count.get(name, 0),
                )
                for name in sorted(names)
            }

    def close(self) -> None:
        """Wake every waiter; later calls (except close, wake, drain) raise BrokerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def watch(self, hook: Callable[[], None]) -> bool:
        """Call ``hook`` (without the lock) after a change that no waiting get saw. One hook
        per broker (False when one is set already): a hook takes its worker's lock, and inline
        settles run under that lock, so two workers' hooks could each wait for the other's."""
        if self._watcher is not None:
            return False
        self._watcher = hook
        return True

    def timers_idle(self) -> bool:
        """Whether nothing but the leases falls due by the clock alone (no delayed task, no
        timed pause, no rate or breaker), so that only a call can give a get something."""
        return not (self._delayed or self._pauses or self._rates or self._breakers)

    def _ring(self) -> None:
        """Tell the watchers of a change no waiting get saw (called without the lock)."""
        self._unwatched = False
        if self._watcher is not None:
            self._watcher()

    # -- internals (called with the lock held) -------------------------------------------------

    def _notify(self) -> None:
        """Wake the waiting gets (and puts) after a change; note it when no get waited."""
        self._cond.notify_all()
        if not self._getters and self._watcher is not None:
            self._unwatched = True

    def _check_open(self, operation: str) -> None:
        """Raise BrokerClosed (naming ``operation``, the broker method) after close()."""
        if self._closed:
            raise BrokerClosed("the broker is closed", backend="memory", operation=operation)

    def _to_front(self, task: Task) -> None:
        """``task``, handed back, ready before every task not handed out yet, behind those
        handed back before it (Redis hands out its released entries oldest first, and SQLite
        keeps each in its place: neither reverses a batch handed back together)."""
        queue = self._queue(task.type)
        place = min(self._front.get(task.type, 0), len(queue))
        queue.insert(place, task)
        self._front[task.type] = place + 1

    def _left_front(self, type_name: str, n: int) -> None:
        """``n`` tasks left the head of ``type_name``'s queue."""
        front = self._front.get(type_name, 0) - n
        if front > 0:
            self._front[type_name] = front
        else:
            self._front.pop(type_name, None)

    def _queue(self, type_name: str) -> deque[Task]:
        queue = self._ready.get(type_name)
        if queue is None:
            queue = self._ready[type_name] = deque()
        return queue

    def _push_delayed(self, task: Task) -> None:
        heapq.heappush(self._delayed, (task.not_before, next(self._seq), task))
        self._delayed_count[task.type] = self._delayed_count.get(task.type, 0) + 1

    def _push_expiry(self, lease: _Lease) -> None:
        expiry = self._expiry
        if len(expiry) > 2 * len(self._leases) + 64:
            # Ended and renewed leases leave stale entries behind; rebuild from the live ones.
            expiry[:] = [(le.expires_at, next(self._seq), le) for le in self._leases.values()]
            heapq.heapify(expiry)
            if lease.receipt in self._leases:
                return  # the rebuild already holds its current expiry
        heapq.heappush(expiry, (lease.expires_at, next(self._seq), lease))

    def _end_lease(self, delivery: Delivery) -> _Lease | None:
        lease = self._leases.pop(delivery.receipt, None)
        if lease is not None:
            self._leased_count[lease.task.type] -= 1
        return lease

    def _settled_now(self, receipt: str, now: float) -> None:
        """Remember ``receipt`` as settled at ``now``; now and then drop what is too old."""
        self._settled[receipt] = now
        if now >= self._prune_at:
            self._prune_settled(now)

    def _prune_settled(self, now: float) -> None:
        cutoff = now - self.visibility_timeout
        stale = []
        # In settle order, so the walk stops at the first entry to keep: each entry is read
        # about once. A clock stepped back leaves an entry behind a later one until it leads.
        for receipt, at in self._settled.items():
            if at > cutoff:
                break
            stale.append(receipt)
        for receipt in stale:
            del self._settled[receipt]
        self._prune_at = now + self.visibility_timeout / 8

    def _gated(self, type_name: str, now: float) -> bool:
        """True while a pause holds ``type_name`` back; an expired pause is dropped."""
        pause = self._pauses.get(type_name)
        if pause is None:
            return False
        if pause.until is None or pause.until > now:
            return True
        del self._pauses[type_name]
        return False

    def _apply(self, effects: Effects, type_name: str) -> None:
        """A settle's effects, after it took effect: its outcome for the type's circuit, puts
        (never refused for capacity), then sets, then deletes."""
        now = self._clock()
        breaker = self._breakers.get(type_name) if effects.circuit is not None else None
        if breaker is not None and effects.circuit is not None:
            circuit = circuit_at(breaker, self._circuits.get(type_name), now)
            self._circuits[type_name] = circuit_recorded(breaker, circuit, effects.circuit, now)
            self._notify()  # a circuit closed lets a waiting get take the type
        if (effects.puts or effects.arrivals or effects.dead_letters) and (
            effects.unless is None or self._live_value(effects.unless, now) is None
        ):
            self._hand_off(effects, now)
        values = self._values
        for item in effects.sets:
            values[item.key] = (item.value, None if item.ttl_s is None else now + item.ttl_s)
        for key in effects.deletes:
            values.pop(key, None)
        if len(values) > 2 * self._values_swept_at + 64:
            # Keys whose ttl ran out read as absent; drop them once the map has doubled.
            for key in [
                k for k, (_, until) in values.items() if until is not None and until <= now
            ]:
                del values[key]
            self._values_swept_at = len(values)

    def _not_leased(self, delivery: Delivery) -> Answer:
        """The answer for a receipt that holds no lease: settled lately, or fenced."""
        at = self._settled.get(delivery.receipt)
        if at is not None and at > self._clock() - self.visibility_timeout:
            return _ALREADY_DONE
        return _FENCED

    def _forget_one(self) -> None:
        self._held -= 1
        if self._put_waiting:
            self._cond.notify_all()

    def _promote(self, now: float) -> None:
        """Move due delayed tasks to the back and expired leases to the front of their queues."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            task = heapq.heappop(delayed)[2]
            self._delayed_count[task.type] -= 1
            self._queue(task.type).append(task)
        expiry = self._expiry
        expired: list[_Lease] = []
        while expiry and expiry[0][0] <= now:
            at, _, lease = heapq.heappop(expiry)
            # Skip entries left behind by renewals and ended leases (and duplicates).
            if lease.expires_at == at and self._leases.get(lease.receipt) is lease:
                del self._leases[lease.receipt]
                expired.append(lease)
        # In expiry order, each behind the tasks handed back before it.
        for lease in expired:
            self._leased_count[lease.task.type] -= 1
            self._to_front(lease.task)
            self._redelivered.add(lease.task.id)

    def _next_due(self) -> float:
        due = float("inf")
        if self._delayed:
            due = self._delayed[0][0]
        if self._expiry:
            due = min(due, self._expiry[0][0])
        for pause in self._pauses.values():
            if pause.until is not None:
                due = min(due, pause.until)  # a paused type's tasks come back then
        for name, bucket in self._buckets.items():
            if self._ready.get(name):  # its next token hands one of them out
                due = min(due, next_token_at(self._rates[name], bucket))
        for name, circuit in self._circuits.items():
            reopens = circuit_reopens_at(self._breakers[name], circuit)
            if reopens is not None and self._ready.get(name):
                due = min(due, reopens)  # it may probe then
        return due
