"""Where a chaos scenario runs: real `dq-run run` workers on a SQLite file or a throwaway Redis.

Built on the integration tests' pieces, imported rather than copied: ``Fleet`` and ``Worker``
(tests/integration/fleet.py) start and stop the worker processes and publish; the audit handler
(tests/integration/audit_handlers.py, through benchmarks/chaos_handlers.py) writes the ledger;
``RedisServer`` (tests/redis_server.py) is a redis-server this process can kill and restart.
Those modules report a timeout with ``pytest.fail``; a scenario catches that like any other error
(``SCENARIO_ERRORS``) and reports the scenario as failed, with the reason.

A world adds what the scenarios read back: accepted outcomes from the workers' JSON logs, the
DLQ, the queue depth, VmRSS per process, and ``settle``: wait until every task is accounted for
or nothing is left to happen.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from chaos_ledger import Outcome

from runner.brokers.base import DeadLetterFilter
from runner.brokers.redis.broker import RedisBroker
from runner.brokers.sqlite.broker import SqliteBroker
from tests.integration.audit_handlers import Run, read_runs
from tests.integration.fleet import Fleet, Worker, wait_for
from tests.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
CAPACITY = 200_000
#: What a scenario reports as "the scenario failed" rather than crashing the whole run:
#: pytest.fail (raised by the fleet's waits) is a BaseException, hence listed here.
SCENARIO_ERRORS: tuple[type[BaseException], ...] = (Exception, pytest.fail.Exception)

_COMMON = """\
version: 1
workers: {threads}
handler_paths: [{handlers}]
retry:
  max_attempts: {max_attempts}
  backoff: {{initial: 50ms, max: 200ms, jitter: 0}}
task_types:
  work:
    handler: chaos_handlers:work
    timeout: {timeout}s
dead_letter: {{kind: broker}}
logging: {{format: json, level: INFO}}
shutdown: {{grace: {grace}s}}
"""

_SQLITE = """\
broker:
  kind: sqlite
  path: {path}
  capacity: {capacity}
  visibility_timeout: {visibility}s
"""

_REDIS = """\
broker:
  kind: redis
  url: {url}
  namespace: {namespace}
  capacity: {capacity}
  visibility_timeout: {visibility}s
"""


def now() -> float:
    return time.time()


def wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true; False once ``timeout`` passed."""
    return wait_for(predicate, timeout, interval, fail=False)


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def outcomes(worker: Worker) -> list[Outcome]:
    """The outcomes ``worker`` logged (each logged only once its broker accepted it)."""
    found = []
    for text in worker.stderr_path.read_text().splitlines():
        if not text.endswith("}") or ('"task.succeeded"' not in text and '"task.dead"' not in text):
            continue  # a line cut by a kill; and a cheap filter (a soak logs 200,000 lines)
        line = json.loads(text)
        if line.get("event") in ("task.succeeded", "task.dead"):
            ts = datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
            found.append(Outcome(line["task_id"], ts, line["event"]))
    return found


def wait_stopped(worker: Worker, timeout: float) -> str | None:
    """After a SIGTERM: a problem (as text) unless ``worker`` exits 0 within ``timeout``."""
    if not wait(worker.exited, timeout, 0.05):
        worker.kill()
        return f"{worker.name} did not exit within {timeout:g}s of SIGTERM (killed)"
    code = worker.process.returncode
    return None if code == 0 else f"{worker.name} exited {code} after SIGTERM"


class World:
    """What every scenario needs from its world, whichever the broker. Mixed into a Fleet."""

    broker_name: str
    publish_batch = 1000
    numbered = False
    poll_s = 0.2
    worker_timeout_s = 30.0

    # Provided by Fleet.
    workers: list[Worker]
    audit_dir: Path
    broker: Any  # a SqliteBroker or RedisBroker: Broker and BrokerAdmin at once

    def runs(self) -> list[Run]:
        return read_runs(self.audit_dir)

    def outcomes(self) -> list[Outcome]:
        return [o for w in self.workers for o in outcomes(w)]

    def dead_ids(self) -> set[str]:
        return {r.id for r in self.broker.dead_letters(DeadLetterFilter())}

    def queued(self) -> int:
        return sum(d.total for d in self.broker.depth().values())

    def accounted(self, ids: list[str]) -> set[str]:
        """The ids that returned from a handler, were acked, or are dead-lettered."""
        done = {r.id for r in self.runs() if r.end is not None}
        done |= {o.id for o in self.outcomes()}
        return (done | self.dead_ids()) & set(ids)

    def settle(
        self, ids: list[str], timeout: float, *, quiet_s: float = 2.0, stall_s: float = 20.0
    ) -> bool:
        """Wait until every id is accounted for and the queue is empty (acks landed).

        Ends early when the queue has stayed empty for ``quiet_s`` (what is missing then is
        gone) or nothing has changed for ``stall_s`` (what is missing then is stuck). True
        only when everything was accounted for or nothing is left in the broker.
        """
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        last: tuple[int, int] = (-1, -1)
        changed = time.monotonic()
        while time.monotonic() < deadline:
            queued, accounted = self.queued(), len(self.accounted(ids))
            if queued == 0 and accounted == len(set(ids)):
                return True
            if (queued, accounted) != last:
                last, changed = (queued, accounted), time.monotonic()
            elif queued and time.monotonic() - changed >= stall_s:
                return False
            if queued:
                empty_since = None
            elif empty_since is None:
                empty_since = time.monotonic()
            elif time.monotonic() - empty_since >= quiet_s:
                return True
            time.sleep(0.25)
        return False

    def stop_all(self, timeout: float) -> list[str]:
        """SIGTERM every live worker at once; the problems (did not exit 0 in time)."""
        live = [w for w in self.workers if not w.exited()]
        for worker in live:
            worker.process.send_signal(signal.SIGTERM)
        problems = [wait_stopped(w, timeout) for w in live]
        return [p for p in problems if p]


class SqliteWorld(World, Fleet[SqliteBroker]):
    """Workers sharing one SQLite file."""

    broker_name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "queue.db"
        super().__init__(tmp_path)

    def config_text(self, **options: Any) -> str:
        return _config(_SQLITE, path=self.db, **options)

    def open_broker(self) -> SqliteBroker:
        return SqliteBroker(str(self.db), CAPACITY, 10.0, "block", self.visibility)


class RedisWorld(World, Fleet[RedisBroker]):
    """Workers sharing a throwaway redis-server that this world owns (and may kill)."""

    broker_name = "redis"

    def __init__(self, tmp_path: Path, *, appendonly: bool = True) -> None:
        directory = tmp_path / "redis"
        directory.mkdir()
        self.server = RedisServer(directory, appendonly=appendonly, appendfsync="always")
        self.server.start()
        self.namespace = f"chaos-{uuid.uuid4().hex[:8]}"
        super().__init__(tmp_path)

    def config_text(self, **options: Any) -> str:
        return _config(_REDIS, url=self.server.url, namespace=self.namespace, **options)

    def open_broker(self) -> RedisBroker:
        return RedisBroker(
            self.server.url, self.namespace, CAPACITY, 10.0, "block", self.visibility
        )

    def close(self) -> None:
        try:
            Fleet.close(self)
        finally:
            self.server.stop()


def _config(
    broker: str,
    *,
    visibility: float,
    timeout: float,
    threads: int,
    max_attempts: int,
    grace: float = 10.0,
    **where: Any,
) -> str:
    return broker.format(capacity=CAPACITY, visibility=visibility, **where) + _COMMON.format(
        threads=threads,
        handlers=json.dumps(str(HERE)),
        max_attempts=max_attempts,
        timeout=timeout,
        grace=grace,
    )


def make_world(broker: str, tmp_path: Path, **options: Any) -> SqliteWorld | RedisWorld:
    if broker == "sqlite":
        return SqliteWorld(tmp_path, **options)
    return RedisWorld(tmp_path, **options)
