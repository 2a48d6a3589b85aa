"""Settling finished attempts with the broker: inline, or in the background in batches.

A worker thread that finished a task has one broker call left (ack, retry, dead or release).
On the memory broker that call costs a lock round, so the thread makes it itself (inline). On
SQLite and Redis it costs a transaction or a round trip, and a thread waiting for it is a thread
not running handlers; there the thread hands the call to the Settler's own thread and takes its
next task at once. The Settler sends everything handed to it meanwhile in one
``broker.settle_many`` call, so a busy worker settles many tasks per round trip.

What does not change: the outcome event (task.succeeded / retrying / dead, or task.lease_lost
when the broker refused) is emitted only once the broker answered, and a task whose settle did
not go through stays leased, so it comes back once its lease expires (at-least-once). The
Worker keeps holding (and renewing the lease of) every delivery until its settle is answered,
and stops taking tasks while ``max_unsettled`` are waiting, so a slow broker slows the workers
down instead of piling up finished tasks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.brokers.base import Broker, Settle
from runner.errors import BrokerClosed, BrokerError, BrokerUnavailable

log = logging.getLogger("runner.worker")

#: Pauses before trying a settle again after BrokerUnavailable (a SQLite file whose write lock a
#: frozen process holds past the busy timeout, a Redis reconnect). Giving up at once would leave
#: the task leased, to run a second time once the lease expires.
SETTLE_PAUSES_S = (0.05, 0.25, 1.0)

#: The most settles sent in one broker call.
MAX_BATCH = 256


@dataclass(slots=True)
class Outcome:
    """How an attempt ended: the broker call to make, and the event to emit once it is made.

    ``event`` is None for a call with no event of its own (a task handed back at shutdown).
    """

    settle: Settle
    event: str | None
    fields: dict[str, Any] = field(default_factory=dict)


#: Told about each batch once the broker answered: one answer per outcome, True (done), False
#: (refused: another delivery owns the task) or None (no answer; the task comes back later).
OnSettled = Callable[[Sequence[Outcome], Sequence[bool | None]], None]


class Settler:
    """Makes the broker calls of finished attempts; see the module docstring."""

    def __init__(self, broker: Broker, on_settled: OnSettled, background: bool) -> None:
        self.broker = broker
        self.background = background
        self._on_settled = on_settled
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="dq-settler", daemon=True)

    def start(self) -> None:
        if self.background:
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Settle everything handed over so far, then end the background thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def submit(self, outcome: Outcome) -> None:
        """Settle ``outcome``: in the background, or now when settling inline."""
        if self.background:
            self._queue.put(outcome)
        else:
            self.settle([outcome])

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Settle ``outcomes`` now, in this thread, and report them."""
        self._on_settled(outcomes, self.call([o.settle for o in outcomes]))

    def call(self, ops: Sequence[Settle]) -> list[bool | None]:
        """``broker.settle_many(ops)``: the answers, None for each op it could not answer.

        BrokerUnavailable is tried again after each of SETTLE_PAUSES_S (settles are fenced by
        the receipt, so trying again is safe). Any other broker error fails the ops one by one
        (so one bad op cannot sink the rest of its batch) and gives up on those that still fail.
        """
        for pause in (*SETTLE_PAUSES_S, None):
            try:
                return list(self.broker.settle_many(ops))
            except BrokerError as exc:
                if isinstance(exc, BrokerUnavailable) and pause is not None:
                    log.warning("broker settle of %d task(s) failed, trying again in %ss: %s",
                                len(ops), pause, exc)  # fmt: skip
                    time.sleep(pause)
                    continue
                if len(ops) > 1 and not isinstance(exc, BrokerUnavailable | BrokerClosed):
                    return [answer for op in ops for answer in self.call([op])]
                ids = ", ".join(op.delivery.task.id for op in ops)
                log.warning("broker settle failed for task %s, giving up: %s", ids, exc)
                return [None] * len(ops)
        return [None] * len(ops)  # not reached: the last pause is None

    def _loop(self) -> None:
        stopping = False  # the stop marker was seen: end once the queue is empty
        while True:
            try:
                item = self._queue.get(block=not stopping)
            except queue.Empty:
                return
            batch: list[Outcome] = []
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self.settle(batch)
                except Exception:
                    log.exception("settler error; the tasks come back when their leases expire")
