"""Engine events: one small record per state change, fanned out to listeners.

The engine emits; logs, metrics, the live progress view and the final summary listen. A
listener must be fast and must never raise (the bus drops and counts what it raises, so a broken
listener cannot stop a worker).

Event names (the `event` field of every log line):

    task.published   a task entered the broker
    task.started     a worker began an attempt (queue_wait_s: published or due -> started);
                     for a redelivered task it is written out before the handler runs (flush)
    task.succeeded   the attempt returned (duration_s)
    task.retrying    the attempt failed and the task will run again after delay_s
    task.timeout     the attempt ran past its timeout (followed by task.retrying or task.dead)
    task.dead        the task went to the dead-letter queue (reason, error)
    task.lease_lost  the broker refused an ack/retry/dead: another delivery owns the task now
    task.overrun     an interrupted handler has not returned (stuck in a C call); keeps its slot
    task.interrupted an asynchronous interrupt was raised in a handler thread
    worker.started, worker.stopping, worker.stopped
    broker.reconnecting  (brokers with a network connection)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Event:
    """One state change. Fields that do not apply are None. Treat it as read-only: it is
    shared by every listener (not frozen only because a frozen dataclass costs twice as much
    to build, and the engine builds three per task)."""

    name: str
    ts: float = field(default_factory=time.time)
    task_id: str | None = None
    type: str | None = None
    attempt: int | None = None
    duration_s: float | None = None
    queue_wait_s: float | None = None
    delay_s: float | None = None
    outcome: str | None = None  # succeeded | retrying | dead
    reason: str | None = None  # why a task is dead, or why the worker stops
    error: str | None = None  # "ErrorType: message"
    error_type: str | None = None
    detail: str | None = None  # free text for operator events
    traceback: str | None = None  # a failed attempt's (task.retrying, task.dead)
    # Listeners that write asynchronously (the logs) have written this event out before
    # handle() returns: a redelivered task's task.started, whose handler may end the process.
    flush: bool = False


class Listener(Protocol):
    def handle(self, event: Event) -> None: ...


class EventBus:
    """Fans every event out to its listeners, in order, on the emitting thread."""

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self._listeners: tuple[Listener, ...] = tuple(listeners)
        self._lock = threading.Lock()
        self.listener_errors = 0

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return self._listeners

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener.handle(event)
            except Exception:  # a broken listener must not stop a worker
                self.listener_errors += 1
