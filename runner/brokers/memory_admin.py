"""The BrokerAdmin half of MemoryBroker: the operator commands (dead letters, replay, purge,
queue ages, the shutdown drain), and the broker's plain calls beside the task path: its clock,
the gates (set, cleared and listed here with the rate limits' buckets and the circuit breakers'
circuits, honoured inside every claim) and the values that settle effects, ``put_if`` and
``put_unique`` set. None of it is on the claim and settle path, so it lives apart from that
path in memory.py. Mixed into MemoryBroker, whose lock, queues and put plumbing it uses
(declared below); each call that reads or changes the queues, gates or values holds the
broker's one lock while it does, as the task path does.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from runner.brokers.base import (
    UNIQUE_PREFIX,
    Bucket,
    Circuit,
    CircuitBreaker,
    DeadLetterFilter,
    Gate,
    Pause,
    Queued,
    RateLimit,
    SetValue,
)
from runner.brokers.flow import circuit_at, refilled
from runner.deadletter.store import DeadLetterStore
from runner.errors import QueueFull
from runner.model import DeadLetter, DeadReason, Task, replayable

if TYPE_CHECKING:  # for the declarations only: memory.py imports this module at run time
    from runner.brokers.memory import _Lease


_P = ParamSpec("_P")
_R = TypeVar("_R")
_M = TypeVar("_M", bound="MemoryAdmin")


def ringing(method: Callable[Concatenate[_M, _P], _R]) -> Callable[Concatenate[_M, _P], _R]:
    """A public call that may give a get something: once it returns (its lock released), the
    broker's watchers hear of a change no waiting get saw (see ``watch`` in memory.py)."""

    @functools.wraps(method)
    def call(self: _M, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        finally:
            if self._unwatched:
                self._ring()

    return call


class MemoryAdmin:
    """BrokerAdmin in-process; MemoryBroker provides what is declared here."""

    capacity: int
    enqueue_timeout: float
    dead_letter_store: DeadLetterStore
    _clock: Callable[[], float]
    _cond: threading.Condition
    _ready: dict[str, deque[Task]]
    _front: dict[str, int]
    _redelivered: set[str]
    _delayed: list[tuple[float, int, Task]]
    _delayed_count: dict[str, int]
    _leases: dict[str, _Lease]
    _leased_count: dict[str, int]
    _expiry: list[tuple[float, int, _Lease]]
    _held: int
    _pauses: dict[str, Pause]
    _rates: dict[str, RateLimit]
    _buckets: dict[str, Bucket]
    _breakers: dict[str, CircuitBreaker]
    _circuits: dict[str, Circuit]
    _values: dict[str, tuple[str, float | None]]
    _ids: set[str] | None
    _joins: dict[str, dict[int, str]]
    _unwatched: bool

    def _ring(self) -> None:
        raise NotImplementedError

    def _notify(self) -> None:
        raise NotImplementedError

    def _check_open(self, operation: str) -> None:
        raise NotImplementedError

    def _wait_for_room(self, n: int, timeout: float | None, operation: str) -> None:
        raise NotImplementedError

    def _enqueue(self, tasks: Sequence[Task], now: float) -> None:
        raise NotImplementedError

    def _gated(self, type_name: str, now: float) -> bool:
        raise NotImplementedError

    def dead_letters(self, where: DeadLetterFilter) -> list[DeadLetter]:
        self._check_open("dead_letters")
        return self.dead_letter_store.records(where)

    @ringing
    def replay(self, ids: Sequence[str]) -> int:
        """Put dead tasks back with attempts reset to 0; all or none, waiting for room like put."""
        with self._cond:
            self._check_open("replay")
            wanted = frozenset(ids)
            found = self.dead_letter_store.records(DeadLetterFilter(ids=wanted))
            if not found:
                return 0
            self._wait_for_room(len(found), None, "replay")
            tasks = [
                replace(r.task, attempt=0, not_before=0.0)
                for r in self.dead_letter_store.take(wanted)
            ]
            for task in tasks:
                self._redelivered.discard(task.id)
            self._enqueue(tasks, self._clock())
            return len(tasks)

    def dead_letter_count(self) -> int:
        return self.dead_letter_store.count()

    def oldest_enqueued_at(self) -> dict[str, float]:
        """Per type, the earliest ``enqueued_at`` of its ready, delayed and leased tasks."""
        with self._cond:
            self._check_open("oldest_enqueued_at")
            queued = self._queued()
        oldest: dict[str, float] = {}
        for task in (q.task for q in queued):
            oldest[task.type] = min(task.enqueued_at, oldest.get(task.type, task.enqueued_at))
        return oldest

    def _queued(self) -> list[Queued]:
        """Every held task with its state (ready, delayed by due time, leased); the caller
        holds the lock."""
        found = [Queued(t, "ready") for queue in self._ready.values() for t in queue]
        found.extend(Queued(t, "delayed") for _, _, t in sorted(self._delayed))
        found.extend(Queued(lease.task, "leased") for lease in self._leases.values())
        return found

    def purge(self, where: DeadLetterFilter) -> int:
        self._check_open("purge")
        return self.dead_letter_store.purge(where)

    def drain_to_dead_letters(
        self,
        reason: str = DeadReason.SHUTDOWN,
        include_leased: bool = False,
        now: float | None = None,
    ) -> list[DeadLetter]:
        """Move every queued and delayed task (and leased ones if asked) to the dead letters.

        The engine calls this at shutdown, after releasing its prefetched tasks, so that nothing
        on this in-process broker is lost silently. Leased deliveries drained here are fenced:
        a late ack answers FENCED. Works after ``close()``. Returns the records written.
        """
        with self._cond:
            at = self._clock() if now is None else now
            tasks: list[Task] = [t for queue in self._ready.values() for t in queue]
            tasks.extend(t for _, _, t in sorted(self._delayed))
            if include_leased:
                tasks.extend(lease.task for lease in self._leases.values())
            if not tasks:
                return []
            records = [_drained(t, reason, at) for t in tasks]
            self.dead_letter_store.add_many(records)
            self._ready.clear()
            self._front.clear()
            self._redelivered.clear()
            self._delayed.clear()
            self._delayed_count.clear()
            if include_leased:
                self._leases.clear()
                self._leased_count.clear()
                self._expiry.clear()
            self._held -= len(tasks)
            if self._ids is not None:
                self._ids.difference_update(t.id for t in tasks)
            self._cond.notify_all()
            return records

    # -- clock, gates and values (runner.brokers.base) ---------------------------------------------

    def now(self) -> float:
        return self._clock()

    @ringing
    def set_gate(self, type_name: str, gate: Gate) -> None:
        with self._cond:
            self._check_open("set_gate")
            if isinstance(gate, RateLimit):
                self._rates[type_name] = gate  # its bucket keeps its tokens
            elif isinstance(gate, CircuitBreaker):
                self._breakers[type_name] = gate  # its circuit keeps its state
            else:
                self._pauses[type_name] = gate
            self._notify()  # a waiting get's next due time may be the gate's end

    @ringing
    def clear_gate(self, type_name: str, kind: type[Gate]) -> bool:
        with self._cond:
            self._check_open("clear_gate")
            if kind is RateLimit:
                self._buckets.pop(type_name, None)
                in_force = self._rates.pop(type_name, None) is not None
            elif kind is CircuitBreaker:
                self._circuits.pop(type_name, None)
                in_force = self._breakers.pop(type_name, None) is not None
            else:
                in_force = self._gated(type_name, self._clock())
                self._pauses.pop(type_name, None)
            self._notify()
            return in_force

    def gates(self) -> dict[str, tuple[Gate, ...]]:
        with self._cond:
            self._check_open("gates")
            now = self._clock()
            found: dict[str, tuple[Gate, ...]] = {}
            for name in sorted(set(self._pauses) | set(self._rates) | set(self._breakers)):
                in_force: tuple[Gate, ...] = (
                    *((self._pauses[name],) if self._gated(name, now) else ()),
                    *((self._rates[name],) if name in self._rates else ()),
                    *((self._breakers[name],) if name in self._breakers else ()),
                )
                if in_force:
                    found[name] = in_force
            return found

    def circuits(self) -> dict[str, Circuit]:
        with self._cond:
            self._check_open("circuits")
            now = self._clock()
            return {
                name: circuit_at(breaker, self._circuits.get(name), now)
                for name, breaker in sorted(self._breakers.items())
            }

    def buckets(self) -> dict[str, Bucket]:
        with self._cond:
            self._check_open("buckets")
            now = self._clock()
            return {
                name: refilled(limit, self._buckets.get(name), now)
                for name, limit in sorted(self._rates.items())
            }

    def read_values(self, keys: Sequence[str]) -> dict[str, str]:
        with self._cond:
            self._check_open("read_values")
            now = self._clock()
            found = {}
            for key in keys:
                value = self._live_value(key, now)
                if value is not None:
                    found[key] = value
            return found

    @ringing
    def put_if(self, key: str, expected: str | None, value: str, tasks: Sequence[Task]) -> bool:
        with self._cond:
            self._check_open("put_if")
            now = self._clock()
            if self._live_value(key, now) != expected:
                return False
            if tasks and self._held + len(tasks) > self.capacity:
                raise QueueFull(
                    f"queue full ({self._held}/{self.capacity} tasks held): "
                    f"{len(tasks)} task(s) not enqueued",
                    backend="memory",
                    operation="put_if",
                )
            self._values[key] = (value, None)
            if tasks:
                self._enqueue(tasks, now)
            return True

    @ringing
    def put_unique(self, tasks: Sequence[Task], timeout: float | None = None) -> list[str]:
        """``put_many`` of the tasks whose unique key is free; the holder's id for the others."""
        wait_s = self.enqueue_timeout if timeout is None else timeout
        end = time.monotonic() + wait_s
        with self._cond:
            self._check_open("put_unique")
            while True:
                now = self._clock()
                answers, fresh = self._unique_split(tasks, now)
                if len(fresh) <= self.capacity - self._held or not fresh:
                    break
                # Wait for room (one deadline for the whole call), then look at the keys again:
                # they may have changed meanwhile.
                self._wait_for_room(len(fresh), max(end - time.monotonic(), 0.0), "put_unique")
            for task in fresh:
                if task.unique_key:
                    self._values[UNIQUE_PREFIX + task.unique_key] = (task.id, None)
            if fresh:
                self._enqueue(fresh, now)
            return answers

    def _unique_split(self, tasks: Sequence[Task], now: float) -> tuple[list[str], list[Task]]:
        """Each task's answer (its own id or its key's holder) and the tasks to put."""
        answers: list[str] = []
        fresh: list[Task] = []
        claimed: dict[str, str] = {}  # keys taken by earlier tasks of this call
        for task in tasks:
            key = task.unique_key
            holder = (
                (claimed.get(key) or self._live_value(UNIQUE_PREFIX + key, now)) if key else None
            )
            if holder is not None:
                answers.append(holder)
                continue
            if key:
                claimed[key] = task.id
            answers.append(task.id)
            fresh.append(task)
        return answers, fresh

    def scan_values(self, prefix: str) -> dict[str, str]:
        with self._cond:
            self._check_open("scan_values")
            now = self._clock()
            return {
                key: held[0]
                for key, held in sorted(self._values.items())
                if key.startswith(prefix) and (held[1] is None or held[1] > now)
            }

    def delete_values(self, keys: Sequence[str]) -> int:
        with self._cond:
            self._check_open("delete_values")
            now = self._clock()
            live = [key for key in set(keys) if self._live_value(key, now) is not None]
            for key in set(keys):
                self._values.pop(key, None)
                if self._joins.pop(key, None) is not None:
                    live.append(key)
            return len(live)

    def set_values(self, sets: Sequence[SetValue]) -> None:
        with self._cond:
            self._check_open("set_values")
            now = self._clock()
            for item in sets:
                until = None if item.ttl_s is None else now + item.ttl_s
                self._values[item.key] = (item.value, until)

    def _live_value(self, key: str, now: float) -> str | None:
        """The value of ``key``, or None when it is absent or its ttl ran out."""
        held = self._values.get(key)
        if held is None or (held[1] is not None and held[1] <= now):
            return None
        return held[0]


def _drained(task: Task, reason: str, at: float) -> DeadLetter:
    last = task.history[-1] if task.history else None
    return DeadLetter(
        task=replayable(task),
        reason=reason,
        error_type=last.error_type if last else "",
        message=last.message if last else f"never ran: the broker was drained ({reason})",
        traceback=last.traceback if last else "",
        attempts=task.attempt,
        first_attempt_at=task.history[0].started_at if task.history else 0.0,
        last_attempt_at=last.started_at if last else 0.0,
        dead_at=at,
    )
