"""Pipeline hand-offs: what a task's success (its type's ``then:`` stages) or death (its
``on_dead``) starts, as effects of its settle.

The hand-offs ride on the settle (``Effects.puts``, ``arrivals``, ``dead_letters``), so the
settle and everything it starts are one broker step: a fenced (stale) settle starts nothing, a
resent one that answers ALREADY_DONE starts nothing again, and a task that dies before its
settle is run again and hands off then, once. A child's id is derived from its parent's id and
its index among the children, and a broker skips an effect put of an id it holds.

- A stage without ``each`` makes one child whose payload is the parent's whole return value;
  with ``each: images`` it makes one child per item of the list at that key (a dotted path
  reaches deeper: ``each: order.lines``), at most ``max_fanout`` of them. Each such child
  carries ``fanout: [group, index, size]`` in its headers (group: its parent's id and the
  stage's place).
- A ``join: true`` stage is a fan-in: each member of a fan-out group that succeeds sends its
  return value as one part (``Arrival``) to ``join:<group>``; the broker puts the joined task,
  with every part in order as its payload, with the last part. A member that is dead-lettered
  dead-letters the joined task too (reason ``upstream dead``; replay the member, not it), and
  a member that did not come from a fan-out is a group of one.
- ``on_dead: {type}`` puts a task of that type, whose payload is the dead-letter record, with
  the dead-letter.
- Every task started carries ``root_id`` (its pipeline's first task) and ``parent_id``; every
  hand-off is skipped once ``cancel:<root_id>`` is set (``dq-run cancel``: ``Effects.unless``).
- Each settle of a pipeline's task also keeps a line for ``dq-run trace`` under
  ``trace:<root_id>:<task id>`` (its type, state, attempts, duration, error), for
  ``TRACE_TTL_S`` or the type's results ttl if longer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from runner.brokers.base import (
    UNIQUE_PREFIX,
    Arrival,
    Broker,
    Effects,
    PipelineAdmin,
    SetValue,
)
from runner.codec import to_json_bytes
from runner.errors import PermanentError
from runner.model import DeadLetter, DeadReason, Task, expires_at_of

#: The default bound on one stage's children (the ack may overshoot the broker's capacity by
#: this much, like a retry).
MAX_FANOUT = 1000
#: How long a pipeline task's trace line is kept at least.
TRACE_TTL_S = 24 * 3600.0
#: How long a pipeline stays cancelled: its hand-offs are skipped while its key lives. Longer
#: than any task should run or wait in a queue.
CANCEL_TTL_S = 7 * 24 * 3600.0
#: The prefixes of a pipeline's values in the broker.
CANCEL_PREFIX = "cancel:"
JOIN_PREFIX = "join:"
TRACE_PREFIX = "trace:"


@dataclass(frozen=True)
class Stage:
    """One ``then:`` entry: the type it starts, and over what it fans out (or that it joins)."""

    type: str
    each: str | None = None
    max_fanout: int = MAX_FANOUT
    expires_s: float | None = None  # the started type's own ``expires``
    join: bool = False


@dataclass(frozen=True)
class Pipeline:
    """A type's place in pipelines: its stages, its ``on_dead`` type, and whether anything
    hands off to it (then its tasks keep trace lines even as roots)."""

    then: tuple[Stage, ...] = ()
    on_dead: str | None = None
    on_dead_expires_s: float | None = None

    @property
    def joins(self) -> tuple[Stage, ...]:
        return tuple(stage for stage in self.then if stage.join)

    @functools.cached_property
    def puts_value(self) -> bool:
        """Whether a success puts tasks whose payloads come from its return value (a stage
        that is not a join)."""
        return any(not stage.join for stage in self.then)


#: An empty BLAKE2b of 10 bytes, copied for each child id (copying is cheaper than passing
#: ``digest_size`` to a new one: a C type called with a keyword gathers it in a dict first).
_CHILD_DIGEST = hashlib.blake2b(digest_size=10)


def child_id(parent_id: str, index: int | str) -> str:
    """The id of a parent's ``index``-th child: the parent's time prefix (so ids still sort by
    creation) and 20 hex digits of a hash of (parent, index)."""
    digest = _CHILD_DIGEST.copy()
    digest.update(f"{parent_id}:{index}".encode())
    return parent_id[:12] + digest.hexdigest()


def root_of(task: Task) -> str:
    """The id of ``task``'s pipeline's first task (its own, for a root)."""
    return str(task.headers.get("root_id") or task.id)


def on_success(
    task: Task, value: Any, pipeline: Pipeline, now: float, root: str = ""
) -> tuple[tuple[Task, ...], tuple[Arrival, ...]]:
    """What ``task`` (of the pipeline ``root``; found from the task when not given) starts
    when its handler returned ``value``: the tasks to put and the parts to send to joins (for
    the ack's Effects, which its caller builds once); a PermanentError when a stage cannot be
    made (no list to fan out over, too many items, a result a join cannot keep)."""
    if pipeline.puts_value:
        try:
            to_json_bytes(value)  # what every broker writes its children's payloads with
        except (TypeError, ValueError) as exc:
            why = f"then: the return value of this {task.type!r} task is not JSON: {exc}"
            raise PermanentError(why) from None
    parent = task.id
    headers = {"root_id": root or root_of(task), "parent_id": parent}
    made: list[Task] = []
    arrivals: list[Arrival] = []
    for place, stage in enumerate(pipeline.then):
        if stage.join:
            arrivals.append(_arrival(task, value, stage, now))
            continue
        expires_at = now + stage.expires_s if stage.expires_s else 0.0
        children: Sequence[tuple[Any, Mapping[str, Any]]]
        if stage.each is None:  # one child: the whole value, with the parent's lineage
            children = ((value, headers),)
        else:
            payloads = _items(task, value, stage)
            group, size = f"{parent}.{place}", len(payloads)
            children = [
                (payload, {**headers, "fanout": [group, index, size]})
                for index, payload in enumerate(payloads)
            ]
        for payload, lineage in children:
            # Positionally (type, payload, id, attempt, enqueued_at, not_before, history,
            # headers, expires_at: Task's field order), as every task of a pipeline is.
            made.append(
                Task(stage.type, payload, child_id(parent, len(made)), 0, now, 0.0, (), lineage,
                     expires_at)
            )  # fmt: skip
    return tuple(made), tuple(arrivals)


def on_dead(task: Task, record: DeadLetter, pipeline: Pipeline, now: float) -> Effects:
    """What ``task``'s dead-letter starts: the ``on_dead`` task, and the dead-letter of each
    join it was a part of."""
    puts: tuple[Task, ...] = ()
    if pipeline.on_dead is not None:
        puts = (
            Task(
                type=pipeline.on_dead,
                payload=record.to_json(),
                # Of this death: a replayed task may die again at the same attempt number,
                # and its first on_dead task, if still queued, would hold a shared id.
                id=child_id(task.id, f"dead.{record.dead_at!r}"),
                enqueued_at=now,
                headers={"root_id": root_of(task), "parent_id": task.id},
                expires_at=expires_at_of(now, None, pipeline.on_dead_expires_s),
            ),
        )
    dead = []
    for stage in pipeline.joins:
        group, index, size = _member(task)
        message = (
            f"part {index + 1} of {size} ({task.id}, a {task.type!r} task) is dead: replay "
            "it, not this record; this one goes when it succeeds"
        )
        dead.append(
            replace(
                record,
                task=_joined(task, stage, group, now),
                reason=DeadReason.UPSTREAM_DEAD,
                error_type="UpstreamDead",
                message=message,
                traceback="",
                attempts=0,
            )
        )
    return Effects(puts=puts, dead_letters=tuple(dead))


def traced(effects: Effects | None, root: str, line: SetValue) -> Effects:
    """``effects`` with a settled task's trace ``line``; what they start (if anything) is
    skipped once its pipeline ``root`` is cancelled (``Effects.unless``). Built in one go, not
    merged: it runs for every task of a pipeline."""
    if effects is None:
        return Effects(sets=(line,))
    starts = effects.puts or effects.arrivals or effects.dead_letters
    return Effects(
        puts=effects.puts,
        sets=(*effects.sets, line),
        deletes=effects.deletes,
        circuit=effects.circuit,
        arrivals=effects.arrivals,
        dead_letters=effects.dead_letters,
        unless=CANCEL_PREFIX + root if starts else effects.unless,
    )


def trace_line(
    task: Task, root: str, state: str, duration_s: float | None, error: str | None, ttl_s: float
) -> SetValue:
    """The value ``dq-run trace`` shows for ``task`` (of the pipeline ``root``) once it is
    settled."""
    headers = task.headers
    line = {
        "type": task.type,
        "parent_id": headers.get("parent_id"),
        "state": state,
        "attempts": task.attempt,
        "duration_s": duration_s,
        "error": error,
        "at": time.time(),
    }
    text = to_json_bytes(line).decode()  # orjson: a fifth of json.dumps' cost, on every task
    return SetValue(f"{TRACE_PREFIX}{root}:{task.id}", text, ttl_s)


def fanout_of(task: Task) -> tuple[str, int, int] | None:
    """(group, index, size) of a fan-out's member (its ``fanout`` header); None for a task no
    fan-out started."""
    fanout = task.headers.get("fanout")
    if isinstance(fanout, list) and len(fanout) == 3:
        return str(fanout[0]), int(fanout[1]), int(fanout[2])
    return None


def _member(task: Task) -> tuple[str, int, int]:
    """(group, index, size) of a join's member: a task from no fan-out is a group of one."""
    return fanout_of(task) or (task.id, 0, 1)


def _joined(task: Task, stage: Stage, group: str, now: float) -> Task:
    """The task a join of ``group`` puts (its payload is filled in by the broker)."""
    parent = group.rsplit(".", 1)[0]
    return Task(
        type=stage.type,
        payload=None,
        id=child_id(group, "join"),
        enqueued_at=now,
        headers={"root_id": root_of(task), "parent_id": parent, "joins": group},
        expires_at=expires_at_of(now, None, stage.expires_s),
    )


def _arrival(task: Task, value: Any, stage: Stage, now: float) -> Arrival:
    group, index, size = _member(task)
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        why = f"then: {stage.type} join: the return value is not JSON: {exc}"
        raise PermanentError(why) from None
    return Arrival(JOIN_PREFIX + group, index, size, text, _joined(task, stage, group, now))


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


def merged(first: Effects | None, second: Effects) -> Effects:
    """Both effects in one (``second``'s after ``first``'s). Built field by field: it runs
    for every task of a pipeline, and ``dataclasses.replace`` costs three times as much."""
    if first is None:
        return second
    return Effects(
        puts=first.puts + second.puts,
        sets=first.sets + second.sets,
        deletes=first.deletes + second.deletes,
        circuit=first.circuit if first.circuit is not None else second.circuit,
        arrivals=first.arrivals + second.arrivals,
        dead_letters=first.dead_letters + second.dead_letters,
        unless=first.unless or second.unless,
    )


def cancel(broker: Broker, root_id: str) -> list[str]:
    """Revoke the pipeline ``root_id``: from now on none of its settles starts anything, its
    queued and delayed tasks are dead-lettered (reason ``cancelled``; replaying them resumes
    it), and the processes running its tasks set their ``ctx.cancelled`` within a second
    (runner.engine.cancels). Answers the ids dead-lettered."""
    if not isinstance(broker, PipelineAdmin) or not broker.settle_effects:
        raise NotImplementedError(f"{type(broker).__name__} cannot cancel a pipeline")
    broker.set_values([SetValue(CANCEL_PREFIX + root_id, "1", CANCEL_TTL_S)])
    keys = {q.task.id: q.task.unique_key for q in broker.tasks_of(root_id) if q.task.unique_key}
    ids = broker.cancel(root_id, f"pipeline {root_id} cancelled")
    # A cancelled unique task lets its key go, as its dead-letter by a worker would.
    held = broker.read_values([UNIQUE_PREFIX + keys[i] for i in ids if i in keys])
    broker.delete_values([key for key, holder in held.items() if holder in ids])
    return ids


def stage_lines(pipelines: Mapping[str, Pipeline | None]) -> list[str]:
    """Each type's hand-offs, one line per type that has some, for the run's summary:
    ``fetch -> resize (each images), notify; on_dead -> refund``."""
    lines = []
    for name, pipeline in pipelines.items():
        if pipeline is None:
            continue
        steps = [
            stage.type
            + (f" (each {stage.each})" if stage.each else "")
            + (" (join)" if stage.join else "")
            for stage in pipeline.then
        ]
        line = f"{name} -> {', '.join(steps)}" if steps else name
        if pipeline.on_dead:
            line += f"; on_dead -> {pipeline.on_dead}"
        lines.append(line)
    return lines


def not_replayable(records: Sequence[DeadLetter]) -> dict[str, str]:
    """Records a replay must skip, with why: a join dead-lettered because a part died fires by
    itself once that part is replayed and succeeds."""
    return {
        r.id: f"a join whose part died: {r.message}"
        for r in records
        if r.reason == DeadReason.UPSTREAM_DEAD
    }


def before_replay(admin: object, records: Sequence[DeadLetter]) -> None:
    """Replaying a cancelled pipeline's task lifts the cancel, so its hand-offs start again."""
    roots = {root_of(r.task) for r in records if r.reason == DeadReason.CANCELLED}
    if roots and isinstance(admin, Broker) and admin.settle_effects:
        admin.delete_values([CANCEL_PREFIX + root for root in sorted(roots)])
