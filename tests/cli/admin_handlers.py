"""Handlers for the operator CLI tests (imported by dq-run subprocesses from the repo root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner import TaskContext


class DependencyDown(RuntimeError):
    """The pretend downstream service is unavailable."""


def needs_marker(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Fails until the file named by ``payload["marker"]`` exists (the dependency recovered).

    Each success appends the task id to ``payload["done"]``, so a test can count what ran.
    """
    if not Path(payload["marker"]).exists():
        raise DependencyDown(f"attempt {ctx.attempt}: dependency down (no {payload['marker']})")
    with open(payload["done"], "a", encoding="utf-8") as done:
        done.write(ctx.task_id + "\n")
    return ctx.task_id


def record_attempt(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Appends ``<task id> <attempt>`` to the file ``payload["done"]``."""
    with open(payload["done"], "a", encoding="utf-8") as done:
        done.write(f"{ctx.task_id} {ctx.attempt}\n")


def record_headers(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Appends the task's id and headers, as one JSON line, to the file ``payload["done"]``."""
    line = json.dumps({"id": ctx.task_id, "headers": dict(ctx.headers)})
    with open(payload["done"], "a", encoding="utf-8") as done:
        done.write(line + "\n")
