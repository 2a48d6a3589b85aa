"""How soon a SIGKILLed worker's tasks run again, on every durable broker (issue 13 item 5).

Real `dq-run run` processes share one queue with a backlog; one of them is SIGKILLed while it
holds tasks (running and prefetched). Each task it held must start again elsewhere within
``1.5 x visibility_timeout + 1 s`` of the kill, wherever it stood in the queue: a lease expires
after ``visibility_timeout``, the brokers look for expired leases at least every
``min(1 s, visibility_timeout / 5)``, and the rest is slack for a loaded machine. None may be lost.

The tasks the victim held are those it was running (a ``start`` with no ``end``) and those it
had been handed but not started: their first run is attempt 2, as the broker counted the
victim's hand-out (the tasks here never fail, so nothing else makes an attempt 2).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.brokers.base import Broker
from tests.integration.audit_handlers import Run, completed, overlaps
from tests.integration.fleet import Fleet, wait_for
from tests.integration.test_redis_workers import Cluster
from tests.integration.test_sqlite_workers import Pipeline
from tests.redis_server import RedisServer

VISIBILITY_S = 2.0
THREADS = 4
#: Long enough that the survivors still have a backlog when the victim's leases expire: its
#: tasks must not wait behind the queue when they come back.
TASKS = 1200
SLEEP_S = 0.05


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet[Broker]]:
    made: Fleet[Broker]
    if request.param == "sqlite":
        made = Pipeline(tmp_path)  # type: ignore[assignment]
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        namespace: str = request.getfixturevalue("redis_namespace")
        made = Cluster(tmp_path, server, namespace)  # type: ignore[assignment]
    yield made
    made.close()


def held_by(victim_pid: int, runs: list[Run]) -> set[str]:
    """Tasks the victim held when it died: running there, or first run as attempt 2."""
    running = {r.id for r in runs if r.pid == victim_pid and r.end is None}
    first_attempt: dict[str, int] = {}
    for run in runs:
        first_attempt[run.id] = min(first_attempt.get(run.id, run.attempt), run.attempt)
    return running | {i for i, attempt in first_attempt.items() if attempt >= 2}


@pytest.mark.slow
def test_a_sigkilled_workers_tasks_run_again_within_one_and_a_half_visibility_timeouts(
    fleet: Fleet[Broker],
) -> None:
    fleet.configure(visibility=VISIBILITY_S, timeout=1.0, threads=THREADS)
    victim, *survivors = fleet.start(3)
    ids = fleet.publish(TASKS, sleep=SLEEP_S)
    wait_for(lambda: completed(fleet.runs()).total() >= 100, 60, what="100 tasks done")
    wait_for(
        lambda: any(r.pid == victim.pid and r.end is None for r in fleet.runs()),
        10,
        what="victim running a task",
    )
    victim.kill()
    killed_at = time.time()

    runs = fleet.wait_done(ids, timeout=120)
    held = held_by(victim.pid, runs)
    again = {
        i: min(r.start for r in runs if r.id == i and r.pid != victim.pid and r.start > killed_at)
        for i in held
    }
    delays = sorted(t - killed_at for t in again.values())
    bound = 1.5 * VISIBILITY_S + 1.0
    late = {i: round(t - killed_at, 2) for i, t in again.items() if t - killed_at > bound}
    backlog_left = sum(1 for r in runs if r.start > killed_at + bound)
    print(
        f"\nvictim held {len(held)} task(s); they started again after "
        f"{', '.join(f'{d:.2f}' for d in delays)} s (bound {bound:.1f} s, "
        f"visibility_timeout {VISIBILITY_S} s); runs started after the bound: {backlog_left}"
    )
    assert held, "the victim held no task when it was killed"
    assert backlog_left > 0, "the queue drained before the bound: the test proves nothing"
    assert set(completed(runs)) == set(ids)  # none lost
    assert not late, f"held tasks started again too late (s after the kill): {late}"
    # Nor early: leases are renewed every visibility_timeout / 3, so none expired sooner than
    # two thirds of one after the kill (half, for slack).
    assert delays[0] >= VISIBILITY_S / 2
    assert overlaps(runs, open_until=killed_at) == []
    assert [w.terminate() for w in survivors] == [0, 0]
