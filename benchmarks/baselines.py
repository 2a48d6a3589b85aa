"""The in-run baselines every engine figure is divided by.

A: concurrent.futures.ThreadPoolExecutor with the same thread count, the same callables
   submitted in a loop (the floor cost of handing work to threads in this interpreter).
B: a bare redis-py loop on the same Redis with the same threads: one producer XADDs in
   pipelined batches, each consumer thread XREADGROUP COUNT 10, runs the callable and XACKs
   the batch in one pipeline. No leases, capacity, retries or fencing: the floor cost of
   moving work through Redis streams from Python.

Per-call publishing (how a web application enqueues: one call per request) is compared with
the bare loop of one call per task on the same store: one XADD per call (a round trip each) on
Redis, one ``queue.Queue.put`` in-process for memory, one INSERT transaction per call on a
SQLite file in WAL mode with ``synchronous=NORMAL`` (the runner's own settings). Each writes an
entry the size of the runner's envelope for the same task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis

from runner.observe.summary import percentile

Job = Callable[[Any, Any], None]
_GROUP = "g"
_READ_COUNT = 10
_BATCH = 100


def pool_rate(job: Job, threads: int, n: int) -> tuple[float, float]:
    """(submit rate, end-to-end rate) in tasks/s for n jobs on a ThreadPoolExecutor."""
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(job, None, None) for _ in range(n)]
        submitted = time.perf_counter()
        cf.wait(futures)
        done = time.perf_counter()
    return n / (submitted - t0), n / (done - t0)


def pool_latency(threads: int, rate: float, seconds: float) -> tuple[float, float]:
    """(p50, p99) seconds from submit to start, one no-op submitted every 1/rate s."""
    waits: list[float] = []

    def job(submitted: float) -> None:
        waits.append(time.perf_counter() - submitted)

    n = int(rate * seconds)
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(job, time.perf_counter())
    waits.sort()
    return percentile(waits, 50), percentile(waits, 99)


class _BareRedis:
    """One stream and consumer group, `threads` consumers; counts what they finish."""

    def __init__(self, url: str, threads: int, job: Job) -> None:
        self.url = url
        self.job = job
        self.stream = f"bare:{uuid.uuid4().hex}"
        self.client = redis.Redis.from_url(url, protocol=2)
        self.client.xgroup_create(self.stream, _GROUP, id="0", mkstream=True)
        self.lock = threading.Lock()
        self.finished = 0
        self.target = 0
        self.last_finish = 0.0
        self.waits: list[float] = []
        self.all_done = threading.Event()
        self.stop = threading.Event()
        self.consumers = [
            threading.Thread(target=self._consume, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self, target: int) -> None:
        self.target = target
        for t in self.consumers:
            t.start()

    def _consume(self, i: int) -> None:
        client = redis.Redis.from_url(self.url, protocol=2)
        while not self.stop.is_set():
            reply = client.xreadgroup(
                _GROUP, f"c{i}", {self.stream: ">"}, count=_READ_COUNT, block=100
            )
            if not reply:
                continue
            ids = []
            waits = []
            for _, entries in reply:
                for entry_id, fields in entries:
                    waits.append(time.time() - float(json.loads(fields[b"t"])["ts"]))
                    self.job(fields, None)
                    ids.append(entry_id)
            pipe = client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xack(self.stream, _GROUP, entry_id)
            pipe.execute()
            with self.lock:
                self.finished += len(ids)
                self.waits.extend(waits)
                self.last_finish = time.perf_counter()
                if self.finished >= self.target:
                    self.all_done.set()
        client.close()

    def publish(self, count: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _ in range(count):
            pipe.xadd(self.stream, {"t": json.dumps({"ts": time.time(), "payload": None})})
        pipe.execute()

    def close(self) -> None:
        self.stop.set()
        for t in self.consumers:
            t.join(timeout=5)
        self.client.delete(self.stream)
        self.client.close()


def bare_redis_rate(url: str, job: Job, threads: int, n: int) -> tuple[float, float]:
    """(publish rate, end-to-end rate) in tasks/s through the bare redis-py loop."""
    bare = _BareRedis(url, threads, job)
    n = (n // _BATCH) * _BATCH
    bare.start(n)
    t0 = time.perf_counter()
    for _ in range(n // _BATCH):
        bare.publish(_BATCH)
    published = time.perf_counter()
    if not bare.all_done.wait(600):
        raise RuntimeError("bare redis baseline did not finish")
    rates = n / (published - t0), n / (bare.last_finish - t0)
    bare.close()
    return rates


def paced(n: int, rate: float) -> Iterator[int]:
    """0 .. n-1, each yielded at its slot on a steady ``rate`` per second from the first."""
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i


def bare_redis_latency(url: str, threads: int, rate: float, seconds: float) -> tuple[float, float]:
    """(p50, p99) seconds XADD -> consumer start, one entry every 1/rate s."""
    bare = _BareRedis(url, threads, lambda payload, ctx: None)
    n = int(rate * seconds)
    bare.start(n)
    for _ in paced(n, rate):
        bare.publish(1)
    bare.all_done.wait(60)
    bare.close()
    waits = sorted(bare.waits)
    return percentile(waits, 50), percentile(waits, 99)


def bare_redis_publish_per_call(url: str, n: int, envelope: bytes) -> float:
    """Calls/s of one XADD per call (one round trip each) of an ``envelope``-sized entry."""
    client = redis.Redis.from_url(url, protocol=2)
    stream = f"bare:{uuid.uuid4().hex}"
    t0 = time.perf_counter()
    for _ in range(n):
        client.xadd(stream, {"a": "0", "t": envelope})
    rate = n / (time.perf_counter() - t0)
    client.delete(stream)
    client.close()
    return rate


def queue_put_per_call(n: int, envelope: bytes) -> float:
    """Calls/s of one ``queue.Queue.put`` per call (of the envelope the runner would store)."""
    q: queue.Queue[bytes] = queue.Queue()
    t0 = time.perf_counter()
    for _ in range(n):
        q.put(envelope)
    return n / (time.perf_counter() - t0)


def sqlite_insert_per_call(path: str, n: int, envelope: bytes) -> float:
    """Calls/s of one INSERT transaction per call on a WAL file, ``synchronous=NORMAL``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS bare (seq INTEGER PRIMARY KEY, body BLOB)")
    t0 = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO bare (body) VALUES (?)", (envelope,))
        conn.execute("COMMIT")
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def asyncio_gather_seconds(n: int, concurrency: int, nap_s: float) -> float:
    """Seconds for ``asyncio.gather`` of ``n`` coroutines that each await ``nap_s``, at most
    ``concurrency`` at once (a semaphore): the async execution mode's baseline."""

    async def main() -> float:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                await asyncio.sleep(nap_s)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0

    return asyncio.run(main())
