"""Handlers for the flow-control tests (circuit breakers): a pretend downstream service."""

from __future__ import annotations

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
