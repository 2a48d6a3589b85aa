"""Engine events: one small record per state change, fanned out to listeners.

The engine emits; logs, metrics, the live progress view and the final summary listen. A
listener must be fast and must never raise (the bus drops and counts what it raises, so a broken
listener cannot stop a worker).

Event names are ``EventName`` members (below), never string literals: each is the ``event``
field of its log line, so the values are the wire names and never change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from runner.model import WireName


class EventName(WireName):
    """The name of every engine event; the value is the ``event`` field of its log line."""

    TASK_PUBLISHED = "task.published"  # a task entered the broker
    # A unique task was not published: its key is held by task_id (detail: the key).
    TASK_DEDUPLICATED = "task.deduplicated"
    # A worker began an attempt (queue_wait_s: published or due -> started); for a redelivered
    # task it is written out before the handler runs (flush).
    TASK_STARTED = "task.started"
    TASK_SUCCEEDED = "task.succeeded"  # the attempt returned (duration_s)
    TASK_RETRYING = "task.retrying"  # the attempt failed; the task runs again after delay_s
    # The attempt ran past its timeout (followed by task.retrying or task.dead).
    TASK_TIMEOUT = "task.timeout"
    TASK_DEAD = "task.dead"  # the task went to the dead-letter queue (reason, error)
    # The broker refused an ack/retry/dead/release: another delivery owns the task now.
    TASK_LEASE_LOST = "task.lease_lost"
    # An interrupted handler has not returned (stuck in a C call); it keeps its slot.
    TASK_OVERRUN = "task.overrun"
    TASK_INTERRUPTED = "task.interrupted"  # an asynchronous interrupt was raised in a handler
    WORKER_STARTED = "worker.started"
    WORKER_STOPPING = "worker.stopping"
    WORKER_STOPPED = "worker.stopped"
    BROKER_RECONNECTING = "broker.reconnecting"  # brokers with a network connection
    # A middleware hook raised (detail: "Name.hook: Error: message"); in an attempt it failed it.
    MIDDLEWARE_FAILED = "middleware.failed"
    # A schedule's tick published its task (schedule, tick, lag_s: how late, on the broker's clock).
    SCHEDULE_FIRED = "schedule.fired"
    # Ticks passed while no process ran were not fired (the schedule's `missed`; detail: how many).
    SCHEDULE_MISSED = "schedule.missed"
    SCHEDULE_FULL = "schedule.full"  # the broker was full: the tick is tried again shortly
    # A scheduler pass failed: a broker error, or a tick's task refused (error); tried again.
    SCHEDULE_FAILED = "schedule.failed"
    # This process's clock is off the broker's by lag_s (schedules fire by the broker's).
    SCHEDULE_CLOCK_SKEW = "schedule.clock_skew"
    SCHEDULE_REMOVED = "schedule.removed"  # the file no longer names it: its stored tick deleted
    # A type's rate limit was set in the broker at start (detail: "50/s, burst 50").
    RATE_LIMIT_SET = "rate_limit.set"
    RATE_LIMIT_CLEARED = "rate_limit.cleared"  # the file no longer gives the type one
    # A type's circuit breaker changed state (as this process saw it, runner.engine.circuits).
    CIRCUIT_OPENED = "circuit.opened"
    CIRCUIT_HALF_OPEN = "circuit.half_open"
    CIRCUIT_CLOSED = "circuit.closed"


@dataclass(slots=True)
class Event:
    """One state change. Fields that do not apply are None. Treat it as read-only: it is
    shared by every listener (not frozen only because a frozen dataclass costs twice as much
    to build, and the engine builds three per task)."""

    name: EventName
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
    schedule: str | None = None  # schedule.* events: the schedule's name
    tick: str | None = None  # the tick's nominal time (ISO 8601, UTC)
    lag_s: float | None = None  # how late a tick fired; a clock's skew
    traceback: str | None = None  # a failed attempt's (task.retrying, task.dead)
    # A pipeline's task: its pipeline's first task and the task that started it (never metric
    # labels: unbounded).
    root_id: str | None = None
    parent_id: str | None = None
    # Listeners that write asynchronously (the logs) have written this event out before
    # handle() returns: a redelivered task's task.started, whose handler may end the process.
    flush: bool = False


def task_event(
    name: EventName,
    task_id: str,
    type_name: str,
    attempt: int,
    duration_s: float | None = None,
    queue_wait_s: float | None = None,
    outcome: str | None = None,
) -> Event:
    """An event about one task, with the fields every task's events have.

    Built positionally: on Python 3.11 a class called with keywords first gathers them in a
    dict (about 1,600 instructions), and three such events are built for every task
    (published, started, succeeded). tests/unit/test_quick_init.py pins Event's field order."""
    return Event(
        name, time.time(), task_id, type_name, attempt, duration_s, queue_wait_s, None, outcome
    )


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
