"""Handlers for the exit-path tests (imported by dq-run subprocesses from the repo root)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from runner import TaskContext

#: The name of the thread ``leave_thread`` starts, so a test can look for it in the log.
LEFT_THREAD = "left-behind-sleeper"
#: The exit code ``exit_process`` ends its process with.
KILL_CODE = 7


def leave_thread(payload: Any, ctx: TaskContext) -> None:
    """Start a non-daemon thread that sleeps for a minute, and return at once."""
    threading.Thread(target=time.sleep, args=(60.0,), name=LEFT_THREAD, daemon=False).start()


def exit_process(payload: Any, ctx: TaskContext) -> None:
    """End the whole process at once when the payload says so: a handler that kills its worker.

    The first thing it does, so nothing the runner queued before the handler ran gets a chance
    to be written by another thread.
    """
    if isinstance(payload, dict) and payload.get("kill"):
        os._exit(KILL_CODE)
