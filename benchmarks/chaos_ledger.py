"""The chaos ledger: what one scenario saw, audited and judged; rendered as a table.

A ``Ledger`` is gathered by a scenario (benchmarks/chaos_scenarios.py) from three sources that
do not share counters: the handlers' own audit lines (``Run``: who started what, and whether it
returned), the workers' JSON logs (``Outcome``: an ack or dead-letter the broker accepted, logged
as task.succeeded / task.dead only once accepted) and the broker's dead-letter queue. ``judge``
turns it into a ``Verdict``:

- **lost**: published, yet never acked, never returned from a handler and not in the DLQ.
- **ran twice**: a task whose handler started more than once (tasks that fail on purpose, the
  ``faulty`` ones, are left out: their retries are the point).
- **completed twice**: more than one accepted outcome for one task (an ack or dead-letter the
  fencing should have refused).
- **healthy dead**: a task not marked faulty that reached the DLQ.
- **recovery**: for each fault, the tasks it hit (runs in flight in the faulted process, or in
  every process for a broker fault, plus tasks first run with attempt > 1 after it: prefetched,
  never started, handed out again), and for each such task the time from the fault (or from
  ``Fault.since``: when a restarted broker answered again) to its first sign of life after the
  fault: a run that started after it, or an accepted outcome after it. The worst one counts;
  the bound is ``1.5 x visibility_timeout + 1 s``.
- **RSS growth**: per worker process, (end - start) / start of VmRSS; the worst one counts.

A verdict fails on: loss where the broker promises none; anything completed twice; anything run
twice where the scenario promises single runs (the soak, SIGTERM within the grace); recovery
over the bound; RSS growth over the scenario's limit; a healthy task dead-lettered; a fault
that hit no task (the scenario tested nothing); any problem the scenario itself reported (a
worker that did not exit as promised, tasks stuck).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.integration.audit_handlers import Run

RECOVERY_FACTOR = 1.5  # x visibility_timeout ...
RECOVERY_SLACK_S = 1.0  # ... + this


@dataclass(frozen=True)
class Fault:
    """One fault: when it hit, which worker process (None: the broker, so every process)."""

    at: float  # wall clock (time.time())
    pid: int | None = None
    since: float | None = None  # recovery is measured from here; default ``at``


@dataclass(frozen=True)
class Outcome:
    """An outcome the broker accepted, from a worker's log: task.succeeded or task.dead."""

    id: str
    ts: float
    event: str = "task.succeeded"


@dataclass(frozen=True)
class Promise:
    """What the scenario must show on its broker."""

    visibility_s: float
    no_loss: bool = True  # False only where the broker may lose tasks (Redis, no persistence)
    single_runs: bool = False  # no task may run twice (soak, SIGTERM within the grace)
    max_rss_growth: float | None = None  # fraction; None: RSS is not judged

    @property
    def recovery_bound_s(self) -> float:
        return RECOVERY_FACTOR * self.visibility_s + RECOVERY_SLACK_S


@dataclass
class Ledger:
    """Everything one scenario observed."""

    published: list[str]
    runs: list[Run] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)  # ids in the broker's DLQ
    faulty: set[str] = field(default_factory=set)  # ids that fail on purpose (may be dead)
    faults: list[Fault] = field(default_factory=list)
    rss_kb: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid -> (start, end)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    tasks: int
    lost: int
    ran_twice: int
    completed_twice: int
    healthy_dead: int
    recovery_s: float | None
    recovery_bound_s: float
    visibility_s: float
    rss_growth: float | None
    failures: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(ledger: Ledger, promise: Promise) -> Verdict:
    """Audit ``ledger`` against ``promise``; see the module docstring for each figure."""
    published = set(ledger.published)
    acks = Counter(o.id for o in ledger.outcomes if o.id in published)
    returned = {r.id for r in ledger.runs if r.end is not None} & published
    lost = published - set(acks) - returned - ledger.dead
    healthy = published - ledger.faulty
    starts = Counter(r.id for r in ledger.runs if r.id in healthy)
    ran_twice = sum(1 for n in starts.values() if n > 1)
    completed_twice = sum(1 for n in acks.values() if n > 1)
    healthy_dead = len(ledger.dead & healthy)
    recovery = recovery_s(ledger)
    growth = rss_growth(ledger.rss_kb.values())

    failures: list[str] = []
    if lost and promise.no_loss:
        failures.append(f"lost {len(lost)} (the broker promises none)")
    if completed_twice:
        failures.append(f"{completed_twice} completed (acked) twice")
    if ran_twice and promise.single_runs:
        failures.append(f"{ran_twice} ran twice")
    if recovery is not None and recovery > promise.recovery_bound_s:
        failures.append(f"recovery {recovery:.2f}s > {promise.recovery_bound_s:.1f}s")
    limit = promise.max_rss_growth
    if growth is not None and limit is not None and growth > limit:
        failures.append(f"RSS grew {growth:.1%} > {limit:.0%}")
    if healthy_dead:
        failures.append(f"{healthy_dead} healthy task(s) dead-lettered")
    # The workers log an outcome only once the broker accepted it; if most tasks that returned
    # have none, "completed twice" cannot be seen at all.
    unlogged = len(returned - set(acks) - ledger.dead)
    if unlogged > len(returned) / 2:
        failures.append(f"no accepted outcome logged for {unlogged} tasks that returned")
    missed = [f for f, hit in hits(ledger) if not hit]
    if missed:
        failures.append(f"{len(missed)} fault(s) hit no task: nothing was tested")
    failures += ledger.problems
    notes = list(ledger.notes)
    if lost and not promise.no_loss:
        notes.append(f"lost {len(lost)}: expected without persistence")
    return Verdict(
        tasks=len(published),
        lost=len(lost),
        ran_twice=ran_twice,
        completed_twice=completed_twice,
        healthy_dead=healthy_dead,
        recovery_s=recovery,
        recovery_bound_s=promise.recovery_bound_s,
        visibility_s=promise.visibility_s,
        rss_growth=growth,
        failures=tuple(failures),
        notes=tuple(notes),
    )


def hits(ledger: Ledger) -> list[tuple[Fault, set[str]]]:
    """Each fault with the tasks it hit: in flight in the faulted process (every process for a
    broker fault), or handed out and never started there (their first run is a later attempt,
    after the fault; each belongs to the last fault before that run)."""
    firsts: dict[str, Run] = {}
    for run in ledger.runs:
        if run.id not in firsts or run.start < firsts[run.id].start:
            firsts[run.id] = run
    faults = sorted(ledger.faults, key=lambda f: f.at)
    found = []
    for i, fault in enumerate(faults):
        hit = {
            r.id
            for r in ledger.runs
            if r.start <= fault.at  # a run that began at the fault (os._exit) was hit too
            and (r.end is None or r.end > fault.at)
            and (fault.pid is None or r.pid == fault.pid)
        }
        until = faults[i + 1].at if i + 1 < len(faults) else float("inf")
        hit |= {
            task_id
            for task_id, first in firsts.items()
            if first.attempt > 1 and fault.at <= first.start < until
        }
        found.append((fault, hit))
    return found


def recovery_s(ledger: Ledger) -> float | None:
    """The worst time from a fault to a task it hit showing life again; None if none did."""
    signs_of: dict[str, list[float]] = {}
    for run in ledger.runs:
        signs_of.setdefault(run.id, []).append(run.start)
    for outcome in ledger.outcomes:
        signs_of.setdefault(outcome.id, []).append(outcome.ts)
    worst: float | None = None
    for fault, hit in hits(ledger):
        origin = fault.at if fault.since is None else fault.since
        for task_id in hit:
            signs = [t for t in signs_of.get(task_id, []) if t > fault.at]
            if not signs:
                continue  # never back: counted as lost (or completed in place, unacked)
            took = max(0.0, min(signs) - origin)
            worst = took if worst is None else max(worst, took)
    return worst


def rss_growth(pairs: Iterable[tuple[int, int]]) -> float | None:
    """The largest (end - start) / start over (start, end) pairs; None when there are none."""
    growths = [(end - start) / start for start, end in pairs if start > 0]
    return max(growths) if growths else None


# -- rendering ----------------------------------------------------------------------------

HEADER = [
    "scenario",
    "broker",
    "tasks",
    "lost",
    "ran twice",
    "completed twice",
    "recovery (s) vs vt",
    "RSS growth",
    "verdict",
]


@dataclass(frozen=True)
class Row:
    scenario: str
    broker: str
    verdict: Verdict
    seconds: float = 0.0  # how long the scenario took

    def cells(self) -> list[str]:
        v = self.verdict
        if v.visibility_s == 0:  # the scenario never ran
            recovery = "-"
        elif v.recovery_s is None:
            recovery = f"- (vt {v.visibility_s:g})"
        else:
            recovery = f"{v.recovery_s:.2f} (vt {v.visibility_s:g}, max {v.recovery_bound_s:g})"
        growth = "-" if v.rss_growth is None else f"{v.rss_growth:+.1%}"
        verdict = "PASS" if v.passed else "FAIL: " + "; ".join(v.failures)
        return [
            self.scenario,
            self.broker,
            f"{v.tasks:,}",
            str(v.lost),
            str(v.ran_twice),
            str(v.completed_twice),
            recovery,
            growth,
            verdict,
        ]


def render_table(rows: list[Row]) -> str:
    """A plain-text table for the terminal, with each row's notes under it."""
    table = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.verdict.passed for r in rows)
    lines.append(f"scenarios: {len(rows) - failed} PASS, {failed} FAIL")
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r.cells()) + " |" for r in rows]
    return "\n".join(out)


def notes_lines(rows: list[Row]) -> list[str]:
    """One line per row that has notes: what the figures alone do not say."""
    return [
        f"{r.scenario} ({r.broker}): {'; '.join(r.verdict.notes)}" for r in rows if r.verdict.notes
    ]
