"""Real `dq-run run` processes sharing a throwaway Redis: load, crashes, outages, shutdown.

Tasks are published from the test process with RedisBroker.put_many; the handler
(tests/integration/audit_handlers.py) appends a start and an end line per run to an audit
directory, and each test audits those lines: every published task done, none run twice at the
same time, who ran what. Worker logs (JSON lines on stderr) go to files in tmp_path.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner.brokers.base import DeadLetterFilter
from runner.brokers.redis.broker import RedisBroker
from tests.integration.audit_handlers import completed, overlaps
from tests.integration.fleet import Fleet, wait_for
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

CONFIG = """\
version: 1
broker:
  kind: redis
  url: {url}
  namespace: {namespace}
  capacity: 10000
  visibility_timeout: {visibility}s
workers: {threads}
retry:
  max_attempts: {max_attempts}
  backoff: {{initial: 50ms, max: 200ms}}
task_types:
  work:
    handler: tests.integration.audit_handlers:work
    timeout: {timeout}s
    timeout_action: {timeout_action}
logging: {{format: json, level: INFO}}
shutdown: {{grace: {grace}s}}
"""


class Cluster(Fleet[RedisBroker]):
    """One test's world on a Redis server: its namespace, config, audit dir and workers."""

    publish_batch = 500
    numbered = True
    poll_s = 0.2
    worker_timeout_s = 20.0

    def __init__(self, tmp_path: Path, server: RedisServer, namespace: str) -> None:
        self.server = server
        self.namespace = namespace
        super().__init__(tmp_path)

    # Narrower than Fleet.config_text on purpose: an option this config lacks is a TypeError.
    def config_text(  # type: ignore[override]
        self,
        *,
        visibility: float,
        timeout: float,
        threads: int,
        max_attempts: int,
        grace: float = 10.0,
        timeout_action: str = "interrupt",
    ) -> str:
        return CONFIG.format(
            url=self.server.url,
            namespace=self.namespace,
            visibility=visibility,
            threads=threads,
            max_attempts=max_attempts,
            timeout=timeout,
            grace=grace,
            timeout_action=timeout_action,
        )

    def open_broker(self) -> RedisBroker:
        return RedisBroker(self.server.url, self.namespace, 10000, 10.0, "block", self.visibility)


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer, redis_namespace: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, redis_server, redis_namespace)
    yield made
    made.close()


@pytest.fixture
def make_cluster(
    tmp_path: Path, redis_namespace: str
) -> Iterator[Callable[[RedisServer], Cluster]]:
    """A Cluster on a server the test starts itself (to kill it or set options)."""
    made: list[Cluster] = []

    def make(server: RedisServer) -> Cluster:
        made.append(Cluster(tmp_path, server, redis_namespace))
        return made[-1]

    yield make
    for each in made:
        each.close()


def assert_queue_empty(cluster: Cluster) -> None:
    assert sum(d.total for d in cluster.broker.depth().values()) == 0
    assert cluster.broker.dead_letter_count() == 0


def test_three_workers_run_3000_tasks_exactly_once_and_share_the_load(cluster: Cluster) -> None:
    workers = cluster.start(3)
    ids = cluster.publish(3000, sleep=0.002)
    runs = cluster.wait_done(ids, timeout=90)

    assert sorted(r.id for r in runs) == sorted(ids)  # each task ran once, none lost or extra
    assert all(r.end is not None and r.attempt == 1 for r in runs)
    assert overlaps(runs) == []
    share = Counter(r.pid for r in runs)
    print(f"\nruns per worker pid: {dict(share)}")
    assert set(share) == {w.pid for w in workers}
    assert min(share.values()) >= 300  # each ran at least 10%
    wait_for(lambda: sum(d.total for d in cluster.broker.depth().values()) == 0, 10)
    assert_queue_empty(cluster)
    assert [w.terminate() for w in workers] == [0, 0, 0]


@pytest.mark.slow
def test_sigkilled_worker_tasks_finish_elsewhere_within_the_visibility_timeout(
    cluster: Cluster,
) -> None:
    cluster.configure(visibility=2.0, timeout=1.0, threads=4)
    victim, *survivors = cluster.start(3)
    ids = cluster.publish(300, sleep=0.1)
    wait_for(lambda: completed(cluster.runs()).total() >= 30, 30)
    wait_for(lambda: any(r.pid == victim.pid and r.end is None for r in cluster.runs()), 10)
    victim.kill()
    killed_at = time.time()

    runs = cluster.wait_done(ids, timeout=60)
    orphans = {r.id for r in runs if r.pid == victim.pid and r.end is None}
    assert orphans  # the victim held deliveries when it died
    rescued = [r for r in runs if r.id in orphans and r.pid != victim.pid and r.end is not None]
    recovery = max(r.end for r in rescued if r.end is not None) - killed_at
    done = completed(runs)
    duplicates = sorted(i for i, n in done.items() if n > 1)
    print(
        f"\nkilled pid {victim.pid} holding {len(orphans)} running task(s); "
        f"recovered {recovery:.2f}s after the kill (visibility_timeout {cluster.visibility}s); "
        f"tasks completed twice: {len(duplicates)}"
    )
    assert set(done) == set(ids)
    assert {r.id for r in rescued} == orphans
    assert recovery < cluster.visibility + 2.0
    assert all(r.attempt == 2 for r in rescued)  # the killed hand-out counted
    # A task completed twice only if the victim finished it but died before its ack landed.
    assert len(duplicates) <= cluster.threads
    assert overlaps(runs, open_until=killed_at) == []
    wait_for(lambda: sum(d.total for d in cluster.broker.depth().values()) == 0, 10)
    assert_queue_empty(cluster)
    assert [w.terminate() for w in survivors] == [0, 0]


@pytest.mark.slow
def test_redis_killed_and_restarted_mid_run_workers_reconnect_and_lose_nothing(
    redis_server_factory: Callable[..., RedisServer], make_cluster: Callable[..., Cluster]
) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    cluster = make_cluster(server)
    cluster.configure(visibility=3.0, timeout=2.0, threads=4)
    workers = cluster.start(2)
    ids = cluster.publish(400, sleep=0.02)
    wait_for(lambda: completed(cluster.runs()).total() >= 60, 30)
    server.kill()
    killed_at = time.time()
    before = cluster.runs()
    in_flight = sum(1 for r in before if r.end is None)
    # An outage the workers must notice, not a blip: it lasts until each one logged it.
    wait_for(
        lambda: all(w.events("broker.reconnecting") for w in workers),
        20,
        what="every worker reconnecting",
    )
    server.start()
    outage = time.time() - killed_at

    runs = cluster.wait_done(ids, timeout=60)
    done = completed(runs)
    duplicates = sorted(i for i, n in done.items() if n > 1)
    print(
        f"\nredis down for {outage:.2f}s; handlers running at the kill: {in_flight}; "
        f"tasks completed twice: {len(duplicates)}"
    )
    assert set(done) == set(ids)
    for worker in workers:
        assert worker.events("broker.reconnecting"), worker.log()[-2000:]
    # Only deliveries held at the kill can run twice: at most every thread of every worker.
    assert len(duplicates) <= cluster.threads * len(workers)
    assert overlaps(runs, open_until=killed_at + 1.0) == []
    wait_for(lambda: sum(d.total for d in cluster.broker.depth().values()) == 0, 15)
    assert_queue_empty(cluster)
    assert [w.terminate() for w in workers] == [0, 0]


@pytest.mark.slow
def test_idle_worker_process_gets_a_task_promptly_after_every_timeout_passed(
    redis_server_factory: Callable[..., RedisServer], make_cluster: Callable[..., Cluster]
) -> None:
    # The server also drops clients idle for 3 s, as managed Redis services often do.
    server = redis_server_factory(options={"timeout": "3"})
    cluster = make_cluster(server)
    (worker,) = cluster.start(1)
    cluster.wait_done(cluster.publish(5), timeout=10)  # warm every pooled connection
    # Longer than socket_timeout (10 s), socket_connect_timeout (5 s), health_check_interval
    # (15 s) and the server's idle timeout (3 s).
    time.sleep(16.0)
    assert not worker.exited()
    published_at = time.time()
    (task_id,) = cluster.publish(1)
    runs = cluster.wait_done([task_id], timeout=10)
    started = next(r.start for r in runs if r.id == task_id)
    print(f"\nidle worker started the task {started - published_at:.3f}s after its publish")
    assert started - published_at < 2.0  # nominally one 0.1 s poll slice
    assert worker.terminate() == 0


@pytest.mark.slow
def test_task_that_kills_its_worker_reaches_the_dlq_after_max_attempts(cluster: Cluster) -> None:
    cluster.configure(visibility=2.0, timeout=1.0, threads=1, max_attempts=3)
    (task_id,) = cluster.publish(1, suicide=True)
    deaths = 0
    deadline = time.monotonic() + 60
    while not cluster.broker.dead_letter_count():
        assert time.monotonic() < deadline, "the task never reached the DLQ"
        (worker,) = cluster.start(1, wait=False)  # it may die before it says it started
        while not worker.exited() and not cluster.broker.dead_letter_count():
            time.sleep(0.05)
        if worker.exited():
            assert worker.process.returncode == -signal.SIGKILL, worker.log()[-2000:]
            deaths += 1
    (record,) = cluster.broker.dead_letters(DeadLetterFilter())
    runs = cluster.runs()
    print(f"\nworker processes killed by the task: {deaths}; handler runs: {len(runs)}")
    assert record.id == task_id
    assert record.reason == "max deliveries"
    assert record.attempts == 4  # handed out a 4th time, found over max_attempts, not run
    assert [r.attempt for r in runs] == [1, 2, 3]
    assert deaths == 3
    assert sum(d.total for d in cluster.broker.depth().values()) == 0
    survivor = cluster.workers[-1]
    assert survivor.terminate() == 0


@pytest.mark.slow
@pytest.mark.parametrize("timeout_action", ["interrupt", "cancel"])
def test_sigterm_hands_held_tasks_back_at_once(cluster: Cluster, timeout_action: str) -> None:
    # visibility_timeout 30 s: a task only comes back sooner if it was released. The engine
    # never fetches more than its idle threads can start, so what a stopping worker holds is
    # its running tasks (plus any fetched in the instant of the signal): past the grace period
    # they are cut short (interrupted, or only ctx.cancelled under timeout_action: cancel)
    # and must go back at once, attempt given back, not retried or left to expire.
    cluster.configure(
        visibility=30.0, timeout=20.0, threads=2, grace=0.5, timeout_action=timeout_action
    )
    (leaving,) = cluster.start(1)
    ids = cluster.publish(2, sleep=15.0)
    wait_for(lambda: len(cluster.runs()) == 2, 10)
    (staying,) = cluster.start(1)
    stopped_at = time.time()
    assert leaving.terminate() == 0
    wait_for(lambda: len(cluster.runs()) == 4, 10)
    runs = cluster.runs()
    moved = [r for r in runs if r.pid == staying.pid]
    picked_up = max(r.start for r in moved) - stopped_at
    print(f"\nreleased tasks started on the other worker {picked_up:.2f}s after SIGTERM")
    assert sorted(r.id for r in moved) == sorted(ids)
    assert all(r.end is None for r in runs if r.pid == leaving.pid)  # interrupted at grace
    assert [r.attempt for r in moved] == [1, 1]  # a release gives the attempt back
    assert picked_up < 5.0  # far below visibility_timeout (30 s)
    staying.kill()
