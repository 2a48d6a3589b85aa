"""Pipeline hand-offs: the tasks a task's success starts (its type's ``then:`` stages).

The children ride on the parent's ack as settle effects (``Effects.puts``), so the ack and the
start of every child are one broker step: a fenced (stale) ack starts nothing, a resent ack that
answers ALREADY_DONE starts nothing again, and a parent that dies before its ack is run again
and hands off then, once. A child's id is derived from its parent's id and its index among the
children, so the same parent always names the same children.

A stage without ``each`` makes one child whose payload is the parent's whole return value; with
``each: images`` it makes one child per item of the list at that key of the return value (a
dotted path reaches deeper: ``each: order.lines``), at most ``max_fanout`` of them. Every child
carries ``root_id`` (its pipeline's first task) and ``parent_id`` in its headers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import PermanentError
from runner.model import Task, expires_at_of

#: The default bound on one stage's children (the ack may overshoot the broker's capacity by
#: this much, like a retry).
MAX_FANOUT = 1000


@dataclass(frozen=True)
class Stage:
    """One ``then:`` entry: the type it starts, and over what it fans out."""

    type: str
    each: str | None = None
    max_fanout: int = MAX_FANOUT
    expires_s: float | None = None  # the started type's own ``expires``


def child_id(parent_id: str, index: int) -> str:
    """The id of a parent's ``index``-th child: the parent's time prefix (so ids still sort by
    creation) and 20 hex digits of a hash of (parent, index)."""
    digest = hashlib.blake2b(f"{parent_id}:{index}".encode(), digest_size=10).hexdigest()
    return parent_id[:12] + digest


def children(task: Task, value: Any, stages: Sequence[Stage], now: float) -> tuple[Task, ...]:
    """The tasks ``task``'s success starts, given its handler returned ``value``; a
    PermanentError when a stage cannot be made (no list to fan out over, too many items)."""
    headers = {"root_id": task.headers.get("root_id") or task.id, "parent_id": task.id}
    made: list[Task] = []
    for stage in stages:
        payloads = [value] if stage.each is None else _items(task, value, stage)
        for payload in payloads:
            made.append(
                Task(
                    type=stage.type,
                    payload=payload,
                    id=child_id(task.id, len(made)),
                    enqueued_at=now,
                    headers=headers,
                    expires_at=expires_at_of(now, None, stage.expires_s),
                )
            )
    return tuple(made)


def _items(task: Task, value: Any, stage: Stage) -> list[Any]:
    found: Any = value
    assert stage.each is not None
    for step in stage.each.split("."):
        found = found.get(step) if isinstance(found, Mapping) else None
    if not isinstance(found, list):
        raise PermanentError(
            f"then: {stage.type} each {stage.each!r}: the return value of this {task.type!r} "
            f"task has no list there (got {type(found).__name__})"
        )
    if len(found) > stage.max_fanout:
        raise PermanentError(
            f"then: {stage.type} each {stage.each!r}: {len(found)} items, more than its "
            f"max_fanout ({stage.max_fanout})"
        )
    return found
