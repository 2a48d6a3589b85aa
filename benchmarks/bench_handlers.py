"""Handlers the benchmarks run: a no-op, a 1 ms sleep and a 50 ms asyncio sleep (the same callables
the baselines run)."""

from __future__ import annotations

import asyncio
import time
from typing import Any


def noop(payload: Any, ctx: Any) -> None:
    """Does nothing: what is left to measure is the queue's own overhead."""


def sleep_1ms(payload: Any, ctx: Any) -> None:
    """Waits 1 ms without holding the GIL, like a short I/O call."""
    time.sleep(0.001)


#: How long ``nap_50ms`` awaits.
NAP_S = 0.05


async def nap_50ms(payload: Any, ctx: Any) -> None:
    """Awaits 50 ms, like an I/O-bound coroutine (an async type's handler)."""
    await asyncio.sleep(NAP_S)
