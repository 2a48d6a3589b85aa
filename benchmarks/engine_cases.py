"""Workloads run through the shipped engine (runner.app.build_runtime, observe=False).

observe=False means no log handler, metrics server or progress view is attached: per-task log
events are not written, as a production deployment at level WARNING would do. The Summary
listener (always on) and the benchmark's own BenchRecorder listener still see every event.

Each function returns one measurement; run.py repeats them and takes medians.
"""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from baselines import paced

from runner.app import Runner, build_runtime
from runner.codec import encode_task
from runner.config.models import PipelineConfig
from runner.engine.processes import ProcessWorker
from runner.model import Task
from runner.observe.summary import percentile
from runner.ops.bench import BenchRecorder

HERE = Path(__file__).resolve().parent
#: Tasks per publish_many call (what `dq-run run` uses for simulated tasks too).
BATCH = 100
TYPE = "bench"


def make_config(
    kind: str,
    threads: int,
    *,
    handler: str = "noop",
    path: str | None = None,
    url: str | None = None,
    namespace: str = "bench",
    prefetch: int | None = None,
    types: int = 1,
    limits: Sequence[int] = (),
    stages: int = 1,
    execution: str = "thread",
    concurrency: int | None = None,
) -> PipelineConfig:
    """A config whose type TYPE runs ``handler``; ``types - 1`` more types (``idle1`` ...)
    run it too, but the benchmarks publish only TYPE: they stay idle. With ``limits``, the
    types are ``busy1`` ... instead, one per limit, each with that ``concurrency``. With
    ``stages``, TYPE is the first of a pipeline of that many types (``stage2`` ...), each
    starting the next with its ack (``then:``)."""
    broker: dict[str, Any] = {"kind": kind, "capacity": 3_000_000, "visibility_timeout": 60}
    if path is not None:
        broker["path"] = path
    if url is not None:
        broker |= {"url": url, "namespace": namespace}
    type_config: dict[str, Any] = {"handler": f"bench_handlers:{handler}", "timeout": 30}
    if execution != "thread":
        type_config |= {"execution": execution, "concurrency": concurrency}
    names = [TYPE, *(f"idle{i}" for i in range(1, types))]
    task_types: dict[str, Any] = dict.fromkeys(names, type_config)
    if limits:
        task_types = {
            f"busy{i}": {**type_config, "concurrency": n} for i, n in enumerate(limits, 1)
        }
    if stages > 1:
        chain = [TYPE, *(f"stage{i}" for i in range(2, stages + 1))]
        task_types = {
            name: {**type_config, "then": [{"type": nxt}]}
            for name, nxt in itertools.pairwise(chain)
        }
        task_types[chain[-1]] = type_config
    return PipelineConfig.model_validate(
        {
            "broker": broker,
            "workers": threads,
            "prefetch": prefetch,
            "handler_paths": [str(HERE)],
            "task_types": task_types,
            "metrics": {"enabled": False},
            "logging": {"level": "WARNING"},
        }
    )


def _runner(config: PipelineConfig) -> tuple[Runner, BenchRecorder]:
    recorder = BenchRecorder()
    return build_runtime(config, listeners=[recorder], observe=False), recorder


def _quick_stop(runner: Runner, started: bool = True) -> None:
    # Not Runner.stop(): on the memory broker that turns every leftover task into a dead letter,
    # which for a million parked tasks costs more than the benchmark itself. Its side threads
    # stop too, so none is left to run beside the next measurement.
    if started:
        for service in (runner.scheduler, runner.circuit_watch, runner.cancel_watch):
            if service is not None:
                service.stop()
        if runner.presence is not None:
            runner.presence.stop(1.0)
        for worker in runner.workers:
            worker.stop(1.0)
    runner.broker.close()


def _batches(
    n: int, size: int = BATCH, types: Sequence[str] = (TYPE,)
) -> list[list[tuple[str, None]]]:
    """``n`` no-op items in batches of ``size``, the ``types`` taking turns item by item."""
    items = [(types[i % len(types)], None) for i in range(n)]
    return [items[i : i + size] for i in range(0, n, size)]


def publish_rate(config: PipelineConfig, n: int) -> float:
    """Tasks/s put by publish_many (batches of BATCH) with no worker running."""
    runner, _ = _runner(config)
    batches = _batches(n)
    t0 = time.perf_counter()
    for batch in batches:
        runner.publish_many(batch)
    rate = n / (time.perf_counter() - t0)
    _quick_stop(runner, started=False)
    return rate


def publish_per_call_rate(config: PipelineConfig, n: int) -> float:
    """Calls/s of ``Runner.publish`` (one task per call, as a web application enqueues) with
    no worker running."""
    runner, _ = _runner(config)
    publish = runner.publish
    t0 = time.perf_counter()
    for _ in range(n):
        publish(TYPE, None)
    rate = n / (time.perf_counter() - t0)
    _quick_stop(runner, started=False)
    return rate


def end_to_end_per_call_rate(config: PipelineConfig, n: int, timeout: float = 600.0) -> float:
    """Tasks/s from the first publish to the last finish, this process publishing one
    ``publish()`` per task while its workers run (a web application's worker doing both)."""
    runner, recorder = _runner(config)
    recorder.expect(n)
    runner.start()
    publish = runner.publish
    t0 = time.perf_counter()
    for _ in range(n):
        publish(TYPE, None)
    if not recorder.wait_finished(timeout):
        raise RuntimeError(f"only {recorder.total_finished} of {n} tasks finished")
    rate = n / (recorder.last_finish - t0)
    _quick_stop(runner)
    return rate


def end_to_end_bare_producer_rate(
    config: PipelineConfig, url: str, namespace: str, n: int, timeout: float = 600.0
) -> float:
    """The same worker pipeline fed by a bare producer in another process
    (bare_producer.py: the runner's own entry and capacity count, one round trip per task);
    tasks/s from the producer's start to the last finish."""
    return _fed_by_process(config, ["bare_producer.py", url, namespace, TYPE, str(n)], n, timeout)


def end_to_end_producer_process_rate(
    config: PipelineConfig, url: str, namespace: str, n: int, timeout: float = 600.0
) -> float:
    """The same worker pipeline fed by the runner's own ``publish()``, one call per task, from
    another process (runner_producer.py: a web application's process, no worker of its own);
    tasks/s from the producer's start to the last finish."""
    return _fed_by_process(config, ["runner_producer.py", url, namespace, str(n)], n, timeout)


def _fed_by_process(config: PipelineConfig, command: list[str], n: int, timeout: float) -> float:
    """Tasks/s of ``config``'s workers fed by the benchmarks script ``command`` (which prints
    its start time, then publishes ``n`` tasks), from that start to the last finish."""
    runner, recorder = _runner(config)
    recorder.expect(n)
    runner.start()
    producer = subprocess.Popen(
        [sys.executable, str(HERE / command[0]), *command[1:]],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert producer.stdout is not None
        started = float(producer.stdout.readline())  # perf_counter is system-wide on Linux
        if not recorder.wait_finished(timeout):
            raise RuntimeError(f"only {recorder.total_finished} of {n} tasks finished")
    finally:
        producer.wait(timeout=60)
    rate = n / (recorder.last_finish - started)
    _quick_stop(runner)
    return rate


def envelope() -> bytes:
    """The stored envelope of one no-op task of TYPE (what the per-call baselines write)."""
    return encode_task(Task(type=TYPE, payload=None, enqueued_at=time.time()))


def end_to_end_rate(
    config: PipelineConfig, n: int, timeout: float = 600.0, types: Sequence[str] = (TYPE,)
) -> float:
    """Tasks/s from the first publish to the last task finished, workers running throughout
    (the ``types`` take turns)."""
    return n / _seconds_to_finish(config, _batches(n, types=types), n, timeout)


def pipeline_rate(config: PipelineConfig, n: int, stages: int, timeout: float = 600.0) -> float:
    """Tasks/s of every stage together, from the first publish to the last task finished:
    ``n // stages`` roots of a ``stages``-type pipeline (make_config(stages=...)), each
    starting the next stage with its ack."""
    roots = n // stages
    return roots * stages / _seconds_to_finish(config, _batches(roots), roots * stages, timeout)


def async_seconds(n: int, concurrency: int) -> float:
    """Seconds from the first publish to the last of ``n`` tasks of an async type whose handler
    awaits 50 ms (bench_handlers.nap_50ms), ``concurrency`` coroutines in flight, on the memory
    broker."""
    config = make_config("memory", 4, handler="nap_50ms", execution="async",
                         concurrency=concurrency)  # fmt: skip
    return _seconds_to_finish(config, _batches(n), n, 600.0)


def process_rate(handler: str, children: int, n: int) -> float:
    """Tasks/s of ``n`` tasks of a process type running ``handler`` in ``children`` child
    processes, on the memory broker, from the first publish to the last task finished. The
    children are up before the first publish: their start-up is not measured."""
    config = make_config("memory", children, handler=handler, execution="process",
                         concurrency=children)  # fmt: skip
    return n / _seconds_to_finish(config, _batches(n), n, 600.0, ready=_children_up)


def _children_up(runner: Runner, timeout: float = 60.0) -> None:
    """Waits until every child of the runner's process types has said it is ready."""
    pools = [w for w in runner.workers if isinstance(w, ProcessWorker)]
    wanted = sum(sum(w.limits().values()) for w in pools)
    deadline = time.monotonic() + timeout
    while sum(len(w.children()) for w in pools) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {wanted} child processes did not start in {timeout:g}s")
        time.sleep(0.01)


def _seconds_to_finish(
    config: PipelineConfig,
    batches: Sequence[Sequence[tuple[str, None]]],
    n: int,
    timeout: float,
    ready: Callable[[Runner], None] | None = None,
) -> float:
    """Seconds from the first of ``batches`` published (workers running, and ``ready(runner)``
    returned) to the ``n``-th task finished."""
    runner, recorder = _runner(config)
    recorder.expect(n)
    runner.start()
    if ready is not None:
        ready(runner)
    t0 = time.perf_counter()
    for batch in batches:
        runner.publish_many(batch)
    if not recorder.wait_finished(timeout):
        raise RuntimeError(f"only {recorder.total_finished} of {n} tasks finished")
    seconds = recorder.last_finish - t0
    _quick_stop(runner)
    return seconds


def latency(config: PipelineConfig, rate: float, seconds: float) -> tuple[float, float]:
    """(p50, p99) publish -> start in seconds, one task published every 1/rate s."""
    runner, recorder = _runner(config)
    runner.start()
    n = int(rate * seconds)
    recorder.expect(n)
    for _ in paced(n, rate):
        runner.publish(TYPE, None)
    recorder.wait_finished(60.0)
    _quick_stop(runner)
    waits = sorted(recorder.waits[TYPE])
    return percentile(waits, 50), percentile(waits, 99)


def memory_per_task(config: PipelineConfig, n: int) -> float:
    """Bytes of Python heap (tracemalloc) per task queued in the broker, workers stopped."""
    runner, _ = _runner(config)
    batches = _batches(n, 1000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in batches:
            runner.publish_many(batch)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    _quick_stop(runner, started=False)
    return (after - before) / n


def backlog_rates(config: PipelineConfig, backlog: int, k: int, reps: int) -> list[float]:
    """Tasks/s while the queue is kept ``backlog`` deep, measured ``reps`` times over k tasks.

    The queue is filled first, then a producer tops it up so it stays that deep while the
    workers run; each measurement is the time the workers take to finish k more tasks.
    """
    runner, recorder = _runner(config)
    for batch in _batches(backlog, 1000):
        runner.publish_many(batch)
    published = backlog
    runner.start()
    rates = []
    for _ in range(reps):
        start_done = recorder.total_finished  # workers started before: some are done already
        recorder.expect(start_done + k)
        t0 = time.perf_counter()
        while not recorder.wait_finished(0):
            missing = backlog - (published - recorder.total_finished)
            if missing > 0:
                runner.publish_many([(TYPE, None)] * min(missing, 500))
                published += min(missing, 500)
            else:
                time.sleep(0.0005)
        rates.append((recorder.total_finished - start_done) / (time.perf_counter() - t0))
    _quick_stop(runner)
    return rates


def redis_processes_rate(url: str, namespace: str, processes: int, threads: int, n: int) -> float:
    """Tasks/s with ``processes`` worker processes on one Redis; this process only publishes."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "redis_worker.py"), url, namespace, str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("benchmark worker process did not start")
        producer, _ = _runner(make_config("redis", threads, url=url, namespace=namespace))
        t0 = time.perf_counter()
        for batch in _batches(n):
            producer.publish_many(batch)
        while sum(d.total for d in producer.broker.depth().values()) > 0:
            time.sleep(0.005)
        rate = n / (time.perf_counter() - t0)
        producer.broker.close()
        return rate
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
