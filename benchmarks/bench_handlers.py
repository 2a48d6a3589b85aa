"""Handlers the benchmarks run: a no-op, a 1 ms sleep, a 50 ms asyncio sleep (the same callables
the baselines run) and about 20 ms of pure-Python CPU work (the process rows)."""

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


#: Iterations of ``spin_20ms``'s loop: about 20 ms of CPU on the 2-core bench machine
#: (Python 3.11). A fixed count, not a clock, so tasks run side by side compete for the CPU
#: (and, on threads, for the GIL) and take longer, as real CPU-bound work would.
SPIN_ITERATIONS = 400_000


def spin_20ms(payload: Any, ctx: Any) -> None:
    """Pure-Python arithmetic, about 20 ms of CPU holding the GIL (a CPU-bound handler)."""
    total = 0
    for i in range(SPIN_ITERATIONS):
        total += i * i % 7
