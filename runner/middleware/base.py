"""The middleware seam: hooks around a task's life, in a declared order.

A middleware subclasses ``Middleware`` and overrides the hooks it needs (each is a no-op here):

- ``on_publish(type_name, payload, headers)``: as a task is published, before it reaches the
  broker; it may add to ``headers`` (they travel with the task: ``ctx.headers``). Raising
  refuses the publish (``UsageError`` naming the middleware); nothing is put.
- ``wrap(type_name, handler)``: once per task type when the pipeline is built; returns the
  handler to call. The first middleware's wrapper is the outermost.
- ``before_attempt(ctx, payload)``: before each attempt's ``task.started``; returns the payload
  the handler gets. Raising ``InvalidPayload`` dead-letters the task (reason ``invalid
  payload``; it never runs); raising anything else fails the attempt (retried as usual).
- ``after_attempt(ctx, error)``: after the handler returned (``error`` None) or raised. Raising
  fails the attempt.
- ``on_dead_letter(record)``: a task's dead letter was written (the broker took it).
- ``on_worker_start()`` / ``on_worker_stop()``: as the worker starts and once it has stopped.

A hook that raises is logged with its middleware's name (``middleware.failed``); outside an
attempt the worker lives on. The chain is built once per task type (no per-task lookups): the
built-ins first, in this order (payload validation, simulation; later: unique keys, flow gates,
pipeline hand-offs), then the pipeline's own ``middleware:`` in the order the YAML lists them.

May import: runner.model and runner.errors only (the engine calls these hooks; the config
validates ``middleware:`` entries against this class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runner.model import DeadLetter, TaskContext

Handler = Callable[[Any, TaskContext], Any]


class Middleware:
    """Hooks around a task's life; see the module docstring. Every hook is a no-op here."""

    @property
    def name(self) -> str:
        """How logs and errors name this middleware (its class, by default)."""
        return type(self).__name__

    def on_publish(self, type_name: str, payload: Any, headers: dict[str, Any]) -> None:
        """A task of ``type_name`` is being published; ``headers`` may be added to."""

    def wrap(self, type_name: str, handler: Handler) -> Handler:
        """The handler to call for ``type_name`` (built once, when the pipeline is built)."""
        return handler

    def before_attempt(self, ctx: TaskContext, payload: Any) -> Any:
        """Before each attempt: the payload the handler will get."""
        return payload

    def after_attempt(self, ctx: TaskContext, error: BaseException | None) -> None:
        """After each attempt's handler returned (``error`` None) or raised ``error``."""

    def on_dead_letter(self, record: DeadLetter) -> None:
        """A task became a dead letter."""

    def on_worker_start(self) -> None:
        """The worker is starting (before it takes any task)."""

    def on_worker_stop(self) -> None:
        """The worker has stopped (nothing runs any more)."""


def overriding(chain: tuple[Middleware, ...], hook: str) -> tuple[Middleware, ...]:
    """The middlewares of ``chain`` that override ``hook`` (the rest need not be called)."""
    default = getattr(Middleware, hook)
    return tuple(m for m in chain if getattr(type(m), hook) is not default)


def wrap_chain(chain: tuple[Middleware, ...], type_name: str, handler: Handler) -> Handler:
    """``handler`` wrapped by every middleware of ``chain``, the first one outermost."""
    for middleware in reversed(chain):
        handler = middleware.wrap(type_name, handler)
    return handler
