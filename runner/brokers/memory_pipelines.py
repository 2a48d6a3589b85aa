"""The pipeline half of MemoryBroker: the hand-offs a settle's effects carry (puts of held ids
skipped, a join's parts and its firing, dead letters written with the settle) and the admin's
``tasks_of`` and ``cancel``. Mixed into MemoryBroker, whose lock, queues and put plumbing it uses
(declared below); the hand-offs run under the settle's lock hold, the admin calls take the lock.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from runner.brokers.base import Effects, Queued, cancelled_record, of_root
from runner.codec import from_json_bytes
from runner.deadletter.store import DeadLetterStore
from runner.model import Task


class MemoryPipelines:
    """Hand-offs and the pipeline admin in-process; MemoryBroker provides what is declared."""

    dead_letter_store: DeadLetterStore
    _clock: Callable[[], float]
    _cond: threading.Condition
    _ready: dict[str, deque[Task]]
    _front: dict[str, int]
    _redelivered: set[str]
    _delayed: list[tuple[float, int, Task]]
    _delayed_count: dict[str, int]
    _held: int
    # The ids of every task held (from put until ack or dead), from the first hand-off on
    # (``_held_ids``): an effect put of one is skipped.
    _ids: set[str] | None
    # A join's kept parts: key -> index -> JSON text; and the joins dead-lettered by a part's
    # death (their record is deleted when they fire).
    _joins: dict[str, dict[int, str]]
    _dead_joins: set[str]

    def _check_open(self, operation: str) -> None:
        raise NotImplementedError

    def _left_front(self, type_name: str, n: int) -> None:
        raise NotImplementedError

    def _enqueue(self, tasks: Sequence[Task], now: float) -> None:
        raise NotImplementedError

    def _queued(self) -> list[Queued]:
        raise NotImplementedError

    def _write_hand_off_letters(self, effects: Effects) -> None:
        """The dead-letter store's part of a settle's hand-offs (``effects``' dead letters,
        and the records of the dead joins its arrivals fire), written before the settle takes
        effect: a store that fails raises with nothing changed, so the task stays leased and
        its settle, tried again, hands off then (an ack that took effect first would answer
        ALREADY_DONE to that retry and start nothing). Writing again is harmless: each record
        replaces one of its id, and a record already taken is not there to take. A join's
        record is known as written at once: if the settle then fails (the task's own record),
        the join that fires later, from the task run again, still takes it."""
        store = self.dead_letter_store
        for record in effects.dead_letters:
            store.take([record.id])
            store.add(record)
            self._dead_joins.add(record.id)
        fired = [task_id for task_id in self._firing(effects) if task_id in self._dead_joins]
        if fired:
            store.take(fired)

    def _firing(self, effects: Effects) -> list[str]:
        """The ids of the joined tasks that ``effects``' arrivals will put, as ``_hand_off``
        will count their parts, without keeping them."""
        kept: dict[str, set[int]] = {}
        fired = []
        for arrival in effects.arrivals:
            parts = kept.get(arrival.key)
            if parts is None:
                parts = kept[arrival.key] = set(self._joins.get(arrival.key, ()))
            parts.add(arrival.index)
            if len(parts) >= arrival.size:
                fired.append(arrival.task.id)
                kept[arrival.key] = set()
        return fired

    def _hand_off(self, effects: Effects, now: float) -> None:
        """The puts, arrivals and dead letters of a settle that took effect (the caller has
        checked ``effects.unless`` and written the store's part: _write_hand_off_letters)."""
        puts = list(effects.puts)
        for arrival in effects.arrivals:
            parts = self._joins.setdefault(arrival.key, {})
            parts.setdefault(arrival.index, arrival.value)
            if len(parts) < arrival.size:
                continue
            del self._joins[arrival.key]
            payload = [from_json_bytes(parts[index]) for index in sorted(parts)]
            puts.append(replace(arrival.task, payload=payload))
            self._dead_joins.discard(arrival.task.id)
        held = self._held_ids()
        fresh: dict[str, Task] = {}
        for task in puts:
            if task.id not in held and task.id not in fresh:
                fresh[task.id] = task
        if fresh:
            self._enqueue(list(fresh.values()), now)

    def _held_ids(self) -> set[str]:
        """The ids of every held task: gathered once, at the first hand-off, then kept up by
        every put, ack and dead-letter."""
        if self._ids is None:
            self._ids = {queued.task.id for queued in self._queued()}
        return self._ids

    def tasks_of(self, root_id: str) -> list[Queued]:
        with self._cond:
            self._check_open("tasks_of")
            found = self._queued()
        return [queued for queued in found if of_root(queued.task, root_id)]

    def cancel(self, root_id: str, message: str) -> list[str]:
        with self._cond:
            self._check_open("cancel")
            now = self._clock()
            # Their records are written before they leave their queues: a store that fails
            # raises with every task still queued.
            cancelled = [t for queue in self._ready.values() for t in queue if of_root(t, root_id)]
            delayed = [entry for entry in self._delayed if of_root(entry[2], root_id)]
            cancelled += [task for _, _, task in delayed]
            if not cancelled:
                return []
            self.dead_letter_store.add_many([cancelled_record(t, message, now) for t in cancelled])
            for type_name, queue in self._ready.items():
                kept = [t for t in queue if not of_root(t, root_id)]
                if len(kept) < len(queue):
                    front = self._front.get(type_name, 0)
                    gone = sum(1 for t in list(queue)[:front] if of_root(t, root_id))
                    queue.clear()
                    queue.extend(kept)
                    self._left_front(type_name, gone)
            if delayed:
                self._delayed[:] = [e for e in self._delayed if not of_root(e[2], root_id)]
                heapq.heapify(self._delayed)
                for _, _, task in delayed:
                    self._delayed_count[task.type] -= 1
            for task in cancelled:
                if self._ids is not None:
                    self._ids.discard(task.id)
                self._redelivered.discard(task.id)
            self._held -= len(cancelled)
            self._cond.notify_all()
            return [task.id for task in cancelled]
