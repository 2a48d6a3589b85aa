"""The end-of-run summary: a listener that counts what happened, rendered as a table or JSON."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from typing import Any, TextIO

from runner.events import Event


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


class _Shard:
    """One emitting thread's counts: only that thread writes them, so no lock per event."""

    __slots__ = ("counts", "durations")

    def __init__(self) -> None:
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.durations: defaultdict[str, list[float]] = defaultdict(list)


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

    def handle(self, event: Event) -> None:
        name = event.name
        type_name = event.type
        if type_name is None or not name.startswith("task."):
            return
        try:
            shard: _Shard = self._local.shard
        except AttributeError:
            shard = self._local.shard = _Shard()
            with self._lock:
                self._shards.append(shard)
        shard.counts[type_name][name[5:]] += 1
        if event.duration_s is not None and name in ("task.succeeded", "task.retrying"):
            shard.durations[type_name].append(event.duration_s)
        if name == "task.dead":
            if event.duration_s is not None:
                shard.durations[type_name].append(event.duration_s)
            self.dead.append(
                {
                    "task_id": event.task_id,
                    "type": type_name,
                    "attempts": event.attempt,
                    "reason": event.reason,
                    "error": event.error,
                }
            )

    @property
    def counts(self) -> dict[str, Counter[str]]:
        """Events by type, then by kind (published, started, succeeded, retrying, dead, ...)."""
        return self._merged()[0]

    def _merged(self) -> tuple[dict[str, Counter[str]], dict[str, list[float]]]:
        counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        durations: defaultdict[str, list[float]] = defaultdict(list)
        with self._lock:
            shards = list(self._shards)
        for shard in shards:
            # dict.copy and list() copy in C, in one step under the GIL: a shard's thread
            # cannot change them half-way through.
            for type_name, by_kind in dict.copy(shard.counts).items():
                counts[type_name].update(dict.copy(by_kind))
            for type_name, values in dict.copy(shard.durations).items():
                durations[type_name].extend(list(values))
        return dict(counts), dict(durations)

    def count(self, outcome: str) -> int:
        """Total events of one kind (published, started, succeeded, retrying, dead, ...)."""
        return sum(c[outcome] for c in self.counts.values())

    def finish(self) -> None:
        self.finished_at = time.time()

    def to_json(self) -> dict[str, Any]:
        all_counts, all_durations = self._merged()
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
                "duration_s": {
                    "p50": percentile(durations, 50),
                    "p95": percentile(durations, 95),
                    "p99": percentile(durations, 99),
                    "max": durations[-1] if durations else 0.0,
                },
            }
        totals = {
            key: sum(t[key] for t in by_type.values())
            for key in ("published", "succeeded", "retried", "timed_out", "dead")
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

    def render(self, stream: TextIO) -> None:
        """Print the summary table (and the dead letters) with Rich."""
        from rich.console import Console
        from rich.table import Table

        data = self.to_json()
        console = Console(file=stream, highlight=False, soft_wrap=False, width=110)
        table = Table(title=f"Summary ({data['wall_time_s']:.2f}s wall time)")
        for column in ("type", "published", "succeeded", "retried", "timed out", "dead"):
            table.add_column(column, justify="left" if column == "type" else "right")
        table.add_column("p50 / p99 ms", justify="right")
        for type_name, row in data["by_type"].items():
            d = row["duration_s"]
            table.add_row(
                type_name,
                str(row["published"]),
                str(row["succeeded"]),
                str(row["retried"]),
                str(row["timed_out"]),
                str(row["dead"]),
                f"{d['p50'] * 1000:.0f} / {d['p99'] * 1000:.0f}",
            )
        t = data["totals"]
        table.add_row(
            "total",
            *(str(t[k]) for k in ("published", "succeeded", "retried", "timed_out", "dead")),
            "",
            style="bold",
        )
        console.print(table)
        if data["dead_letters"]:
            dlq = Table(title="Dead-letter queue")
            for column in ("task", "type", "attempts", "reason", "error"):
                dlq.add_column(column)
            for d in data["dead_letters"]:
                dlq.add_row(
                    d["task_id"][:12],
                    d["type"],
                    str(d["attempts"]),
                    d["reason"] or "",
                    (d["error"] or "")[:60],
                )
            console.print(dlq)
