"""A circuit breaker holds across processes (issue 22): two `dq-run run` processes on one SQLite
file, a handler failing every call until its downstream "recovers": while it fails, attempts
started in both processes together stay within min_calls + in flight + half_open_calls per
reopening; nothing is dead-lettered for the open circuit; after recovery every task succeeds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runner.brokers.base import DeadLetterFilter
from runner.brokers.sqlite.broker import SqliteBroker
from runner.model import Task
from tests.integration.audit_handlers import completed, read_runs
from tests.integration.fleet import Worker, wait_for

pytestmark = pytest.mark.slow

CONFIG = """\
version: 1
broker: {{kind: sqlite, path: {db}}}
workers: 2
prefetch: 0
retry: {{max_attempts: 1000, backoff: {{initial: 10ms, max: 20ms}}}}
task_types:
  call:
    handler: tests.integration.audit_handlers:fail_until
    circuit_breaker: {{failure_rate: 0.5, min_calls: 5, window: 10s, open_for: 1s,
                      half_open_calls: 1}}
logging: {{format: json, level: INFO}}
"""

FAILING_S = 6.0


def test_two_processes_share_one_circuit(tmp_path: Path) -> None:
    audit, marker, db = tmp_path / "audit", tmp_path / "recovered", tmp_path / "q.db"
    audit.mkdir()
    config = tmp_path / "pipeline.yaml"
    config.write_text(CONFIG.format(db=db))
    payload = {"audit": str(audit), "until": str(marker)}
    tasks = [Task("call", payload) for _ in range(30)]
    with SqliteBroker(str(db), 1000, 5.0, "block", 30.0) as broker:
        broker.put_many(tasks)
    workers = [Worker(config, tmp_path, f"worker-{i}", timeout_s=30) for i in range(2)]
    try:
        for worker in workers:
            worker.wait_started()
        began = time.time()
        time.sleep(FAILING_S)
        failing = [r for r in read_runs(audit) if r.start < began + FAILING_S]
        marker.touch()
        wanted = {t.id for t in tasks}
        wait_for(
            lambda: wanted <= set(completed(read_runs(audit))),
            timeout=60,
            interval=0.2,
            what="every task succeeded after the recovery",
        )
    finally:
        for worker in workers:
            worker.kill()
    elapsed = FAILING_S + 1.0  # from the first start, which may precede `began` a little
    reopenings = elapsed / 1.0 + 1
    in_flight = 2 * 2  # two processes, two threads each, nothing prefetched
    assert len(failing) <= 5 + in_flight + 1 * reopenings, len(failing)
    assert len({r.pid for r in read_runs(audit)}) == 2  # both processes ran tasks
    opened = sum(len(w.events("circuit.opened")) for w in workers)
    assert opened >= 1
    with SqliteBroker(str(db), 1000, 5.0, "block", 30.0) as broker:
        assert broker.dead_letters(DeadLetterFilter()) == []
