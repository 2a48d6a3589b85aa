"""``dq-run schedules CONFIG``: each schedule of the file with its last fired tick (read from the
broker) and its next one, as a table or JSON.

The last fired tick is what every worker process reads before it fires (runner.engine.schedule),
so this is the truth the processes share. A broker that is not shared (memory) keeps it inside
the running process: there the table shows the next ticks only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from runner.app import schedules_of
from runner.backends import broker_class, create_broker
from runner.config.models import PipelineConfig
from runner.engine.schedule import Schedule
from runner.errors import NotSupported
from runner.observe.tablefit import Column, plain_table
from runner.ops.views import table_width, utc


@dataclass(frozen=True)
class ScheduleState:
    """One schedule as ``dq-run schedules`` shows it (times: epoch seconds, broker's clock)."""

    schedule: Schedule
    last: float | None  # the last tick fired; None when never, or when it cannot be read
    next: float  # the next tick that fires
    due: bool = False  # next is past: no worker has fired it (none runs, or the broker is full)

    def to_json(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "name": s.name,
            "type": s.type,
            "every_s": s.every,
            "cron": s.cron,
            "timezone": s.timezone if s.cron else None,
            "missed": s.missed,
            "last_fired": self.last,
            "next": self.next,
            "due": self.due,
        }


def schedule_states(config: PipelineConfig) -> tuple[list[ScheduleState], bool]:
    """Every schedule's state, and whether the last fired ticks were read from the broker."""
    schedules = schedules_of(config)
    flags = broker_class(config)
    if not schedules or not flags.shared:
        now = time.time()
        return [ScheduleState(s, None, s.next_after(now)) for s in schedules], False
    if not flags.settle_effects:
        raise NotSupported(f"the {config.broker.kind} broker cannot run schedules (no put_if)")
    broker = create_broker(config, read_only=True)
    try:
        now = broker.now()
        stored = broker.read_values([s.key for s in schedules])
    finally:
        broker.close()
    states = []
    for s in schedules:
        last = float(stored[s.key]) if s.key in stored else None
        due = last is not None and s.latest(now) > last
        states.append(ScheduleState(s, last, s.latest(now) if due else s.next_after(now), due))
    return states, True


def schedules_table(
    states: list[ScheduleState], read: bool, kind: str, width: int | None = None
) -> str:
    if not states:
        return "no schedules in this file"
    rows = [
        (
            st.schedule.name,
            st.schedule.type,
            st.schedule.describe(),
            st.schedule.missed,
            utc(st.last) if st.last is not None else ("never" if read else "-"),
            utc(st.next) + (" (due)" if st.due else ""),
        )
        for st in states
    ]
    table = plain_table(
        (
            Column("SCHEDULE", flexible=True, min_width=8),
            Column("TYPE"),
            Column("WHEN", flexible=True, min_width=8),
            Column("MISSED", rank=1),
            Column("LAST FIRED"),
            Column("NEXT"),
        ),
        rows,
        table_width(width),
    )
    if read:
        return table
    return f"{table}\n\n(the {kind} broker keeps last fired ticks inside the running process)"
