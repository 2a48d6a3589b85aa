"""Fault injection for simulated tasks: the plan a task carries, applied around its handler.

Faults are decided per task from the seed when the task is published (runner.ops.produce) and
travel in its payload under SIM_KEY, so every worker process (and a replay) sees the same plan:

- ``latency_s``: how long the attempt works (in short sleeps, so a timeout can interrupt it);
- ``fail_attempts``: the first N attempts raise SimulatedFailure (retryable);
- ``hang_attempt``: that attempt loops until it is cancelled, i.e. runs past its timeout;
- ``poison``: every attempt raises PoisonPayload, a ValueError (list it in never_retry to see
  it dead-lettered at once).

``with_faults(handler)`` applies the plan and then calls the real handler with the payload
minus SIM_KEY; tasks without SIM_KEY pass straight through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from runner.model import TaskContext

SIM_KEY = "__dq_sim__"


#: A handler hanging on purpose checks for cancellation this often (a long sleep is a C call).
_TICK_S = 0.01


class SimulatedFailure(RuntimeError):
    """A transient failure injected by the simulator."""


class PoisonPayload(ValueError):
    """A payload the simulator marked as one that can never succeed."""


def with_faults(handler: Callable[[Any, TaskContext], Any]) -> Callable[[Any, TaskContext], Any]:
    """Wrap a handler so that simulated payloads behave as their fault plan says."""

    def run(payload: Any, ctx: TaskContext) -> Any:
        if not isinstance(payload, dict) or SIM_KEY not in payload:
            return handler(payload, ctx)
        plan = payload[SIM_KEY]
        real_payload = {k: v for k, v in payload.items() if k != SIM_KEY}
        if plan.get("poison"):
            raise PoisonPayload(f"payload #{real_payload.get('n')} can never be processed")
        if ctx.attempt == plan.get("hang_attempt"):
            while not ctx.cancelled.is_set():
                time.sleep(_TICK_S)
        _work_for(float(plan.get("latency_s", 0.0)), ctx)
        if ctx.attempt <= int(plan.get("fail_attempts", 0)):
            raise SimulatedFailure(f"simulated failure on attempt {ctx.attempt}")
        return handler(real_payload, ctx)

    return run


def _work_for(seconds: float, ctx: TaskContext) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not ctx.cancelled.is_set():
        time.sleep(min(_TICK_S, left))
