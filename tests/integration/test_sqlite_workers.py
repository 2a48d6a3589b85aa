"""Real `dq-run run` processes on one SQLite file: crashes, restarts, corruption, freezes.

Tasks are published from the test process with SqliteBroker.put_many; the handler
(tests/integration/audit_handlers.py) appends a start and an end line per run to an audit
directory. Every test ends with ``audit``: each published task either succeeded (a handler run
returned and the row is gone) or is in the DLQ; none lost, none both, nothing left queued. It
prints duplicates and, where there is one, the recovery time. Worker logs (JSON lines on
stderr) go to files in tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.brokers.base import DeadLetterFilter
from runner.brokers.sqlite.broker import SqliteBroker
from runner.codec import encode_task
from runner.model import DeadLetter, Task
from tests.cli.run_kit import run
from tests.integration.audit_handlers import completed, overlaps
from tests.integration.fleet import Fleet, Worker, wait_for

CONFIG = """\
version: 1
broker:
  kind: sqlite
  path: {path}
  capacity: 10000
  visibility_timeout: {visibility}s
workers: {threads}
retry:
  max_attempts: {max_attempts}
  backoff: {{initial: 50ms, max: 200ms, jitter: 0}}
task_types:
  work:
    handler: tests.integration.audit_handlers:work
    timeout: {timeout}s
dead_letter: {{kind: broker}}
logging: {{format: json, level: INFO}}
shutdown: {{grace: 10s}}
"""


class Pipeline(Fleet[SqliteBroker]):
    """One test's world on a SQLite file: the file, a config, an audit dir and workers."""

    publish_batch = 200
    poll_s = 0.1
    worker_timeout_s = 30.0

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "queue.db"
        super().__init__(tmp_path)

    # Narrower than Fleet.config_text on purpose: an option this config lacks is a TypeError.
    def config_text(  # type: ignore[override]
        self, *, visibility: float, timeout: float, threads: int, max_attempts: int
    ) -> str:
        return CONFIG.format(
            path=self.db,
            visibility=visibility,
            threads=threads,
            max_attempts=max_attempts,
            timeout=timeout,
        )

    def open_broker(self) -> SqliteBroker:
        return SqliteBroker(str(self.db), 10_000, 10.0, "block", self.visibility)

    def queued(self) -> int:
        return sum(d.total for d in self.broker.depth().values())

    def dead_letters(self) -> dict[str, DeadLetter]:
        return {r.id: r for r in self.broker.dead_letters(DeadLetterFilter())}

    def audit(self, ids: list[str], *, label: str = "") -> Counter[str]:
        """Every id succeeded or is dead-lettered, never both, none lost; nothing still queued.

        Returns how many handler runs of each task returned; prints the duplicates.
        """
        wait_for(lambda: self.queued() == 0, 15, what="queue drained (acks landed)")
        done = completed(self.runs())
        dead = set(self.dead_letters())
        published = set(ids)
        lost = published - set(done) - dead
        both = set(done) & dead
        strangers = (set(done) | dead) - published
        duplicates = sorted(i for i, n in done.items() if n > 1)
        print(
            f"\naudit{f' ({label})' if label else ''}: published {len(published)}, "
            f"succeeded {len(set(done) & published)}, dead-lettered {len(dead)}, "
            f"lost {len(lost)}, both {len(both)}, completed more than once {len(duplicates)}"
        )
        assert not lost, f"lost tasks: {sorted(lost)[:10]}"
        assert not both, f"succeeded and dead-lettered: {sorted(both)[:10]}"
        assert not strangers, f"tasks nobody published: {sorted(strangers)[:10]}"
        return done


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    made = Pipeline(tmp_path)
    yield made
    made.close()


def accepted_outcomes(workers: list[Worker], event: str) -> Counter[str]:
    """Task id -> how often ``event`` (task.succeeded / task.dead) was logged.

    The engine logs an outcome only once the broker accepted it; a refused call is logged as
    ``task.lease_lost`` instead, never as an outcome.
    """
    counts: Counter[str] = Counter()
    for worker in workers:
        for e in worker.events():
            if e.get("event") == event:
                counts[e["task_id"]] += 1
    return counts


def process_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat ("T" once a SIGSTOP took effect)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def write_lock_free(db: Path) -> bool:
    conn = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def freeze_outside_a_write(worker: Worker, db: Path) -> None:
    """SIGSTOP ``worker``, retrying until it is frozen while holding no write lock.

    SQLite cannot get around a process frozen inside a write transaction: every other writer
    waits for it (then fails with BrokerUnavailable). Real freezes can land there too; this
    test is about the lease, so it picks a moment outside one.
    """
    for _ in range(50):
        os.kill(worker.pid, signal.SIGSTOP)
        wait_for(lambda: process_state(worker.pid) == "T", 5, 0.001, what="SIGSTOP took effect")
        if write_lock_free(db):
            return
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.02)
    pytest.fail("the worker always held the write lock when frozen")


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_worker_is_replaced_and_every_task_completes(pipeline: Pipeline) -> None:
    pipeline.configure(visibility=2.0, timeout=1.0, threads=4)
    (victim,) = pipeline.start(1)
    ids = pipeline.publish(500, sleep=0.05)
    wait_for(lambda: completed(pipeline.runs()).total() >= 100, 60, what="100 tasks done")
    wait_for(
        lambda: any(r.pid == victim.pid and r.end is None for r in pipeline.runs()),
        10,
        what="victim running a task",
    )
    victim.kill()
    killed_at = time.time()
    (replacement,) = pipeline.start(1, wait=False)

    runs = pipeline.wait_done(ids, timeout=60)
    held_at_kill = {r.id for r in runs if r.pid == victim.pid and r.end is None}
    rescued = [r for r in runs if r.pid == replacement.pid and r.attempt > 1]
    redelivered = {r.id for r in rescued}
    first_rescue = {i: min(r.start for r in rescued if r.id == i) for i in redelivered}
    recovery = max(first_rescue.values()) - killed_at
    done = pipeline.audit(ids, label="crash")
    duplicates = sorted(i for i, n in done.items() if n > 1)
    print(
        f"killed pid {victim.pid} after {sum(1 for r in runs if r.pid == victim.pid)} runs, "
        f"holding {len(redelivered)} task(s) ({len(held_at_kill)} mid-handler); all running "
        f"again {recovery:.2f}s after the kill (visibility_timeout {pipeline.visibility}s); "
        f"completed twice: {len(duplicates)}"
    )
    assert held_at_kill, "the victim held no running task when it was killed"
    assert held_at_kill <= redelivered  # every interrupted run ran again
    assert all(r.attempt == 2 for r in rescued)  # the killed hand-out counted once
    # Only what the victim held comes back: its running tasks and its prefetch buffer (2 x
    # threads by default). A task can run twice when it ran (or finished, its ack not yet
    # committed) in the victim.
    assert len(redelivered) <= 3 * pipeline.threads
    assert set(duplicates) <= redelivered
    assert recovery < pipeline.visibility + 1.0
    assert overlaps(runs, open_until=killed_at) == []
    assert not pipeline.dead_letters()
    assert replacement.terminate() == 0


@pytest.mark.slow
def test_two_processes_on_one_file_never_overlap_and_outrun_one(pipeline: Pipeline) -> None:
    pipeline.configure(visibility=30.0, timeout=5.0, threads=4)
    (first,) = pipeline.start(1)
    alone_ids = pipeline.publish(160, sleep=0.05)
    published = time.time()
    alone = [r for r in pipeline.wait_done(alone_ids, 60) if r.id in set(alone_ids)]
    alone_rate = len(alone_ids) / (max(r.end or 0.0 for r in alone) - published)

    (second,) = pipeline.start(1)
    both_ids = pipeline.publish(320, sleep=0.05)
    published = time.time()
    both_set = set(both_ids)
    together = [r for r in pipeline.wait_done(both_ids, 60) if r.id in both_set]
    together_rate = len(both_ids) / (max(r.end or 0.0 for r in together) - published)

    runs = pipeline.runs()
    share = Counter(r.pid for r in together)
    print(
        f"\none process: {alone_rate:.0f} tasks/s; two processes: {together_rate:.0f} tasks/s "
        f"(x{together_rate / alone_rate:.2f}); runs per pid with two: {dict(share)}"
    )
    done = pipeline.audit(alone_ids + both_ids, label="two processes")
    assert overlaps(runs) == []  # no task ever ran twice at the same time
    assert set(done.values()) == {1}  # nor twice at all: no lease expired
    assert all(r.attempt == 1 for r in runs)
    assert set(share) == {first.pid, second.pid}
    assert min(share.values()) >= len(both_ids) // 5  # both really took part
    assert together_rate > alone_rate
    assert [first.terminate(), second.terminate()] == [0, 0]


def test_tasks_published_while_no_worker_runs_are_processed_at_start(
    pipeline: Pipeline,
) -> None:
    pipeline.configure(threads=4)
    ids = pipeline.publish(40, sleep=0.01) + pipeline.publish(5, sleep=0.01, fail=1)
    summary = pipeline.tmp_path / "summary.json"

    started = time.monotonic()
    result = run("run", str(pipeline.config), "--until-empty", "--summary-json", str(summary))
    first_run_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    done = pipeline.audit(ids, label="first start")
    totals = json.loads(summary.read_text())["totals"]
    assert totals["succeeded"] == 45 and totals["retried"] == 5  # retries waited for too
    assert set(done.values()) == {1}

    # Again, with a file that has seen a worker come and go.
    later = pipeline.publish(20, sleep=0.01)
    result = run("run", str(pipeline.config), "--until-empty", "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr[-3000:]
    pipeline.audit(ids + later, label="second start")
    assert json.loads(summary.read_text())["totals"]["succeeded"] == 20
    print(f"first --until-empty run (45 tasks, 5 retried) took {first_run_s:.2f}s")


def test_undecodable_rows_go_to_the_dlq_and_the_worker_lives_on(pipeline: Pipeline) -> None:
    pipeline.configure(threads=2)
    ids = pipeline.publish(40, sleep=0.01)
    bad = {
        ids[0]: b"{not json",
        ids[10]: b"\xff\xfe\x00 garbage",
        ids[20]: b"",
        # Valid JSON, but the envelope of another task: it must not run under this row's id.
        ids[30]: encode_task(Task("work", {"audit": str(pipeline.audit_dir)})),
    }
    conn = sqlite3.connect(pipeline.db)
    with conn:
        for task_id, garbage in bad.items():
            conn.execute("UPDATE tasks SET envelope = ? WHERE id = ?", (garbage, task_id))
    conn.close()
    summary = pipeline.tmp_path / "summary.json"

    result = run("run", str(pipeline.config), "--until-empty", "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr[-3000:]
    done = pipeline.audit(ids, label="corrupt rows")
    dead = pipeline.dead_letters()
    assert set(dead) == set(bad)
    assert {r.reason for r in dead.values()} == {"undecodable"}
    assert all("undecodable task envelope" in r.message for r in dead.values())
    assert set(done) == set(ids) - set(bad)
    assert not set(done) & set(bad)  # the foreign envelope never ran
    data = json.loads(summary.read_text())
    assert data["totals"]["dead"] == 4
    assert data["worker_threads"] == {"configured": 2, "alive": 2}
    assert "worker loop error" not in result.stderr


@pytest.mark.slow
def test_a_frozen_workers_late_outcome_is_refused_and_the_task_counted_once(
    pipeline: Pipeline,
) -> None:
    pipeline.configure(visibility=2.0, timeout=1.5, threads=1)
    (frozen,) = pipeline.start(1)
    (task_id,) = pipeline.publish(1, hold_first=1.0, sleep=0.05)
    wait_for(lambda: bool(pipeline.runs()), 10, what="the handler started")
    freeze_outside_a_write(frozen, pipeline.db)
    frozen_at = time.time()
    (rescuer,) = pipeline.start(1)
    others = pipeline.publish(10, sleep=0.02)
    pipeline.wait_done([task_id, *others], 30)
    wait_for(lambda: pipeline.queued() == 0, 10, what="rescuer's acks landed")
    taken_over = next(r.start for r in pipeline.runs() if r.pid == rescuer.pid and r.id == task_id)

    os.kill(frozen.pid, signal.SIGCONT)
    resumed_at = time.time()
    wait_for(
        lambda: any(
            e["task_id"] == task_id and "refused" in str(e.get("detail"))
            for e in frozen.events("task.lease_lost")
        ),
        10,
        what="task.lease_lost in the frozen worker's log",
    )
    # It lives on: new work still reaches both processes.
    after = pipeline.publish(20, sleep=0.05)
    pipeline.wait_done(after, 30)

    ids = [task_id, *others, *after]
    done = pipeline.audit(ids, label="SIGSTOP")
    lost = frozen.events("task.lease_lost")
    print(
        f"frozen {resumed_at - frozen_at:.2f}s; the other worker took the task over "
        f"{taken_over - frozen_at:.2f}s into the freeze; the late worker logged: "
        f"{[e.get('detail') for e in lost]}"
    )
    assert all(e["task_id"] == task_id and e["attempt"] == 1 for e in lost)
    # The late worker's outcome call (ack if the handler beat the watchdog, else the retry
    # of a timed-out attempt) was refused, whichever it was.
    assert any(str(e.get("detail")).split()[0] in ("ack", "retry") for e in lost)
    assert accepted_outcomes(pipeline.workers, "task.succeeded")[task_id] == 1
    assert done[task_id] == 1  # the rescuer's run; the frozen run never returned normally
    accepted = accepted_outcomes(pipeline.workers, "task.succeeded")
    assert all(accepted[i] == 1 for i in ids)
    assert not pipeline.dead_letters()
    assert [frozen.terminate(), rescuer.terminate()] == [0, 0]


@pytest.mark.slow
def test_a_task_that_kills_its_worker_lands_in_the_dlq_after_max_attempts(
    pipeline: Pipeline,
) -> None:
    pipeline.configure(visibility=1.0, timeout=0.5, threads=1, max_attempts=3)
    (killer,) = pipeline.publish(1, suicide=True)
    others = pipeline.publish(10, sleep=0.02)
    deaths = 0
    deadline = time.monotonic() + 60
    while not pipeline.dead_letters():
        assert time.monotonic() < deadline, "the task never reached the DLQ"
        (worker,) = pipeline.start(1, wait=False)  # it may die before it says it started
        while not worker.exited() and not pipeline.dead_letters():
            time.sleep(0.05)
        if worker.exited():
            assert worker.process.returncode == -signal.SIGKILL, worker.log()[-2000:]
            deaths += 1
    survivor = pipeline.workers[-1]
    pipeline.wait_done(others, 30)
    done = pipeline.audit([killer, *others], label="suicidal task")
    (record,) = pipeline.dead_letters().values()
    runs = [r for r in pipeline.runs() if r.id == killer]
    print(f"worker processes killed by the task: {deaths}; its handler runs: {len(runs)}")
    assert record.id == killer
    assert record.reason == "max deliveries"
    assert record.attempts == 4  # handed out a 4th time, found over max_attempts, not run
    assert [r.attempt for r in runs] == [1, 2, 3]
    assert deaths == 3
    assert set(done.values()) == {1}
    assert survivor.terminate() == 0


@pytest.mark.slow
def test_an_ack_blocked_past_the_busy_timeout_is_retried_not_dropped(pipeline: Pipeline) -> None:
    # Another process holds the write lock longer than SQLite's busy timeout (10 s), as a
    # process frozen inside a write transaction would: the worker's ack fails with
    # BrokerUnavailable. Giving up would leave the row leased and run the task again later.
    pipeline.configure(visibility=30.0, timeout=5.0, threads=1)
    (worker,) = pipeline.start(1)
    release = pipeline.tmp_path / "release"
    (task_id,) = pipeline.publish(1, until=str(release))
    wait_for(lambda: bool(pipeline.runs()), 20, what="the handler started")
    blocker = sqlite3.connect(pipeline.db, timeout=5.0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    locked_at = time.monotonic()
    release.touch()  # the handler returns now, its ack meets the lock
    try:
        # Sent by the dispatcher along with a fetch (broker.exchange) or by the settler thread.
        failed = ("broker.exchange failed", "broker settle of 1 task(s) failed")
        wait_for(lambda: any(text in worker.log() for text in failed), 20, 0.1,
                 what="the ack to fail once")  # fmt: skip
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    released_after = time.monotonic() - locked_at
    wait_for(lambda: pipeline.queued() == 0, 10, what="the ack landed after the lock was freed")
    done = pipeline.audit([task_id], label="ack past busy timeout")
    print(f"write lock held {released_after:.2f}s; the ack landed after it was released")
    assert done[task_id] == 1
    assert not worker.events("task.lease_lost"), worker.log()[-2000:]
    assert worker.terminate() == 0
    assert completed(pipeline.runs())[task_id] == 1  # not handed out again
