"""Handlers for the flow-control tests (circuit breakers): a pretend downstream service."""

from __future__ import annotations

import threading
import time
from typing import Any

from runner import TaskContext

#: While True, ``call_downstream`` fails as a dead service would.
down = False
#: When each attempt of ``call_downstream`` started (time.monotonic()).
starts: list[float] = []


def call_downstream(payload: Any, ctx: TaskContext) -> None:
    starts.append(time.monotonic())
    if down:
        raise ConnectionError("downstream refused the connection")


def echo(payload: Any, ctx: TaskContext) -> Any:
    """Returns its payload (a result to keep)."""
    return payload


def unjsonable(payload: Any, ctx: TaskContext) -> object:
    """Returns what JSON cannot hold."""
    return object()


def refuse(payload: Any, ctx: TaskContext) -> None:
    raise ValueError("not this one")


#: (type, task id, payload, headers) of every run of ``record``.
recorded: list[tuple[str, str, Any, dict[str, Any]]] = []


def fetch_order(payload: Any, ctx: TaskContext) -> Any:
    """A pipeline's first stage: returns what its payload says (images to fan out over)."""
    return {"order": payload["order"], "images": payload["images"]}


def record(payload: Any, ctx: TaskContext) -> None:
    recorded.append((ctx.type, ctx.task_id, payload, dict(ctx.headers)))


#: Items ``shrink`` refuses for good while they are in it.
refused: set[str] = set()


def shrink(payload: Any, ctx: TaskContext) -> str:
    """A fan-out member: its result is a join's part."""
    from runner.errors import PermanentError

    if payload in refused:
        raise PermanentError(f"cannot shrink {payload}")
    return f"{payload}-small"


#: Set when ``patient`` starts; how long it waits.
patient_started = threading.Event()
patient_wait_s = 10.0


def patient(payload: Any, ctx: TaskContext) -> Any:
    """Waits up to ``patient_wait_s`` for ``ctx.cancelled``; records whether it came."""
    patient_started.set()
    saw = ctx.cancelled.wait(patient_wait_s)
    recorded.append((ctx.type, ctx.task_id, payload, {"cancelled": saw}))
    return payload


def log_lineage(payload: Any, ctx: TaskContext) -> None:
    """Records the fields its ctx.logger lines carry."""
    recorded.append((ctx.type, ctx.task_id, payload, dict(ctx.logger.extra or {})))
