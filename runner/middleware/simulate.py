"""Fault injection for simulated tasks: the plan a task carries, applied around its handler.

Faults are decided per task from the seed when the task is published (runner.ops.produce) and
travel in its headers under SIM_HEADER (not in the payload: the handler, and the payload's
model, never see them), so every worker process (and a replay) sees the same plan:

- ``latency_s``: how long the attempt works (in short sleeps, so a timeout can interrupt it);
- ``fail_attempts``: the first N attempts raise SimulatedFailure (retryable);
- ``hang_attempt``: that attempt loops until it is cancelled, i.e. runs past its timeout;
- ``poison``: every attempt raises PoisonPayload, a ValueError (list it in never_retry to see
  it dead-lettered at once).

The ``Simulation`` middleware (the second built-in, after payload validation) wraps every
handler with ``with_faults``, which applies a task's plan and then calls the real handler;
tasks without the header pass straight through.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from runner.middleware.base import Handler, Middleware
from runner.model import TaskContext

#: The header a simulated task's fault plan travels in.
SIM_HEADER = "dq-sim"


#: A handler hanging on purpose checks for cancellation this often (a long sleep is a C call).
_TICK_S = 0.01


class SimulatedFailure(RuntimeError):
    """A transient failure injected by the simulator."""


class PoisonPayload(ValueError):
    """A payload the simulator marked as one that can never succeed."""


class Simulation(Middleware):
    """Applies the simulator's fault plans (see the module docstring)."""

    def wrap(self, type_name: str, handler: Handler) -> Handler:
        return with_faults(handler)


def with_faults(handler: Handler) -> Handler:
    """Wrap a handler so that simulated tasks behave as their fault plan says (an async
    type's handler in a coroutine that waits with ``asyncio.sleep``)."""
    if getattr(handler, "is_async", False):
        return _async_faults(handler)

    def run(payload: Any, ctx: TaskContext) -> Any:
        plan = ctx.headers.get(SIM_HEADER)
        if not plan:
            return handler(payload, ctx)
        if plan.get("poison"):
            raise PoisonPayload(f"payload #{plan.get('n')} can never be processed")
        if ctx.attempt == plan.get("hang_attempt"):
            while not ctx.cancelled.is_set():
                time.sleep(_TICK_S)
        _work_for(float(plan.get("latency_s", 0.0)), ctx)
        if ctx.attempt <= int(plan.get("fail_attempts", 0)):
            raise SimulatedFailure(f"simulated failure on attempt {ctx.attempt}")
        return handler(payload, ctx)

    return run


def _async_faults(handler: Handler) -> Handler:
    async def run(payload: Any, ctx: TaskContext) -> Any:
        plan = ctx.headers.get(SIM_HEADER)
        if plan:
            if plan.get("poison"):
                raise PoisonPayload(f"payload #{plan.get('n')} can never be processed")
            if ctx.attempt == plan.get("hang_attempt"):
                while not ctx.cancelled.is_set():
                    await asyncio.sleep(_TICK_S)
            end = time.monotonic() + float(plan.get("latency_s", 0.0))
            while (left := end - time.monotonic()) > 0 and not ctx.cancelled.is_set():
                await asyncio.sleep(min(_TICK_S, left))
            if ctx.attempt <= int(plan.get("fail_attempts", 0)):
                raise SimulatedFailure(f"simulated failure on attempt {ctx.attempt}")
        return await handler(payload, ctx)

    run.is_async = True  # type: ignore[attr-defined]
    return run


def _work_for(seconds: float, ctx: TaskContext) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not ctx.cancelled.is_set():
        time.sleep(min(_TICK_S, left))
