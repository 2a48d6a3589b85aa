"""Schedules fire once per tick across processes (issue 21): three `dq-run run` processes on one
SQLite file or one Redis namespace, a schedule `every: 1s` for 20 s, one process SIGKILLed
midway. The audit compares tick names, not counts: every tick from the first one fired to the
end has exactly one task (one task id, however many runs of it a kill caused), none is missing.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from runner.engine.schedule import tick_name
from tests.integration.audit_handlers import read_ticks
from tests.integration.fleet import Worker, wait_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

CONFIG = """\
version: 1
broker:
{broker}
  visibility_timeout: 3s
workers: 2
task_types:
  tick:
    handler: tests.integration.audit_handlers:tick
    timeout: 1s
schedules:
  beat: {{type: tick, every: 1s, payload: {{audit: "{audit}"}}}}
logging: {{format: json, level: INFO}}
shutdown: {{grace: 2s}}
"""

RUN_S = 20.0
KILL_AT_S = 8.0


def _run_three(tmp_path: Path, broker_yaml: str) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    config = tmp_path / "flow.yaml"
    config.write_text(CONFIG.format(broker=broker_yaml, audit=audit))
    workers = [Worker(config, tmp_path, f"worker-{i}", timeout_s=30) for i in range(3)]
    try:
        for worker in workers:
            worker.wait_started()
        started = time.time()
        time.sleep(KILL_AT_S)
        workers[0].kill()
        time.sleep(RUN_S - KILL_AT_S)
        # Every tick up to a second ago was fired; the killed worker's leased tasks come back
        # when their 3 s lease runs out and are run then.
        cutoff = time.time() - 1.0
        first = min(_ticks_at_or_after(audit, started - 2.0), default=None)
        assert first is not None, "no tick fired:\n" + workers[1].log()[-2000:]
        wanted = [tick_name(t) for t in range(int(first), int(cutoff) + 1)]
        wait_for(
            lambda: set(wanted) <= set(read_ticks(audit)),
            timeout=20,
            interval=0.2,
            what="every tick up to the cutoff recorded",
            fail=False,
        )
    finally:
        for worker in workers[1:]:
            if not worker.exited():
                worker.terminate()
        for worker in workers:
            worker.kill()

    ticks = read_ticks(audit)
    missing = [name for name in wanted if name not in ticks]
    doubled = {name: ids for name, ids in ticks.items() if len(ids) > 1}
    assert missing == [], f"ticks never fired: {missing}"
    assert doubled == {}, f"ticks fired more than once: {doubled}"
    assert started - 2.0 <= first <= started + 3.0, "the first tick fired late"
    winners = [w.name for w in workers if w.events("schedule.fired")]
    assert len(winners) >= 2, f"one process fired every tick ({winners}): no race was tested"


def _ticks_at_or_after(audit: Path, since: float) -> list[float]:
    seconds = [
        datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in read_ticks(audit)
    ]
    return [t for t in seconds if t >= since]


def test_three_sqlite_processes_fire_each_tick_once(tmp_path: Path) -> None:
    _run_three(tmp_path, f"  kind: sqlite\n  path: {tmp_path / 'queue.db'}")


@pytest.mark.redis
def test_three_redis_processes_fire_each_tick_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    namespace = f"sched-{uuid.uuid4().hex[:8]}"
    _run_three(tmp_path, f"  kind: redis\n  url: {redis_server.url}\n  namespace: {namespace}")
