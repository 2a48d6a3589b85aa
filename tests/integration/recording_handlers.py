"""Handlers that record what they did, so tests compare metrics with the handlers' own counts."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from runner import TaskContext

LOCK = threading.Lock()
CALLS: Counter[str] = Counter()  # "type:outcome" -> count, as seen inside the handlers


def reset() -> None:
    with LOCK:
        CALLS.clear()


def _record(key: str) -> None:
    with LOCK:
        CALLS[key] += 1


def work(payload: Any, ctx: TaskContext) -> None:
    """Fails while ``ctx.attempt <= payload["fail"]``; raises ValueError when payload["bad"]."""
    if payload.get("bad"):
        _record(f"{ctx.type}:bad")
        raise ValueError("bad payload")
    if ctx.attempt <= payload.get("fail", 0):
        _record(f"{ctx.type}:failed")
        raise RuntimeError(f"failing attempt {ctx.attempt}")
    _record(f"{ctx.type}:ok")
