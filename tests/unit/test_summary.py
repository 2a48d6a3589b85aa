"""The Summary listener: exact counts from many emitting threads, readable while they emit."""

from __future__ import annotations

import json
import threading

from runner.events import Event
from runner.observe.summary import Summary


def test_counts_from_many_threads_are_exact_and_readable_meanwhile() -> None:
    summary = Summary()
    per_thread, threads = 5_000, 6
    half = per_thread // 2
    start = threading.Barrier(threads + 1)
    paused = threading.Barrier(threads + 1)  # every emitter half-way, none finished
    resume = threading.Event()

    def emit(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            if i == half:
                paused.wait()
                resume.wait(30)
            type_name = "a" if i % 2 else f"b{n % 2}"
            summary.handle(Event("task.started", task_id=str(i), type=type_name, attempt=1))
            summary.handle(
                Event("task.succeeded", task_id=str(i), type=type_name, attempt=1, duration_s=0.001)
            )
        summary.handle(Event("task.dead", task_id=f"x{n}", type="a", reason="error"))

    workers = [threading.Thread(target=emit, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    start.wait()
    # Half-way, with every emitter's thread alive: a read sees exactly what was emitted so far.
    paused.wait(30)
    middle = summary.to_dict()
    assert middle["totals"]["succeeded"] == threads * half
    assert summary.count("started") == threads * half
    assert middle["totals"]["dead"] == 0
    resume.set()
    # Reads while they write never raise, and each is a sane snapshot: plain data, totals that
    # are the sums of the types, and counts that never go down from one read to the next.
    seen = [middle["totals"]["succeeded"]]
    while any(t.is_alive() for t in workers):
        data = summary.to_dict()
        json.dumps(data)
        by_type = data["by_type"]
        assert data["totals"]["succeeded"] == sum(t["succeeded"] for t in by_type.values())
        seen.append(data["totals"]["succeeded"])
    for t in workers:
        t.join(30)
        assert not t.is_alive()
    assert seen == sorted(seen)
    data = summary.to_dict()
    assert data["totals"]["succeeded"] == threads * per_thread
    assert data["totals"]["dead"] == threads
    assert summary.count("started") == threads * per_thread
    assert data["by_type"]["a"]["succeeded"] == threads * per_thread // 2
    assert data["by_type"]["b0"]["succeeded"] + data["by_type"]["b1"]["succeeded"] == (
        threads * per_thread // 2
    )
    assert data["dead_by_reason"] == {"error": threads}
    assert data["by_type"]["a"]["duration_s"]["max"] == 0.001


def test_events_that_are_not_task_events_are_ignored() -> None:
    summary = Summary()
    summary.handle(Event("worker.started", detail="x"))
    summary.handle(Event("task.started"))  # no type
    assert summary.to_dict()["by_type"] == {}


def test_to_dict_is_named_for_what_it_returns() -> None:
    summary = Summary()
    summary.handle(Event("task.succeeded", task_id="t1", type="a", attempt=1, duration_s=0.01))
    data = summary.to_dict()
    assert isinstance(data, dict)
    assert json.loads(json.dumps(data)) == data  # plain data, ready for json.dumps
    assert not hasattr(summary, "to_json")  # it returned a dict, not JSON text


def test_durations_kept_for_percentiles_are_bounded() -> None:
    """A long-lived worker's summary keeps a bounded sample of durations per type and thread
    (memory must not grow with each task), while the maximum stays exact."""
    from runner.observe import summary as summary_module

    summary = Summary()
    n = summary_module.DURATION_SAMPLES * 5
    for i in range(n):
        summary.handle(Event("task.succeeded", task_id=f"{i:032x}", type="t", attempt=1,
                             duration_s=(i % 1000) / 1000))  # fmt: skip
    _, durations, _ = summary._merged()
    assert len(durations["t"]) == summary_module.DURATION_SAMPLES
    p50 = summary_module.percentile(sorted(durations["t"]), 50)
    assert 0.4 < p50 < 0.6  # a uniform sample of 0.000 .. 0.999
    assert max(durations["t"]) <= 0.999
    assert summary._merged()[2]["t"] == 0.999
    assert summary.to_dict()["by_type"]["t"]["duration_s"]["max"] == 0.999
