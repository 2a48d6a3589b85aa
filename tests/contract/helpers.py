"""Small builders and a background-call helper shared by the contract tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from runner.brokers.base import Broker, Delivery
from runner.model import AttemptRecord, DeadLetter, Task

ALL = {"a": 100, "b": 100, "c": 100}


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
