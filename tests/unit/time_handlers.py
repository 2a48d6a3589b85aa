"""Handlers for the tests of time in the runner (Retry, publish at)."""

from __future__ import annotations

from typing import Any

from runner import Retry, TaskContext


def retry_once_after(payload: dict[str, Any], ctx: TaskContext) -> int:
    """Asks to be retried after ``payload["delay"]`` seconds on its first attempt."""
    if ctx.attempt == 1:
        raise Retry(delay=payload["delay"])
    return ctx.attempt


#: The ids of the tasks ``note_run`` ran.
ran: list[str] = []


def note_run(payload: Any, ctx: TaskContext) -> None:
    ran.append(ctx.task_id)


#: task id -> the attempt number of each run of ``wait_uncounted``.
uncounted_runs: dict[str, list[int]] = {}


def wait_uncounted(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Asks to run again, not counted, ``payload["times"]`` times; then succeeds."""
    runs = uncounted_runs.setdefault(ctx.task_id, [])
    runs.append(ctx.attempt)
    if len(runs) <= payload["times"]:
        raise Retry(delay=0.02, count=False)
