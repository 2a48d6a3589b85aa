"""Handlers of the process execution tests (tests/unit/test_process_mode.py). They run in child
processes: what they report goes through their return value or files, never module state."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runner import TaskContext
from runner.errors import PermanentError, Retry

#: Memory a ``hog`` keeps for the rest of its child's life.
_kept: list[bytearray] = []


class Refused(Exception):
    """Named in never_retry by the tests: the parent matches it against the child's raise."""


class Order(BaseModel):
    order: int


def whoami(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Its child's pid, its payload, and a little CPU."""
    total = sum(range(int(payload.get("spin", 0)) if isinstance(payload, dict) else 0))
    return {"pid": os.getpid(), "payload": payload, "total": total}


def note_and_sleep(payload: Any, ctx: TaskContext) -> None:
    """Writes its child's pid to ``payload["dir"]``, then sleeps ``payload["s"]`` (a C call)."""
    Path(payload["dir"], f"{ctx.task_id}.pid").write_text(str(os.getpid()))
    if payload.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(payload["s"]))


def polite(payload: Any, ctx: TaskContext) -> int:
    """Waits for ctx.cancelled (timeout_action: cancel), then returns its pid."""
    ctx.cancelled.wait(30)
    return os.getpid()


def crash(payload: Any, ctx: TaskContext) -> None:
    """Dies as ``payload["how"]`` says: a segfault, or os._exit(5)."""
    if payload["how"] == "segfault":
        ctypes.string_at(0)
    os._exit(5)


def fail(payload: Any, ctx: TaskContext) -> None:
    """Raises what ``payload["raise"]`` names."""
    kind = payload["raise"]
    if kind == "refused":
        raise Refused("not today")
    if kind == "permanent":
        raise PermanentError("never works")
    if kind == "retry":  # once: the first run leaves a mark
        mark = Path(payload["dir"], "retried")
        if not mark.exists():
            mark.write_text(str(ctx.attempt))
            raise Retry(delay=0.05, count=False)
        return ctx.attempt
    raise ValueError(f"bad value {payload.get('n')}")


def chatty(payload: Any, ctx: TaskContext) -> None:
    """Logs through ctx.logger (with a field) and through a module logger, with a traceback."""
    ctx.logger.info("hello from the child", extra={"step": 3})
    try:
        raise KeyError("lost")
    except KeyError:
        logging.getLogger("shop.images").exception("could not find it")


def hog(payload: Any, ctx: TaskContext) -> int:
    """Keeps ``payload["mb"]`` MiB for its child's life; returns its pid."""
    _kept.append(bytearray(int(payload["mb"]) * 1024 * 1024))
    _kept[-1][::4096] = b"x" * len(_kept[-1][::4096])  # touched: resident
    return os.getpid()


def a_set(payload: Any, ctx: TaskContext) -> set[int]:
    """Returns what JSON cannot carry."""
    return {1, 2}


def ship(order: Order, ctx: TaskContext) -> dict[str, Any]:
    """Annotated with a pydantic model: it gets the model, in the child too."""
    return {"model": type(order).__name__, "order": order.order}


async def not_here(payload: Any) -> None:
    """An async def: refused on a process type."""
