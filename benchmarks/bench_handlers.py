"""Handlers the benchmarks run: a no-op and a 1 ms sleep (the same callables the baselines run)."""

from __future__ import annotations

import time
from typing import Any


def noop(payload: Any, ctx: Any) -> None:
    """Does nothing: what is left to measure is the queue's own overhead."""


def sleep_1ms(payload: Any, ctx: Any) -> None:
    """Waits 1 ms without holding the GIL, like a short I/O call."""
    time.sleep(0.001)
