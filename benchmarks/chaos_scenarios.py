"""The chaos scenarios: each starts real workers, injects one kind of fault, and keeps a ledger.

A scenario is a function ``(world, sizes) -> (Ledger, Promise)``: it configures the world
(chaos_worlds.py), starts workers, publishes, injects its fault, waits until every task is
accounted for (or nothing more can happen), stops the workers (SIGTERM; one that does not exit
0 is a problem) and gathers the ledger (chaos_ledger.py). Visibility timeouts are short (3 s
where the scenario allows) so the whole run fits in its budget, yet leave the recovery bound
(1.5 x vt + 1 s = 5.5 s) room for a busy machine; task timeouts stay below them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos_ledger import Fault, Ledger, Promise
from chaos_worlds import RedisWorld, SqliteWorld, now, rss_kb, wait

from tests.integration.fleet import Worker
from tests.integration.test_sqlite_workers import freeze_outside_a_write, process_state

World = SqliteWorld | RedisWorld


@dataclass(frozen=True)
class Sizes:
    tasks: int  # tasks per fault scenario with short tasks (those with long ones run fewer)
    soak: int  # no-op tasks in the soak


SIZES = {"full": Sizes(900, 100_000), "quick": Sizes(300, 10_000)}

#: How long a worker may take to exit 0 after SIGTERM once its tasks are done.
STOP_S = 15.0
#: How long a scenario waits for its tasks after the fault, at most.
SETTLE_S = 90.0


@dataclass(frozen=True)
class Scenario:
    name: str
    brokers: tuple[str, ...]
    run: Callable[[World, Sizes], tuple[Ledger, Promise]]
    world: dict[str, Any] = field(default_factory=dict)  # options for make_world


def finish(
    world: World,
    ids: list[str],
    *,
    faulty: set[str] | None = None,
    faults: list[Fault] | None = None,
    problems: list[str] | None = None,
    notes: list[str] | None = None,
    settle_s: float = SETTLE_S,
) -> Ledger:
    """Wait for the tasks, stop the workers, and gather the ledger."""
    problems = list(problems or [])
    waited = time.monotonic()
    if not world.settle(ids, settle_s):
        problems.append(f"stuck: tasks unaccounted for, {time.monotonic() - waited:.0f}s later")
    left = world.queued()
    problems += world.stop_all(STOP_S)
    ledger = Ledger(
        published=ids,
        runs=world.runs(),
        outcomes=world.outcomes(),
        dead=world.dead_ids(),
        faulty=faulty or set(),
        faults=faults or [],
        problems=problems,
        notes=list(notes or []),
    )
    if left:
        ledger.notes.append(f"{left} task(s) still in the broker at the end (counted as lost)")
    return ledger


def in_flight(world: World, worker: Worker) -> bool:
    return any(r.pid == worker.pid and r.end is None for r in world.runs())


def wait_progress(world: World, ids: list[str], count: int, victim: Worker | None) -> None:
    """Wait until ``count`` tasks are accounted for and ``victim`` is running one."""
    wait(lambda: len(world.accounted(ids)) >= count, 60)
    if victim is not None:
        wait(lambda: in_flight(world, victim), 10, 0.01)


# -- worker faults --------------------------------------------------------------------------


def sigkill(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """SIGKILL 1 of 3 workers mid-run; its tasks must come back after the visibility timeout."""
    world.configure(visibility=3.0, timeout=2.0, threads=4)
    victim, *_ = world.start(3)
    ids = world.publish(sizes.tasks, sleep=0.1)
    wait_progress(world, ids, sizes.tasks // 6, victim)
    fault = Fault(now(), victim.pid)
    victim.kill()
    ledger = finish(world, ids, faults=[fault])
    return ledger, Promise(world.visibility)


def sigstop(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """SIGSTOP 1 of 3 workers for 2 x the visibility timeout, then SIGCONT."""
    world.configure(visibility=3.0, timeout=2.5, threads=4)
    victim, *_ = world.start(3)
    ids = world.publish(sizes.tasks, sleep=0.1)
    wait_progress(world, ids, sizes.tasks // 6, victim)
    frozen_at = freeze(world, victim)
    time.sleep(2 * world.visibility)
    os.kill(victim.pid, signal.SIGCONT)
    thawed_at = now()
    ledger = finish(world, ids, faults=[Fault(frozen_at, victim.pid)])
    # A thawed worker must not start a task whose lease lapsed while it was frozen (its
    # prefetch): another worker may have run it already. Those that had are counted.
    done_at: dict[str, float] = {}
    ends = [(r.id, r.end) for r in ledger.runs if r.pid != victim.pid and r.end is not None]
    for task_id, at in ends + [(o.id, o.ts) for o in ledger.outcomes]:
        done_at[task_id] = min(at, done_at.get(task_id, at))
    stale = [
        r
        for r in ledger.runs
        if r.pid == victim.pid and r.start > thawed_at and done_at.get(r.id, r.start) < r.start
    ]
    lease_lost = len(victim.events("task.lease_lost"))
    if stale:
        ledger.problems.append(f"{len(stale)} started after the thaw, done elsewhere already")
    ledger.notes.append(
        f"frozen {thawed_at - frozen_at:.1f}s; after the thaw it started {len(stale)} task(s) "
        f"already completed elsewhere; task.lease_lost logged {lease_lost}x"
    )
    return ledger, Promise(world.visibility)


def freeze(world: World, worker: Worker) -> float:
    """SIGSTOP ``worker`` (on SQLite at a moment it holds no write lock); when it took effect."""
    if isinstance(world, SqliteWorld):
        freeze_outside_a_write(worker, world.db)
    else:
        os.kill(worker.pid, signal.SIGSTOP)
        wait(lambda: process_state(worker.pid) == "T", 5, 0.001)
    return now()


def sigterm(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """SIGTERM 1 of 3 workers whose handlers finish well within the grace: nothing runs twice."""
    world.configure(visibility=3.0, timeout=2.0, threads=4, grace=10.0)
    victim, *_ = world.start(3)
    ids = world.publish(sizes.tasks, sleep=0.05)
    wait_progress(world, ids, sizes.tasks // 6, victim)
    victim.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    problems = []
    if not wait(victim.exited, 10.0 + 5.0, 0.02):
        victim.kill()
        problems.append("did not exit within grace + 5s of SIGTERM (killed)")
    elif victim.process.returncode != 0:
        problems.append(f"exited {victim.process.returncode} after SIGTERM, not 0")
    notes = [f"SIGTERMed worker exited {victim.process.returncode} after "
             f"{time.monotonic() - sent:.2f}s (grace 10s)"]  # fmt: skip
    ledger = finish(world, ids, problems=problems, notes=notes)
    return ledger, Promise(world.visibility, single_runs=True)


def sigterm_thread_left(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """SIGTERM a worker one of whose handlers left a non-daemon thread running (30 s): it must
    still exit 0 within 5 s, all its handlers having finished within the grace."""
    world.configure(visibility=3.0, timeout=2.0, threads=4, grace=10.0)
    world.start(3)
    ids, spawners = interleave(world, sizes.tasks // 3, [{"spawn": 30.0}] * 3)
    wait(lambda: any(r.id in spawners and r.end for r in world.runs()), 30, 0.02)
    pid = next(r.pid for r in world.runs() if r.id in spawners and r.end)
    victim = next(w for w in world.workers if w.pid == pid)
    victim.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    problems = []
    if not wait(victim.exited, 5.0, 0.02):
        victim.kill()
        problems.append("did not exit within 5s of SIGTERM (killed)")
    elif victim.process.returncode != 0:
        problems.append(f"exited {victim.process.returncode} after SIGTERM, not 0")
    notes = [f"exited {victim.process.returncode} {time.monotonic() - sent:.2f}s after SIGTERM"]
    ledger = finish(world, ids, problems=problems, notes=notes)
    # The other workers that ran a spawner wait for no thread either (finish stops them).
    return ledger, Promise(world.visibility, single_runs=True)


def sigterm_blocked(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """SIGTERM a worker whose handlers are blocked in a C call (time.sleep) past the grace:
    it must still exit 0 soon after the grace, handing their tasks back to run elsewhere."""
    grace = 0.5
    world.configure(visibility=10.0, timeout=9.0, threads=4, grace=grace)
    (victim,) = world.start(1)
    # Long enough that waiting for the blocked handlers (about 6.5 s after the signal, once
    # the other workers are up) cannot pass for an exit after the grace.
    ids = world.publish(world.threads, block=8.0)
    wait(lambda: sum(r.pid == victim.pid for r in world.runs()) == world.threads, 30, 0.02)
    # One survivor per blocked task: tasks handed out again run one at a time per process (a
    # redelivered task runs alone), and this scenario is about the exit and the hand-back.
    world.start(world.threads)
    victim.process.send_signal(signal.SIGTERM)
    fault = Fault(now(), victim.pid)
    sent = time.monotonic()
    problems = []
    if not wait(victim.exited, 15.0, 0.02):
        victim.kill()
        problems.append("did not exit within 15s of SIGTERM (killed)")
    took = time.monotonic() - sent
    if victim.process.returncode != 0:
        problems.append(f"exited {victim.process.returncode} after SIGTERM, not 0")
    elif took > grace + 2.5:  # FORCED_WAIT_S (1 s), then the summary and exit on a busy machine
        problems.append(f"exit took {took:.1f}s after SIGTERM (grace {grace:g}s)")
    notes = [f"exited {victim.process.returncode} {took:.2f}s after SIGTERM (grace {grace:g}s, "
             "handlers blocked 8s)"]  # fmt: skip
    ledger = finish(world, ids, faults=[fault], problems=problems, notes=notes)
    return ledger, Promise(world.visibility)


def sigterm_twice(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """SIGTERM, then a second SIGTERM while handlers run: exit 130 at once; tasks come back."""
    world.configure(visibility=3.0, timeout=2.5, threads=4, grace=10.0)
    world.start(3)
    # Two tasks per thread: the survivors are idle again by the time the abandoned tasks come
    # back, so the recovery measured is the redelivery's, not a wait in a backlog.
    ids = world.publish(2 * 3 * world.threads, sleep=1.0)
    wait(lambda: any(in_flight(world, w) for w in world.workers), 10, 0.01)
    victim = max(world.workers, key=lambda w: sum(r.pid == w.pid for r in world.runs()))
    victim.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    victim.process.send_signal(signal.SIGTERM)
    fault = Fault(now(), victim.pid)
    second = time.monotonic()
    problems = []
    if not wait(victim.exited, 5.0, 0.01):
        victim.kill()
        problems.append("did not exit within 5s of the second signal (killed)")
    elif victim.process.returncode != 130:
        problems.append(f"exited {victim.process.returncode} after two signals, not 130")
    notes = [f"exited {victim.process.returncode} {time.monotonic() - second:.2f}s after "
             "the second signal"]  # fmt: skip
    ledger = finish(world, ids, faults=[fault], problems=problems, notes=notes)
    return ledger, Promise(world.visibility)


# -- handler faults -------------------------------------------------------------------------


def interleave(world: World, healthy: int, bad: list[dict[str, Any]]) -> tuple[list[str], set[str]]:
    """Publish ``healthy`` plain tasks with the ``bad`` payloads spread among them."""
    ids: list[str] = []
    faulty: set[str] = set()
    chunk = max(1, healthy // (len(bad) + 1))
    for payload in bad:
        ids += world.publish(chunk, sleep=0.02)
        (bad_id,) = world.publish(1, **payload)
        ids.append(bad_id)
        faulty.add(bad_id)
    ids += world.publish(healthy - chunk * len(bad), sleep=0.02)
    return ids, faulty


def base_exception(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """Handlers raising SystemExit, KeyboardInterrupt and a custom BaseException among
    healthy tasks: those tasks fail (and reach the DLQ); every other task completes."""
    world.configure(visibility=3.0, timeout=2.0, threads=4, max_attempts=2)
    world.start(2)
    kinds = ["SystemExit", "KeyboardInterrupt", "custom"] * 3
    ids, faulty = interleave(world, sizes.tasks // 2, [{"raise": k} for k in kinds])
    ledger = finish(world, ids, faulty=faulty)
    dead = len(ledger.dead & faulty)
    ledger.notes.append(f"{dead} of {len(faulty)} raising tasks dead-lettered")
    return ledger, Promise(world.visibility)


def os_exit(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """A handler calling os._exit among healthy tasks (3 workers, each death replaced): the
    task reaches the DLQ after max_attempts deliveries; healthy tasks all complete, none dead."""
    world.configure(visibility=3.0, timeout=2.0, threads=4, max_attempts=3)
    world.start(3)
    ids, faulty = interleave(world, sizes.tasks // 2, [{"exit": 3}])
    deaths: list[Worker] = []
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        for worker in [w for w in world.workers if w.exited() and w not in deaths]:
            deaths.append(worker)
            world.start(1, wait=False)
        if world.dead_ids() & faulty or len(deaths) > 10:
            break
        time.sleep(0.05)
    runs = world.runs()
    # Each death is dated by the last run its process started: the one that called os._exit
    # (or one a neighbour thread started in the instant before it).
    faults = [
        Fault(max(r.start for r in runs if r.pid == w.pid), w.pid)
        for w in deaths
        if any(r.pid == w.pid and r.id in faulty for r in runs)
    ]
    problems = [f"{w.name} exited {w.process.returncode}, not 3 (os._exit)"
                for w in deaths if w.process.returncode != 3]  # fmt: skip
    ledger = finish(world, ids, faulty=faulty, faults=faults, problems=problems)
    ledger.notes.append(f"{len(deaths)} worker process(es) ended by os._exit")
    return ledger, Promise(world.visibility)


# -- broker faults --------------------------------------------------------------------------


def redis_restart(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """Redis killed (kill -9) mid-run and restarted 1 s later. With AOF (appendfsync always)
    nothing may be lost; without persistence what was queued is lost, and counted. Either way
    tasks published after the restart must all complete."""
    assert isinstance(world, RedisWorld)
    persistent = world.server.options["appendonly"] == "yes"
    world.configure(visibility=3.0, timeout=2.0, threads=4)
    world.start(2)
    ids = world.publish(sizes.tasks, sleep=0.05)
    wait_progress(world, ids, sizes.tasks // 6, None)
    world.server.kill()
    killed_at = now()
    time.sleep(1.0)
    world.server.start()
    fault = Fault(killed_at, None, since=now())
    after = world.publish(100, sleep=0.01)
    ledger = finish(world, ids + after, faults=[fault])
    missing = set(after) - {r.id for r in ledger.runs if r.end is not None}
    if missing:
        ledger.problems.append(f"{len(missing)} of 100 tasks published after the restart lost")
    reconnecting = sum(len(w.events("broker.reconnecting")) for w in world.workers)
    ledger.notes.append(f"broker.reconnecting logged {reconnecting}x")
    return ledger, Promise(world.visibility, no_loss=persistent)


# -- soak -----------------------------------------------------------------------------------


def soak(world: World, sizes: Sizes) -> tuple[Ledger, Promise]:
    """No-op tasks through 2 workers with no fault: nothing lost or run twice, RSS flat.

    RSS "start" is read once a tenth of the tasks is done (imports, pools and caches are
    warm), again half-way (shown, to tell a plateau from a slope), "end" once the queue is
    empty.
    """
    world.configure(visibility=30.0, timeout=10.0, threads=4)
    ids = world.publish(sizes.soak)
    workers = world.start(2)
    total = len(ids)
    problems = []
    if not wait(lambda: world.queued() <= total * 0.9, 120, 0.2):
        problems.append("a tenth of the tasks not done within 120s")
    start = {w.pid: rss_kb(w.pid) for w in workers}
    began = time.monotonic()
    wait(lambda: world.queued() <= total * 0.45, 600, 0.2)
    middle = {w.pid: rss_kb(w.pid) for w in workers}  # shown, not judged: the trend
    if not wait(lambda: world.queued() == 0, 600, 0.2):
        problems.append("queue not empty within 600s")
    took = time.monotonic() - began
    end = {w.pid: rss_kb(w.pid) for w in workers}
    ledger = finish(world, ids, problems=problems, settle_s=30.0)
    ledger.rss_kb = {pid: (start[pid], end[pid]) for pid in start}
    rss = ", ".join(
        f"{start[pid] / 1024:.1f} -> {middle[pid] / 1024:.1f} -> {end[pid] / 1024:.1f} MB"
        for pid in start
    )
    ledger.notes.append(f"{total * 0.9 / took:,.0f} tasks/s after warm-up; RSS {rss}")
    return ledger, Promise(world.visibility, single_runs=True, max_rss_growth=0.10)


SCENARIOS = [
    Scenario("SIGKILL 1 of 3 workers", ("sqlite", "redis"), sigkill),
    Scenario("SIGSTOP 1 of 3 past the lease", ("sqlite", "redis"), sigstop),
    Scenario("Redis kill -9 + restart, AOF always", ("redis",), redis_restart),
    Scenario(
        "Redis kill -9 + restart, no persistence", ("redis",), redis_restart, {"appendonly": False}
    ),
    Scenario("SIGTERM, handlers within grace", ("sqlite", "redis"), sigterm),
    Scenario("SIGTERM, a handler's thread left running", ("sqlite", "redis"), sigterm_thread_left),
    Scenario("SIGTERM, handlers blocked past grace", ("sqlite", "redis"), sigterm_blocked),
    Scenario("SIGTERM then a second signal", ("sqlite", "redis"), sigterm_twice),
    Scenario("handler raises BaseException", ("sqlite", "redis"), base_exception),
    Scenario("handler calls os._exit", ("sqlite", "redis"), os_exit),
    Scenario("soak: no-op tasks", ("sqlite", "redis"), soak),
]
