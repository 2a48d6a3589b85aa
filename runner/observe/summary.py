"""The end-of-run summary: a listener that counts what happened, rendered as a table or JSON.

What a person reads: a table per type, then notes (how many finished tasks came from the
backlog: created before this run began, by this process or another), then the dead letters.
Tasks the memory broker dead-lettered at shutdown (reason ``shutdown``) are one row per type with
their count, and a line says where their records went. Every table fits the console's width
(runner.observe.tablefit): on a terminal its width, elsewhere Rich's default of 80 columns.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, TextIO

from runner.events import Event, EventName
from runner.model import DeadReason, short_id
from runner.observe.tablefit import Column, elide, fit_columns, fitted_rows

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

#: The reason of the memory broker's shutdown drain (grouped per type when shown).
SHUTDOWN = DeadReason.SHUTDOWN

#: What each task event counts as in a type's row (``counts``); other events are not counted.
KIND_OF: dict[str, str] = {
    EventName.TASK_PUBLISHED: "published",
    EventName.TASK_STARTED: "started",
    EventName.TASK_SUCCEEDED: "succeeded",
    EventName.TASK_RETRYING: "retrying",
    EventName.TASK_TIMEOUT: "timeout",
    EventName.TASK_DEAD: "dead",
    EventName.TASK_LEASE_LOST: "lease_lost",
    EventName.TASK_INTERRUPTED: "interrupted",
    EventName.TASK_OVERRUN: "overrun",
    EventName.TASK_DEDUPLICATED: "deduplicated",
}


#: The kinds that end an attempt: they carry its duration, and a finished task's from the backlog
#: or not (a retry is not finished).
_ENDINGS = frozenset({"succeeded", "retrying", "dead"})


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


#: Durations kept per type and thread for the percentiles. Past it, a uniform sample of all
#: of them (reservoir sampling), so a long-lived worker's memory does not grow with each task.
DURATION_SAMPLES = 4096


class _Durations:
    """One type's durations in one shard: how many, the longest, and a uniform sample of them."""

    __slots__ = ("kept", "longest", "seen")

    def __init__(self) -> None:
        self.kept: list[float] = []
        self.longest = 0.0
        self.seen = 0


def _by_kind() -> defaultdict[str, int]:
    return defaultdict(int)


class _Shard:
    """One emitting thread's counts: only that thread writes them, so no lock per event."""

    __slots__ = ("counts", "durations", "random")

    def __init__(self) -> None:
        # Plain ints under the type: a Counter's ``+= 1`` is twice a dict's (its item goes
        # through a slot wrapper), and it happens for every event.
        self.counts: defaultdict[str, defaultdict[str, int]] = defaultdict(_by_kind)
        self.durations: dict[str, _Durations] = {}
        self.random = random.Random().random

    def add_duration(self, type_name: str, value: float) -> None:
        """Count ``value`` and keep it in the type's sample (reservoir sampling). One record
        per type, not a dict per figure: it runs for every task (0.52 us -> 0.3)."""
        durations = self.durations.get(type_name)
        if durations is None:
            durations = self.durations[type_name] = _Durations()
        durations.seen += 1
        durations.longest = max(durations.longest, value)
        kept = durations.kept
        if len(kept) < DURATION_SAMPLES:
            kept.append(value)
        else:
            # Uniform in [0, seen), in half the time randrange takes.
            slot = int(self.random() * durations.seen)
            if slot < DURATION_SAMPLES:
                kept[slot] = value


class Summary:
    """Counts every task event by type and outcome; thread-safe, cheap per event.

    Events come from every worker thread at once, so each thread counts into a shard of its
    own (no lock, which would make those threads queue for each other on every event); readers
    merge the shards from C-level copies, which the GIL makes atomic.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the list of shards, not the counts
        self._shards: list[_Shard] = []
        self._local = threading.local()
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.dead: list[dict[str, Any]] = []  # list.append is atomic
        self.threads: tuple[int, int] = (0, 0)  # (configured, alive when the stop began)
        self.interrupts = 0
        self.replayed = 0  # dead letters put back at start (--replay); the caller sets it
        # The pipelines' stages, one line each ("fetch -> resize (each images)"); the caller
        # sets them.
        self.stages: list[str] = []
        # Task ids begin with their creation time in ms (runner.model.new_task_id): a task
        # created before this is from the backlog.
        self._since_ms = int(self.started_at * 1000)
        self._since_hex = f"{self._since_ms:012x}"  # as an id's first 12 characters write it

    def handle(self, event: Event) -> None:
        kind = KIND_OF.get(event.name)
        type_name = event.type
        if kind is None or type_name is None:
            return
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._local.shard = _Shard()
            with self._lock:
                self._shards.append(shard)
        counts = shard.counts[type_name]
        counts[kind] += 1
        if kind not in _ENDINGS:  # published, started, ...: counted, nothing more
            return
        if kind != "retrying" and self._from_backlog(event.task_id):
            counts["backlog"] += 1
        if event.duration_s is not None:
            shard.add_duration(type_name, event.duration_s)
        if kind == "dead":
            self.dead.append(
                {
                    "task_id": event.task_id,
                    "type": type_name,
                    "attempts": event.attempt,
                    "reason": event.reason,
                    "error": event.error,
                }
            )

    def drained(self) -> list[dict[str, Any]]:
        """The dead letters of the shutdown drain (reason ``shutdown``), in the order seen."""
        return [d for d in self.dead if d["reason"] == SHUTDOWN]

    @property
    def counts(self) -> dict[str, Counter[str]]:
        """Events by type, then by kind (published, started, succeeded, retrying, dead, ...)."""
        return self._merged()[0]

    def _merged(
        self,
    ) -> tuple[dict[str, Counter[str]], dict[str, list[float]], dict[str, float]]:
        counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        durations: defaultdict[str, list[float]] = defaultdict(list)
        longest: defaultdict[str, float] = defaultdict(float)
        with self._lock:
            shards = list(self._shards)
        for shard in shards:
            # dict.copy and list() copy in C, in one step under the GIL: a shard's thread
            # cannot change them half-way through.
            for type_name, by_kind in dict.copy(shard.counts).items():
                counts[type_name].update(dict.copy(by_kind))
            for type_name, figures in dict.copy(shard.durations).items():
                durations[type_name].extend(list(figures.kept))
                longest[type_name] = max(longest[type_name], figures.longest)
        return dict(counts), dict(durations), dict(longest)

    def count(self, outcome: str) -> int:
        """Total events of one kind (published, started, succeeded, retrying, dead, ...)."""
        return sum(c[outcome] for c in self.counts.values())

    def _from_backlog(self, task_id: str | None) -> bool:
        if task_id is None:
            return False
        start = task_id[:12]
        # A task of this run: its start, as text, is at least the run's (lowercase hex of one
        # length sorts as the numbers do), so it need not be parsed: the same answer as
        # parsing for every id of hex digits, as all of ours are.
        if len(start) == 12 and start >= self._since_hex:
            return False
        try:
            return int(start, 16) < self._since_ms
        except ValueError:  # an id of another form: not ours to date
            return False

    def finish(self) -> None:
        self.finished_at = time.time()

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data, ready for json.dumps (what ``--summary-json`` writes)."""
        all_counts, all_durations, all_longest = self._merged()
        wall = (self.finished_at or time.time()) - self.started_at
        by_type: dict[str, Any] = {}
        for type_name in sorted(all_counts):
            c = all_counts[type_name]
            durations = sorted(all_durations.get(type_name, []))
            by_type[type_name] = {
                "published": c["published"],
                "succeeded": c["succeeded"],
                "retried": c["retrying"],
                "timed_out": c["timeout"],
                "dead": c["dead"],
                "from_backlog": c["backlog"],
                "duration_s": {
                    "p50": percentile(durations, 50),
                    "p95": percentile(durations, 95),
                    "p99": percentile(durations, 99),
                    "max": all_longest.get(type_name, 0.0),
                },
            }
        totals = {
            key: sum(t[key] for t in by_type.values())
            for key in ("published", "succeeded", "retried", "timed_out", "dead", "from_backlog")
        }
        return {
            "wall_time_s": round(wall, 3),
            "totals": totals,
            "by_type": by_type,
            "dead_letters": list(self.dead),
            "dead_by_reason": dict(Counter(d["reason"] for d in self.dead)),
            "worker_threads": {"configured": self.threads[0], "alive": self.threads[1]},
            "interrupts": self.interrupts,
        }

    def render(self, stream: TextIO | Console, drained_to: str | None = None) -> None:
        """Print the summary table, its notes and the dead letters with Rich, fitting the
        console's width (``stream`` may be a Rich Console: a recording one in tests).
        ``drained_to`` says where shutdown dead letters went."""
        from rich.console import Console

        data = self.to_dict()
        console = (
            stream
            if isinstance(stream, Console)
            else Console(file=stream, highlight=False, soft_wrap=False)
        )
        width = console.width
        kinds = ("published", "succeeded", "retried", "timed_out", "dead")
        rows = [
            [
                name,
                *(str(row[k]) for k in kinds),
                f"{row['duration_s']['p50'] * 1000:.0f} / {row['duration_s']['p99'] * 1000:.0f}",
            ]
            for name, row in data["by_type"].items()
        ]
        rows.append(["total", *(str(data["totals"][k]) for k in kinds), ""])
        columns = [
            Column("type", flexible=True, min_width=6),
            Column("published", "right"),
            Column("succeeded", "right"),
            Column("retried", "right", rank=2),
            Column("timed out", "right", rank=3),
            Column("dead", "right"),
            Column("p50 / p99 ms", "right", rank=1),
        ]
        title = f"Summary ({data['wall_time_s']:.2f}s wall time)"
        console.print(_boxed(title, columns, rows, width, bold_last=True))
        for note in _notes(data, self.replayed):
            console.print(note)
        for line in self.stages:
            console.print(f"stage: {line}")
        if data["dead_letters"]:
            columns = [
                Column("task"),
                Column("type", flexible=True, min_width=6),
                Column("attempts", "right", rank=1),
                Column("reason", flexible=True, min_width=8),
                Column("error", flexible=True, min_width=20),
            ]
            rows, drained = _dead_letter_rows(data["dead_letters"])
            console.print(_boxed("Dead-letter queue", columns, rows, width))
            if drained:
                where = f", {drained_to}" if drained_to else ""
                console.print(f"{drained} tasks still queued at shutdown were dead-lettered{where}")


def _boxed(
    title: str,
    columns: list[Column],
    rows: list[list[str]],
    width: int,
    bold_last: bool = False,
) -> Table:
    """A Rich table of ``rows`` that fits ``width`` (runner.observe.tablefit)."""
    from rich.table import Table

    fit = fit_columns(columns, rows, width, gap=3, edges=4)
    table = Table(title=title)
    for i, w in fit:
        table.add_column(elide(columns[i].header, w), justify=columns[i].justify, no_wrap=True)
    cells = fitted_rows(fit, rows)
    for n, row in enumerate(cells):
        table.add_row(*row, style="bold" if bold_last and n == len(cells) - 1 else None)
    return table


def _notes(data: dict[str, Any], replayed: int) -> list[str]:
    """Lines under the summary table: where the finished tasks came from."""
    totals = data["totals"]
    finished = totals["succeeded"] + totals["dead"]
    backlog = totals["from_backlog"]
    if not backlog:
        return []
    what = "the backlog, and dead letters replayed at start" if replayed else "the backlog"
    return [
        f"{backlog} of the {finished} tasks finished here were created before this run "
        f"started ({what}); {finished - backlog} after it."
    ]


def _dead_letter_rows(dead: list[dict[str, Any]]) -> tuple[list[list[str]], int]:
    """One row per dead letter, except those of the shutdown drain: one row per type with
    their count. Also returns how many were drained."""
    rows: list[list[str]] = []
    drained: dict[str, list[dict[str, Any]]] = {}
    for d in dead:
        if d["reason"] == SHUTDOWN:
            drained.setdefault(d["type"], []).append(d)
            continue
        rows.append(
            [
                short_id(d["task_id"] or ""),
                d["type"],
                str(d["attempts"]),
                d["reason"] or "",
                (d["error"] or "").splitlines()[0] if d["error"] else "",
            ]
        )
    for type_name, group in sorted(drained.items()):
        attempts = sorted(g["attempts"] or 0 for g in group)
        never = sum(1 for a in attempts if a == 0)
        span = str(attempts[0]) if attempts[0] == attempts[-1] else f"{attempts[0]}-{attempts[-1]}"
        what = [f"{never} never ran"] if never else []
        if len(group) > never:
            what.append(f"{len(group) - never} unfinished")
        rows.append([f"{len(group)} tasks", type_name, span, SHUTDOWN, ", ".join(what)])
    return rows, sum(len(g) for g in drained.values())
