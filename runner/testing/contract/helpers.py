"""Small builders, a background-call helper and the timing constants of the contract tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from runner.brokers.base import Broker, Delivery
from runner.model import AttemptRecord, DeadLetter, Task

ALL = {"a": 100, "b": 100, "c": 100}

# Timing on a loaded machine (issue 14 item 8): a test never waits a fixed time for something to
# happen, and bounds a duration only where the duration is the point: from below exactly (not
# before the delay), from above loosely, far from what the bound tells apart.

#: Timeout of a get that must be handed a task: it returns as soon as the task comes, so a long
#: one costs nothing when the broker works and is never run out by a slow machine.
GET_TIMEOUT_S = 30.0
#: Upper bound for what takes well under a second when the broker works (a wake-up, a delay
#: of a few tenths): room for a loaded machine, yet far short of the 30 s timeouts a missed
#: wake-up would run out.
PROMPTLY_S = 5.0
#: A lease a test lets expire: short enough to wait out, long enough to hold through the few
#: calls a test makes while it must (on a loaded machine, a 0.3 s lease renewed every 0.1 s
#: has lapsed).
SHORT_LEASE_S = 1.0


def task(type_: str = "a", payload: Any = None, **fields: Any) -> Task:
    return Task(type=type_, payload=payload, enqueued_at=time.time(), **fields)


def put(broker: Broker, *tasks: Task) -> list[Task]:
    broker.put_many(list(tasks))
    return list(tasks)


def get_one(broker: Broker, type_: str = "a", timeout: float = 0.0) -> Delivery:
    got = broker.get({type_: 1}, 1, timeout)
    assert len(got) == 1, f"expected one {type_!r} task within {timeout}s, got {got}"
    return got[0]


def failure(attempt: int, error_type: str = "RuntimeError", message: str = "boom") -> AttemptRecord:
    return AttemptRecord(
        attempt=attempt,
        error_type=error_type,
        message=f"{message} {attempt}",
        traceback=f"Traceback (attempt {attempt})",
        started_at=time.time(),
        duration_s=0.01,
        worker="test:1",
    )


def dead_record(
    delivery: Delivery, reason: str = "error", last: AttemptRecord | None = None
) -> DeadLetter:
    """The record an engine would write for ``delivery`` (its last failure included)."""
    dead_task = delivery.task.with_failure(last) if last else delivery.task
    now = time.time()
    return DeadLetter(
        task=dead_task,
        reason=reason,
        error_type=last.error_type if last else "",
        message=last.message if last else "",
        traceback=last.traceback if last else "",
        attempts=delivery.task.attempt,
        first_attempt_at=dead_task.history[0].started_at if dead_task.history else now,
        last_attempt_at=now,
        dead_at=now,
    )


class Background:
    """Runs ``fn`` in a daemon thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.entered = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()
        self.entered.wait(5)

    def _run(self, fn: Callable[[], Any]) -> None:
        self.entered.set()
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def blocked_for(self, seconds: float) -> bool:
        """True when the call is still running after waiting ``seconds`` for it."""
        self._thread.join(seconds)
        return self._thread.is_alive()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background call still blocked after {timeout}s"

    @property
    def elapsed(self) -> float:
        assert self.ended_at is not None
        return self.ended_at - self.started_at
