"""A rate limit holds across processes (issue 22): three `dq-run run` processes on one SQLite file
or one Redis namespace, a type limited to 50/s with 30 s of backlog: in every 5 s window after
the first, its starts (audited by the handler, in every process) are at most 250 + burst and at
least 200; a second type alongside runs unthrottled."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from runner.brokers.base import Broker
from runner.brokers.redis.broker import RedisBroker
from runner.brokers.sqlite.broker import SqliteBroker
from runner.model import Task
from tests.integration.audit_handlers import read_runs
from tests.integration.fleet import Worker, wait_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

CONFIG = """\
version: 1
broker:
{broker}
  capacity: 20000
workers: 4
task_types:
  limited:
    handler: tests.integration.audit_handlers:work
    rate_limit: {{rate: 50/s, burst: {burst}}}
  free:
    handler: tests.integration.audit_handlers:work
logging: {{format: json, level: INFO}}
"""

RATE = 50
BURST = 20
WINDOW_S = 5.0
BACKLOG_S = 30.0
FREE_TASKS = 1500


def _run(tmp_path: Path, broker_yaml: str, broker: Broker) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    config = tmp_path / "flow.yaml"
    config.write_text(CONFIG.format(broker=broker_yaml, burst=BURST))
    limited = [Task("limited", {"audit": str(audit)}) for _ in range(int(RATE * BACKLOG_S) + 100)]
    free = [Task("free", {"audit": str(audit)}) for _ in range(FREE_TASKS)]
    for i in range(0, len(limited), 500):
        broker.put_many(limited[i : i + 500])
    workers = [Worker(config, tmp_path, f"worker-{i}", timeout_s=30) for i in range(3)]
    try:
        for worker in workers:
            worker.wait_started()
        broker.put_many(free)  # while the limited backlog is being worked through
        free_ids = {t.id for t in free}
        wait_for(
            lambda: free_ids <= {r.id for r in read_runs(audit) if r.end is not None},
            timeout=60,
            interval=0.2,
            what="every free task ran",
        )
        time.sleep(max(0.0, BACKLOG_S - 5.0))
    finally:
        for worker in workers:
            worker.kill()

    runs = read_runs(audit)
    limited_ids = {t.id for t in limited}
    starts = sorted(r.start for r in runs if r.id in limited_ids)
    free_starts = sorted(r.start for r in runs if r.id in free_ids)
    first = starts[0]
    windows = [
        sum(1 for t in starts if first + k * WINDOW_S <= t < first + (k + 1) * WINDOW_S)
        for k in range(1, int(BACKLOG_S / WINDOW_S) - 1)  # full windows only, after the first
    ]
    per_window = RATE * WINDOW_S
    assert all(200 <= n <= per_window + BURST for n in windows), windows
    assert len({r.pid for r in runs if r.id in limited_ids}) == 3  # all three took a share
    # The free type is not held back: its 1500 tasks ran far faster than 50/s.
    assert free_starts[-1] - free_starts[0] < FREE_TASKS / RATE / 3


def test_a_rate_limit_holds_across_sqlite_processes(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    broker = SqliteBroker(str(path), 20_000, 10.0, "block", 30.0)
    try:
        _run(tmp_path, f"  kind: sqlite\n  path: {path}", broker)
    finally:
        broker.close()


@pytest.mark.redis
def test_a_rate_limit_holds_across_redis_processes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    namespace = f"rate-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(redis_server.url, namespace, 20_000, 10.0, "block", 30.0)
    try:
        yaml = f"  kind: redis\n  url: {redis_server.url}\n  namespace: {namespace}"
        _run(tmp_path, yaml, broker)
    finally:
        broker.close()
