"""Middlewares and handlers for tests/unit/test_middleware.py, imported by ``module:Class``."""

from __future__ import annotations

import threading
from typing import Any

from runner import Middleware, TaskContext
from runner.errors import InvalidPayload
from runner.middleware.base import Handler
from runner.model import DeadLetter

#: Every hook call of every Recording middleware, in order: (name, hook, detail).
CALLS: list[tuple[str, str, Any]] = []
_lock = threading.Lock()
#: How many Recording middlewares were built.
BUILT: list[str] = []


def note(name: str, hook: str, detail: Any = None) -> None:
    with _lock:
        CALLS.append((name, hook, detail))


class Recording(Middleware):
    """Notes every hook; ``fail``: the hook that raises RuntimeError instead."""

    def __init__(self, label: str, fail: str = "") -> None:
        self.label = label
        self.fail = fail
        BUILT.append(label)

    @property
    def name(self) -> str:
        return f"Recording[{self.label}]"

    def _maybe_fail(self, hook: str) -> None:
        if hook == self.fail:
            raise RuntimeError(f"{self.label} refuses in {hook}")

    def on_publish(self, type_name: str, payload: Any, headers: dict[str, Any]) -> None:
        note(self.label, "on_publish", type_name)
        self._maybe_fail("on_publish")
        headers.setdefault("trail", []).append(self.label)

    def wrap(self, type_name: str, handler: Handler) -> Handler:
        label = self.label

        def wrapped(payload: Any, ctx: TaskContext) -> Any:
            note(label, "enter", ctx.task_id)
            try:
                return handler(payload, ctx)
            finally:
                note(label, "leave", ctx.task_id)

        return wrapped

    def before_attempt(self, ctx: TaskContext, payload: Any) -> Any:
        note(self.label, "before_attempt", ctx.attempt)
        self._maybe_fail("before_attempt")
        return payload

    def after_attempt(self, ctx: TaskContext, error: BaseException | None) -> None:
        note(self.label, "after_attempt", type(error).__name__ if error else None)
        self._maybe_fail("after_attempt")

    def on_dead_letter(self, record: DeadLetter) -> None:
        note(self.label, "on_dead_letter", record.reason)
        self._maybe_fail("on_dead_letter")

    def on_worker_start(self) -> None:
        note(self.label, "on_worker_start")
        self._maybe_fail("on_worker_start")

    def on_worker_stop(self) -> None:
        note(self.label, "on_worker_stop")
        self._maybe_fail("on_worker_stop")


class RefusesPayloads(Middleware):
    """Every payload is invalid before the attempt."""

    def before_attempt(self, ctx: TaskContext, payload: Any) -> Any:
        raise InvalidPayload("Anything", [("x", "refused by a test")])


class NotAMiddleware:
    pass


#: What the handler saw: (payload, headers, attempt).
SEEN: list[tuple[Any, dict[str, Any], int]] = []


def record(payload: Any, ctx: TaskContext) -> None:
    SEEN.append((payload, dict(ctx.headers), ctx.attempt))
