"""One behaviour per handler, written twice: a plain def (thread and process types) and an
async def (async types), for tests that run the same tasks in every execution mode."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from runner import PermanentError


def ok(payload: Any, ctx: Any) -> Any:
    return {"got": payload["n"], "attempt": ctx.attempt}


def refuse(payload: Any) -> None:
    raise ValueError(f"bad input {payload['n']}")


def flaky(payload: Any, ctx: Any) -> str:
    if ctx.attempt < 2:
        raise RuntimeError(f"not yet, attempt {ctx.attempt}")
    return "fine"


def broken(payload: Any) -> None:
    raise RuntimeError("always")


def permanent(payload: Any) -> None:
    raise PermanentError("never will")


def slow(payload: Any) -> None:
    time.sleep(1.5)


def not_json(payload: Any) -> Any:
    return {1, 2}


async def aok(payload: Any, ctx: Any) -> Any:
    return ok(payload, ctx)


async def arefuse(payload: Any) -> None:
    refuse(payload)


async def aflaky(payload: Any, ctx: Any) -> str:
    return flaky(payload, ctx)


async def abroken(payload: Any) -> None:
    broken(payload)


async def apermanent(payload: Any) -> None:
    permanent(payload)


async def aslow(payload: Any) -> None:
    await asyncio.sleep(1.5)


async def anot_json(payload: Any) -> Any:
    return not_json(payload)
