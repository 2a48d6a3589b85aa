"""The lease keeper: renews the lease of every delivery the worker holds, and checks a stale one
before its task starts.

Every ``visibility_timeout / 3`` it extends the leases of every held delivery (prefetched,
running, or waiting for its settle to be answered). A renewal the broker answers FENCED (another
delivery owns the task now) drops an unstarted task unrun and reports ``task.lease_lost``; a
running one is reported once, when its settle is refused too; ALREADY_DONE (its settle went
through meanwhile) is no loss.

A process frozen past its leases (SIGSTOP, a VM pause) must not start, once thawed, prefetched
tasks another worker ran meanwhile: a task whose lease was last known good more than half a
lease ago is checked with the broker before it starts (``lapsed``), and dropped unrun if the
lease moved on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from runner.brokers.base import Answer, Broker, Delivery
from runner.engine.books import Books
from runner.errors import BrokerError
from runner.events import Event, EventBus, EventName

log = logging.getLogger("runner.worker")


class LeaseKeeper:
    """Owns the lease-keeping thread and its loop."""

    def __init__(
        self,
        broker: Broker,
        books: Books,
        events: EventBus,
        visibility_timeout_s: float,
        stopping: threading.Event,
    ) -> None:
        self._broker = broker
        self._books = books
        self._events = events
        self._visibility_timeout_s = visibility_timeout_s
        self._stopping = stopping
        self._thread = threading.Thread(target=self._run, name="dq-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.wait(self._visibility_timeout_s / 3):
            held = self._books.held_now()
            if held:
                self.renew(held)

    def renew(self, held: Sequence[Delivery]) -> list[Answer] | None:
        """Extend the leases of ``held``; report each unstarted one the broker refused (FENCED),
        dropped unrun. None when the broker failed (logged)."""
        asked = time.monotonic()
        try:
            answers = self._broker.extend(held)
        except BrokerError as exc:
            log.warning("lease renewal failed: %s", exc)
            return None
        for delivery in self._books.renewed(held, answers, asked):
            self._lost(delivery)
        return answers

    def _lost(self, delivery: Delivery) -> None:
        task = delivery.task
        self._events.emit(
            Event(EventName.TASK_LEASE_LOST, task_id=task.id, type=task.type,
                  attempt=task.attempt, detail="extend refused")
        )  # fmt: skip

    def lapsed(self, delivery: Delivery) -> bool:
        """Whether a task about to start may no longer be ours: if its lease was last known
        good more than half a lease ago (the process was frozen, or the renewals failed), ask
        the broker first. Lost (FENCED): it must not run (another worker may have run it)."""
        renewed = self._books.renewed_at(delivery)
        if renewed is None or time.monotonic() - renewed < self._visibility_timeout_s / 2:
            return False
        answers = self.renew([delivery])
        if answers is None or answers[0] is not Answer.FENCED:
            return False
        self._lost(delivery)  # picked to start, so not among those the renewal dropped
        return True
