"""`dq-run bench`: synthetic load through the user's own pipeline, with throughput and latency.

The load goes through the pipeline exactly as configured (its broker, limits, handlers, retry
policy); the workers run in this process, as with ``dq-run run``. Payloads come from the
config's ``simulate`` section when there is one (runner.ops.produce's fault planning, so the
handlers see the same latency and failures as in the demo), otherwise they are empty dicts.

What is reported, per task type, for the tasks this run published:

- throughput: tasks finished (succeeded or dead-lettered) per second, from the first publish to
  the last finish;
- publish -> start latency (the ``task.started`` event's ``queue_wait_s``) of first attempts,
  as p50 / p95 / p99 / max.

Logging: per-task log events are not set up (``observe=False``), so what is measured is the
queue, not the log writer. Tasks already in a durable broker, or taken by other processes,
are not counted; tasks still unfinished when ``drain_s`` runs out are reported as unfinished.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TextIO

from runner.config.models import PipelineConfig, SimulateConfig, parse_duration
from runner.config.models import parse_rate as config_parse_rate
from runner.errors import UsageError
from runner.events import Event, EventName
from runner.model import require_type
from runner.observe.summary import percentile
from runner.ops.produce import plan_tasks

if TYPE_CHECKING:
    from runner.app import PublishItem

#: Tasks published per put when the rate allows batching (one put per pacing tick).
_MAX_BATCH = 200
#: The producer paces itself in ticks of at least this long.
_TICK_S = 0.001
#: Planned simulated payloads are drawn in chunks of this many (the stream is endless).
_PLAN_CHUNK = 10_000
# The names the recorder compares every event with, read once: it runs in the measured path,
# and a member lookup costs 0.1 us on Python 3.11.
_STARTED, _RETRYING, _DEAD = EventName.TASK_STARTED, EventName.TASK_RETRYING, EventName.TASK_DEAD
_FINISHED = frozenset({EventName.TASK_SUCCEEDED, EventName.TASK_DEAD})


def parse_rate(text: str) -> float | None:
    """``"500/s"``, ``"30/m"`` -> tasks per second; ``"max"`` -> None (as fast as possible)."""
    if text.strip().lower() in ("max", "unlimited"):
        return None
    try:
        return config_parse_rate(text)
    except ValueError as exc:
        raise UsageError(f"--rate {text!r}: {exc} (or max)") from None


def parse_seconds(text: str) -> float:
    """``"30s"``, ``"2m"``, ``"500ms"`` -> seconds (positive)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--duration: {exc}") from None
    if not isinstance(seconds, float) or seconds <= 0:
        raise UsageError(f"--duration must be a positive duration like 30s, got {text!r}")
    return seconds


@dataclass(frozen=True)
class BenchOptions:
    """What load to generate. Publishing stops after ``tasks`` or ``duration_s``, first hit."""

    rate: float | None = 500.0  # tasks/s; None: as fast as the broker takes them
    duration_s: float = 30.0
    tasks: int | None = None
    types: tuple[str, ...] = ()  # empty: every configured type (or the simulate mix)
    drain_s: float = 60.0  # how long to wait for the published tasks to finish
    # "batch": up to _MAX_BATCH tasks per publish_many call (as many as the rate has made due);
    # "call": one publish() per task, as a web application enqueues (one per request).
    publish_mode: Literal["batch", "call"] = "batch"


class BenchRecorder:
    """A listener: first-attempt queue waits and final outcomes per type. Thread-safe, cheap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished_enough = threading.Event()
        self._target: int | None = None
        self.waits: defaultdict[str, list[float]] = defaultdict(list)
        self.finished: defaultdict[str, int] = defaultdict(int)
        self.dead: defaultdict[str, int] = defaultdict(int)
        self.retried: defaultdict[str, int] = defaultdict(int)
        self.total_finished = 0
        self.last_finish = 0.0

    def handle(self, event: Event) -> None:
        name = event.name
        if name == _STARTED:
            if event.attempt == 1 and event.queue_wait_s is not None and event.type:
                # No lock: the defaultdict's insert (list() is C) and the append are each one
                # step under the GIL, so no thread's append is lost.
                self.waits[event.type].append(event.queue_wait_s)
        elif name in _FINISHED and event.type:
            with self._lock:
                self.finished[event.type] += 1
                if name == _DEAD:
                    self.dead[event.type] += 1
                self.total_finished += 1
                self.last_finish = time.perf_counter()
                if self._target is not None and self.total_finished >= self._target:
                    self._finished_enough.set()
        elif name == _RETRYING and event.type:
            with self._lock:
                self.retried[event.type] += 1

    def expect(self, total: int) -> None:
        """Let ``wait_finished`` return once ``total`` tasks have finished."""
        with self._lock:
            self._target = total
            if self.total_finished >= total:
                self._finished_enough.set()
            else:
                self._finished_enough.clear()

    def wait_finished(self, timeout: float | None) -> bool:
        return self._finished_enough.wait(timeout)


@dataclass
class TypeReport:
    """What one task type did during a bench run."""

    name: str
    published: int = 0
    finished: int = 0
    dead: int = 0
    retried: int = 0
    throughput: float = 0.0  # finished per second
    wait_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, max


@dataclass
class BenchReport:
    published: int
    finished: int
    publish_s: float
    elapsed_s: float
    types: list[TypeReport]

    @property
    def throughput(self) -> float:
        return self.finished / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def render(self, out: TextIO) -> None:
        out.write(
            f"published {self.published} in {self.publish_s:.2f}s, "
            f"finished {self.finished} in {self.elapsed_s:.2f}s "
            f"({self.throughput:,.0f} tasks/s)\n"
        )
        header = ["type", "published", "finished", "dead", "retried", "tasks/s"]
        header += ["p50 ms", "p95 ms", "p99 ms", "max ms"]
        rows = [header]
        for t in self.types:
            counts = [t.published, t.finished, t.dead, t.retried]
            waits = [f"{t.wait_ms.get(q, 0.0):.2f}" for q in ("p50", "p95", "p99", "max")]
            rows.append([t.name, *map(str, counts), f"{t.throughput:,.0f}", *waits])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            out.write("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) + "\n")
        out.write("latency: publish -> start of first attempts (queue_wait_s)\n")
        if self.published > self.finished:
            out.write(f"unfinished: {self.published - self.finished} task(s)\n")


def payloads(config: PipelineConfig, types: Sequence[str]) -> Iterator[PublishItem]:
    """An endless stream of (type, payload[, headers]): simulated faults if configured (in the
    headers), else ``{}``."""
    chosen = list(types) or _default_types(config)
    for name in chosen:
        require_type(name, config.task_types)
    return _endless(config, chosen)


def _endless(config: PipelineConfig, chosen: list[str]) -> Iterator[PublishItem]:
    sim = config.simulate
    if sim is None:
        yield from ((name, {}) for name in itertools.cycle(chosen))
        return
    mix = {name: sim.mix.get(name, 1) or 1 for name in chosen}
    for chunk in itertools.count():
        plan = SimulateConfig(tasks=_PLAN_CHUNK, mix=mix, seed=sim.seed + chunk, faults=sim.faults)
        yield from plan_tasks(plan)


def _default_types(config: PipelineConfig) -> list[str]:
    if config.simulate is not None:
        mixed = [n for n, w in config.simulate.mix.items() if w > 0 and n in config.task_types]
        if mixed:
            return mixed
    return list(config.task_types)


def run_bench(config: PipelineConfig, options: BenchOptions) -> BenchReport:
    """Start the pipeline's workers, publish the load, wait for it to finish, report."""
    from runner.app import build_runtime  # the engine is heavy; `dq-run --help` should not pay

    items = payloads(config, options.types)  # raises UsageError before anything starts
    recorder = BenchRecorder()
    runner = build_runtime(config, listeners=[recorder], observe=False)
    published: dict[str, int] = defaultdict(int)
    with runner:
        t0 = time.perf_counter()
        total = _produce(runner, items, options, published)
        publish_s = time.perf_counter() - t0
        recorder.expect(total)
        recorder.wait_finished(options.drain_s)
        end = recorder.last_finish if recorder.total_finished else time.perf_counter()
    elapsed = max(end - t0, 1e-9)
    reports = []
    for name in sorted(published):
        waits = sorted(recorder.waits.get(name, []))
        reports.append(
            TypeReport(
                name=name,
                published=published[name],
                finished=recorder.finished.get(name, 0),
                dead=recorder.dead.get(name, 0),
                retried=recorder.retried.get(name, 0),
                throughput=recorder.finished.get(name, 0) / elapsed,
                wait_ms={
                    "p50": percentile(waits, 50) * 1000,
                    "p95": percentile(waits, 95) * 1000,
                    "p99": percentile(waits, 99) * 1000,
                    "max": (waits[-1] if waits else 0.0) * 1000,
                },
            )
        )
    return BenchReport(total, min(recorder.total_finished, total), publish_s, elapsed, reports)


def _produce(
    runner: Any, items: Iterator[PublishItem], options: BenchOptions, counts: dict[str, int]
) -> int:
    """Publish at ``options.rate`` until ``tasks`` or ``duration_s``; returns how many."""
    limit = options.tasks if options.tasks is not None else math.inf
    start = time.perf_counter()
    end = start + options.duration_s
    sent = 0
    while sent < limit:
        now = time.perf_counter()
        if now >= end:
            break
        if options.rate is None:
            due = _MAX_BATCH
        else:
            due = min(_MAX_BATCH, int((now - start) * options.rate) + 1 - sent)
            if due <= 0:
                time.sleep(max(_TICK_S, (sent + 1) / options.rate - (now - start)))
                continue
        batch = list(itertools.islice(items, int(min(due, limit - sent))))
        if options.publish_mode == "call":
            for item in batch:
                runner.publish(item[0], item[1], headers=item[2] if len(item) > 2 else None)
        else:
            runner.publish_many(batch)
        for item in batch:
            counts[item[0]] += 1
        sent += len(batch)
    return sent
