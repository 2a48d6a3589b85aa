"""The pipeline operator commands: ``dq-run cancel`` (revoke a whole pipeline), ``dq-run trace``
(the tree of a pipeline's tasks), and what purge must know about pipelines (purging a part's
record drops its join's state). What replay must know (a join dead-lettered because a part died
is not replayed itself; replaying a cancelled task lifts its pipeline's cancel) is in
runner.engine.handoff, which ``dq-run run --replay`` uses too.

Plain functions over a validated config and a broker with settle effects; they return data and
raise the runner's errors, and the CLI (runner.ops.cli) prints them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.backends import broker_class, create_broker
from runner.brokers.base import Broker, BrokerAdmin, DeadLetterFilter, PipelineAdmin
from runner.config.models import PipelineConfig
from runner.engine.handoff import JOIN_PREFIX, TRACE_PREFIX, fanout_of, root_of
from runner.errors import NotSupported
from runner.model import DeadLetter
from runner.ops.admin import require_shared


def pipeline_broker(config: PipelineConfig, command: str) -> Broker:
    """A broker that keeps pipelines (shared, with settle effects), for ``command``."""
    require_shared(config, command)
    if not broker_class(config).settle_effects:
        kind = config.broker.kind
        raise NotSupported(f"cannot {command}: the {kind} broker has no settle effects")
    return create_broker(config)


def before_purge(admin: BrokerAdmin, records: Sequence[DeadLetter]) -> None:
    """Purging a fan-out member's record gives up on its join: the join's parts are dropped."""
    groups = {fanout[0] for r in records if (fanout := fanout_of(r.task)) is not None}
    if groups and isinstance(admin, Broker) and admin.settle_effects:
        admin.delete_values([JOIN_PREFIX + group for group in sorted(groups)])


@dataclass
class TraceNode:
    """One task of a pipeline, as ``dq-run trace`` shows it."""

    id: str
    type: str
    parent_id: str | None
    state: str  # ready, delayed, running, succeeded, dead
    attempts: int
    duration_s: float | None = None
    error: str | None = None
    children: list[TraceNode] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "parent_id": self.parent_id,
            "state": self.state,
            "attempts": self.attempts,
            "duration_s": self.duration_s,
            "error": self.error,
            "children": [child.to_json() for child in self.children],
        }


def trace(broker: Broker, root_id: str) -> list[TraceNode]:
    """The tasks of pipeline ``root_id`` as trees (the root's, and any whose parent is not
    known any more): queued ones from the broker, settled ones from their trace lines, dead
    ones from the dead letters (which win: a replayed task's newer state wins over all)."""
    assert isinstance(broker, PipelineAdmin), "a broker with settle effects has the admin"
    nodes: dict[str, TraceNode] = {}
    prefix = f"{TRACE_PREFIX}{root_id}:"
    for key, text in broker.scan_values(prefix).items():
        line = json.loads(text)
        task_id = key[len(prefix) :]
        nodes[task_id] = TraceNode(
            task_id,
            str(line["type"]),
            line.get("parent_id"),
            str(line["state"]),
            int(line.get("attempts", 0)),
            line.get("duration_s"),
            line.get("error"),
        )
    if isinstance(broker, BrokerAdmin):
        for record in broker.dead_letters(DeadLetterFilter()):
            if root_of(record.task) == root_id:
                nodes[record.id] = TraceNode(
                    record.id,
                    record.task.type,
                    record.task.headers.get("parent_id"),
                    f"dead ({record.reason})",
                    record.attempts,
                    error=f"{record.error_type}: {record.message}",
                )
    for queued in broker.tasks_of(root_id):
        task = queued.task
        last = task.history[-1] if task.history else None
        nodes[task.id] = TraceNode(
            task.id,
            task.type,
            task.headers.get("parent_id"),
            "running" if queued.state == "leased" else queued.state,
            task.attempt,
            error=f"{last.error_type}: {last.message}" if last else None,
        )
    roots: list[TraceNode] = []
    for node in sorted(nodes.values(), key=lambda n: n.id):
        parent = nodes.get(node.parent_id) if node.parent_id else None
        (parent.children if parent is not None else roots).append(node)
    return roots
