"""Handlers for the interrupt storm: they log through ctx.logger until they are interrupted."""

from __future__ import annotations

import time
from typing import Any

from runner import TaskContext


def log_until_interrupted(payload: Any, ctx: TaskContext) -> None:
    i = 0
    while True:
        ctx.logger.info("still working", extra={"i": i})
        i += 1
        time.sleep(0.0005)
