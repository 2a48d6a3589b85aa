"""What an attempt's settle also does, in the same broker step (its settle effects): the
outcome for its type's circuit breaker, its kept result, a unique key let go, and a pipeline
task's hand-offs and trace line (runner.engine.handoff).

``Attempts`` (runner.engine.attempt) decides how an attempt ends; these build what rides on
that ending, each answering a new Effects or Outcome. ``acked`` runs for every succeeded task,
so it builds its one Effects in a single go.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from runner.brokers.base import RESULT_PREFIX, UNIQUE_PREFIX, Arrival, Effects, SetValue
from runner.engine.handoff import (
    CANCEL_PREFIX,
    TRACE_TTL_S,
    merged,
    on_dead,
    on_success,
    root_of,
    trace_line,
    traced,
)
from runner.engine.settle import Outcome
from runner.errors import PermanentError
from runner.model import Task

if TYPE_CHECKING:
    from runner.engine.attempt import TypeRuntime


def acked(task: Task, rt: TypeRuntime, root: str, value: Any, duration: float) -> Effects | None:
    """What the ack of a task whose handler returned ``value`` also does, as one Effects:
    its circuit's success, its kept result and, for a pipeline's task (``root``: Run.root),
    what it starts and its trace line. Raises PermanentError for a result it cannot keep or
    start its stages with."""
    sets: tuple[SetValue, ...] = ()
    if rt.result_ttl:
        try:
            sets = (result_value(task.id, {"state": "succeeded", "value": value}, rt.result_ttl),)
        except ValueError as exc:
            raise PermanentError(f"the handler's return value is not JSON: {exc}") from None
    puts: tuple[Task, ...] = ()
    arrivals: tuple[Arrival, ...] = ()
    if rt.pipeline is not None and rt.pipeline.then:
        puts, arrivals = on_success(task, value, rt.pipeline, time.time(), root)
    circuit = True if rt.breaker else None
    if root:
        ttl = max(TRACE_TTL_S, rt.result_ttl)
        sets = (*sets, trace_line(task, root, "succeeded", duration, None, ttl))
        unless = CANCEL_PREFIX + root if puts or arrivals else None
        return Effects(puts, sets, (), circuit, arrivals, (), unless)
    if sets or puts or arrivals or circuit:
        return Effects(puts=puts, sets=sets, circuit=circuit, arrivals=arrivals)
    return None


def dead_handed_off(outcome: Outcome, task: Task, rt: TypeRuntime | None) -> Outcome:
    """A pipeline task's dead-letter ``outcome`` also keeps its trace line, starts its
    ``on_dead`` task and dead-letters its joins; those hand-offs are skipped once its pipeline
    is cancelled (runner.engine.handoff)."""
    op = outcome.settle
    assert op.record is not None, "a dead-letter carries its record"
    effects = op.effects
    if rt is not None and rt.pipeline is not None:
        effects = merged(effects, on_dead(task, op.record, rt.pipeline, time.time()))
    root = root_of(task)
    fields = outcome.fields
    ttl = max(TRACE_TTL_S, rt.result_ttl if rt is not None else 0.0)
    line = trace_line(task, root, "dead", fields.get("duration_s"), fields.get("error"), ttl)
    settle = op._replace(effects=traced(effects, root, line))
    return Outcome(settle, outcome.event, fields)


def letting_key_go(outcome: Outcome, task: Task, rt: TypeRuntime | None) -> Outcome:
    """A unique task's ack or dead-letter ``outcome`` also lets its key go, in the same broker
    step: held on for its type's ``unique.ttl``, or deleted at once. A retry keeps it, and so
    does an uncounted Retry (its ack puts the task back)."""
    op = outcome.settle
    effects = op.effects or Effects()
    if op.kind not in ("ack", "dead") or any(t.id == task.id for t in effects.puts):
        return outcome
    ttl = rt.unique_ttl if rt is not None else 0.0
    key = UNIQUE_PREFIX + task.unique_key
    if ttl:
        effects = replace(effects, sets=(*effects.sets, SetValue(key, task.id, ttl)))
    else:
        effects = replace(effects, deletes=(*effects.deletes, key))
    return outcome._replace(settle=op._replace(effects=effects))


def with_circuit(outcome: Outcome, succeeded: bool) -> Outcome:
    """``outcome`` with its settle carrying ``succeeded`` for the type's circuit breaker."""
    op = outcome.settle
    effects = replace(op.effects or Effects(), circuit=succeeded)
    return outcome._replace(settle=op._replace(effects=effects))


def result_value(task_id: str, result: dict[str, Any], ttl_s: float) -> SetValue:
    """The settle effect that keeps ``result`` (JSON; ValueError when it is not) for
    ``ttl_s`` (its type's ``results.ttl``), under ``result:<task id>``."""
    try:
        text = json.dumps({**result, "finished_at": time.time()}, allow_nan=False)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return SetValue(RESULT_PREFIX + task_id, text, ttl_s)
