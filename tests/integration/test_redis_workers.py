"""Real `dq-run run` processes sharing a throwaway Redis: load, crashes, outages, shutdown.

Tasks are published from the test process with RedisBroker.put_many; the handler
(tests/integration/redis_handlers.py) appends a start and an end line per run to an audit
directory, and each test audits those lines: every published task done, none run twice at the
same time, who ran what. Worker logs (JSON lines on stderr) go to files in tmp_path.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.brokers.base import DeadLetterFilter
from runner.brokers.redis import RedisBroker
from runner.task import Task
from tests.cli.run_kit import DQ_RUN, REPO, dq_env
from tests.integration.redis_handlers import Run, completed, overlaps, read_runs
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
    handler: tests.integration.redis_handlers:work
    timeout: {timeout}s
    timeout_action: {timeout_action}
logging: {{format: json, level: INFO}}
shutdown: {{grace: {grace}s}}
"""


class Worker:
    """One `dq-run run CONFIG` process; its stdout and stderr go to files."""

    def __init__(self, config: Path, logs: Path, name: str) -> None:
        self.stderr_path = logs / f"{name}.err"
        self.stdout_path = logs / f"{name}.out"
        with self.stderr_path.open("w") as err, self.stdout_path.open("w") as out:
            self.process = subprocess.Popen(
                [DQ_RUN, "run", str(config)], cwd=REPO, env=dq_env(), stdout=out, stderr=err
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.stderr_path.read_text()

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(t) for t in self.log().splitlines() if t.startswith("{"))
        return [line for line in lines if line.get("event") == name]

    def wait_started(self, timeout: float = 20.0) -> None:
        wait_for(lambda: bool(self.events("worker.started")) or self.exited(), timeout)
        assert not self.exited(), f"worker exited early:\n{self.log()[-3000:]}"

    def exited(self) -> bool:
        return self.process.poll() is not None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit code after a graceful stop."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if not self.exited():
            self.process.kill()
            self.process.wait(timeout=10)


class Cluster:
    """Everything one test runs: a config, an audit dir, workers, and a publishing broker."""

    def __init__(self, tmp_path: Path, server: RedisServer, namespace: str) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.namespace = namespace
        self.audit = tmp_path / "audit"
        self.audit.mkdir()
        self.workers: list[Worker] = []
        self.config = tmp_path / "pipeline.yaml"
        self.configure()
        self._broker: RedisBroker | None = None

    def configure(
        self,
        *,
        visibility: float = 30.0,
        timeout: float = 10.0,
        threads: int = 4,
        max_attempts: int = 3,
        grace: float = 10.0,
        timeout_action: str = "interrupt",
    ) -> None:
        self.visibility = visibility
        self.threads = threads
        self.config.write_text(
            CONFIG.format(
                url=self.server.url,
                namespace=self.namespace,
                visibility=visibility,
                threads=threads,
                max_attempts=max_attempts,
                timeout=timeout,
                grace=grace,
                timeout_action=timeout_action,
            )
        )

    @property
    def broker(self) -> RedisBroker:
        if self._broker is None:
            self._broker = RedisBroker(
                self.server.url, self.namespace, 10000, 10.0, "block", self.visibility
            )
        return self._broker

    def start(self, count: int = 1, *, wait: bool = True) -> list[Worker]:
        new = [
            Worker(self.config, self.tmp_path, f"worker-{len(self.workers) + i}")
            for i in range(count)
        ]
        self.workers += new
        for worker in new if wait else ():
            worker.wait_started()
        return new

    def publish(self, count: int, **payload: Any) -> list[str]:
        tasks = [Task("work", {"audit": str(self.audit), "n": i, **payload}) for i in range(count)]
        for i in range(0, len(tasks), 500):
            self.broker.put_many(tasks[i : i + 500])
        return [t.id for t in tasks]

    def wait_done(self, ids: list[str], timeout: float) -> list[Run]:
        """Wait until every id has a completed run; returns all runs recorded."""
        wanted = set(ids)
        runs: list[Run] = []

        def done() -> bool:
            nonlocal runs
            runs = read_runs(self.audit)
            return wanted <= set(completed(runs))

        if not wait_for(done, timeout, interval=0.2, fail=False):
            missing = wanted - set(completed(runs))
            logs = "\n".join(w.log()[-1500:] for w in self.workers)
            pytest.fail(f"{len(missing)} of {len(wanted)} tasks never completed\n{logs}")
        return runs

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        if self._broker is not None:
            self._broker.close()


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


def wait_for(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.05, *, fail: bool = True
) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            if fail:
                pytest.fail(f"condition not met within {timeout}s")
            return False
        time.sleep(interval)
    return True


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
    wait_for(lambda: completed(read_runs(cluster.audit)).total() >= 30, 30)
    wait_for(
        lambda: any(r.pid == victim.pid and r.end is None for r in read_runs(cluster.audit)), 10
    )
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
    wait_for(lambda: completed(read_runs(cluster.audit)).total() >= 60, 30)
    server.kill()
    killed_at = time.time()
    before = read_runs(cluster.audit)
    in_flight = sum(1 for r in before if r.end is None)
    time.sleep(0.5)  # an outage the workers must notice, not a blip
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
    runs = read_runs(cluster.audit)
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
    wait_for(lambda: len(read_runs(cluster.audit)) == 2, 10)
    (staying,) = cluster.start(1)
    stopped_at = time.time()
    assert leaving.terminate() == 0
    wait_for(lambda: len(read_runs(cluster.audit)) == 4, 10)
    runs = read_runs(cluster.audit)
    moved = [r for r in runs if r.pid == staying.pid]
    picked_up = max(r.start for r in moved) - stopped_at
    print(f"\nreleased tasks started on the other worker {picked_up:.2f}s after SIGTERM")
    assert sorted(r.id for r in moved) == sorted(ids)
    assert all(r.end is None for r in runs if r.pid == leaving.pid)  # interrupted at grace
    assert [r.attempt for r in moved] == [1, 1]  # a release gives the attempt back
    assert picked_up < 5.0  # far below visibility_timeout (30 s)
    staying.kill()
