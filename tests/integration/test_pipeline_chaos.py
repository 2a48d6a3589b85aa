"""Pipeline hand-offs are exactly once under SIGKILL (issue 23): 200 roots through fetch (fan-out
10) -> resize -> join report, on SQLite and on Redis, with three `dq-run run` processes of which
one is SIGKILLed at random every second (and replaced) while they work.

The audit reads what the handlers recorded and what the broker kept:
- every root has exactly one report task, and it was put once: the attempts of each task's runs
  only go up (a second put of an acked task would start again at attempt 1), for every task;
- every (parent, index) of a fan-out names exactly one resize task, and each root has all 10;
- nothing is lost: every report ran to its end with its 10 values in order, the broker holds no
  task and no dead letter, and each report's trace line says succeeded.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from runner.backends import create_broker
from runner.brokers.base import DeadLetterFilter
from runner.config.load import load_config
from runner.engine.handoff import TRACE_PREFIX
from runner.model import Task
from tests.integration.fleet import Worker, wait_for
from tests.integration.pipeline_handlers import FANOUT, read_lines
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

ROOTS = 200
KILL_FOR_S = 20.0  # kills stop after this long, and the rest is left to finish

CONFIG = """\
version: 1
broker:
{broker}
  capacity: 100000
  visibility_timeout: 2s
workers: 4
retry: {{max_attempts: 50, backoff: {{initial: 10ms, max: 100ms}}}}
task_types:
  fetch:
    handler: tests.integration.pipeline_handlers:fetch
    timeout: 1s
    then: [{{type: resize, each: items}}]
  resize:
    handler: tests.integration.pipeline_handlers:resize
    timeout: 1s
    then: [{{type: report, join: true}}]
  report:
    handler: tests.integration.pipeline_handlers:report
    timeout: 1s
dead_letter: {{kind: broker}}
logging: {{format: json, level: WARNING}}
shutdown: {{grace: 2s}}
"""


def _chaos(tmp_path: Path, broker_yaml: str) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    path = tmp_path / "pipeline.yaml"
    path.write_text(CONFIG.format(broker=broker_yaml))
    config = load_config(path, environ={})
    broker = create_broker(config)
    rng = random.Random(23)
    workers: list[Worker] = []
    kills = 0
    try:
        roots = [
            Task("fetch", {"audit": str(audit), "n": n}, enqueued_at=time.time())
            for n in range(ROOTS)
        ]
        broker.put_many(roots)
        workers = [Worker(path, tmp_path, f"w{i}", timeout_s=30) for i in range(3)]
        started = time.monotonic()
        while time.monotonic() - started < KILL_FOR_S and not _all_reported(audit):
            time.sleep(1.0)
            alive = [w for w in workers if not w.exited()]
            victim = rng.choice(alive)
            victim.kill()
            kills += 1
            workers.append(Worker(path, tmp_path, f"w{len(workers)}", timeout_s=30))
        wait_for(lambda: _all_reported(audit), timeout=120, interval=0.5, what="every report")
        wait_for(
            lambda: sum(d.total for d in broker.depth().values()) == 0,
            timeout=30,
            interval=0.2,
            what="an empty queue",
        )
        dead = broker.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
        traces = broker.scan_values(TRACE_PREFIX)
    finally:
        for worker in workers:
            worker.kill()
        broker.close()

    assert kills >= 5, f"only {kills} kills: the pipeline finished before the chaos"
    assert dead == [], f"dead letters: {[(r.task.type, r.reason, r.message) for r in dead]}"
    lines = read_lines(audit)
    root_ids = {r.id: r.payload["n"] for r in roots}

    # Each task was put once: its runs' attempts only go up.
    attempts: dict[str, list[int]] = defaultdict(list)
    for line in lines:
        attempts[line["id"]].append(line["attempt"])
    reput = {i: a for i, a in attempts.items() if a != sorted(set(a))}
    assert reput == {}, f"tasks put again after they ran (attempts restarted): {reput}"

    # Every (parent, index) names one resize task; each root has all of its resizes.
    by_place: dict[tuple[str, int], set[str]] = defaultdict(set)
    for line in lines:
        if line["type"] == "resize":
            assert line["root_id"] == line["parent_id"] in root_ids
            by_place[(line["parent_id"], line["fanout"][1])].add(line["id"])
    assert all(len(ids) == 1 for ids in by_place.values()), "a fan-out index with two tasks"
    assert len(by_place) == ROOTS * FANOUT

    # One report per root, put once, with its 10 values in order.
    reports: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        if line["type"] == "report":
            reports[line["root_id"]].add(line["id"])
            n = root_ids[line["root_id"]]
            assert line["values"] == [f"{n}:{i}" for i in range(FANOUT)]
    assert set(reports) == set(root_ids)
    assert all(len(ids) == 1 for ids in reports.values()), "a root with two report tasks"
    for root, (report_id,) in reports.items():
        trace = traces.get(f"{TRACE_PREFIX}{root}:{report_id}")
        assert trace is not None and json.loads(trace)["state"] == "succeeded", (root, trace)


def _all_reported(audit: Path) -> bool:
    return len({line["root_id"] for line in read_lines(audit) if line["type"] == "report"}) == (
        ROOTS
    )


def test_sqlite_pipeline_hand_offs_survive_sigkills(tmp_path: Path) -> None:
    _chaos(tmp_path, f"  kind: sqlite\n  path: {tmp_path / 'queue.db'}")


@pytest.mark.redis
def test_redis_pipeline_hand_offs_survive_sigkills(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    namespace = f"chaos-{uuid.uuid4().hex[:8]}"
    _chaos(tmp_path, f"  kind: redis\n  url: {redis_server.url}\n  namespace: {namespace}")
