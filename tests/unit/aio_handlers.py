"""Handlers of the async execution tests (tests/unit/test_async_mode.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from runner import TaskContext

#: How many ``nap`` coroutines run at once now, and the most at any moment.
_lock = threading.Lock()
running = 0
most = 0
#: Task ids whose coroutine was cancelled (CancelledError reached the handler).
cancelled: list[str] = []
#: Task ids whose handler saw ctx.cancelled set.
saw_cancelled: list[str] = []


def reset() -> None:
    global running, most
    with _lock:
        running = most = 0
    cancelled.clear()
    saw_cancelled.clear()


async def nap(payload: Any, ctx: TaskContext) -> Any:
    """Awaits ``payload["s"]`` seconds (cancellable); returns its payload."""
    global running, most
    with _lock:
        running += 1
        most = max(most, running)
    try:
        await asyncio.sleep(float(payload.get("s", 0.0)))
    except asyncio.CancelledError:
        cancelled.append(ctx.task_id)
        if ctx.cancelled.is_set():
            saw_cancelled.append(ctx.task_id)
        raise
    finally:
        with _lock:
            running -= 1
    return payload


async def polite(payload: Any, ctx: TaskContext) -> str:
    """Waits for ctx.cancelled (timeout_action: cancel), then returns."""
    while not ctx.cancelled.is_set():
        await asyncio.sleep(0.01)
    saw_cancelled.append(ctx.task_id)
    return "stopped"


async def blocker(payload: Any, ctx: TaskContext) -> None:
    """Blocks the event loop with a blocking call (what an async handler must not do)."""
    time.sleep(float(payload["s"]))


def plain(payload: Any, ctx: TaskContext) -> None:
    """A thread handler that holds its thread for ``payload["s"]`` seconds."""
    time.sleep(float(payload.get("s", 0.0)))
