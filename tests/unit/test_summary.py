"""The Summary listener: exact counts from many emitting threads, readable while they emit."""

from __future__ import annotations

import threading

from runner.events import Event
from runner.summary import Summary


def test_counts_from_many_threads_are_exact_and_readable_meanwhile() -> None:
    summary = Summary()
    per_thread, threads = 5_000, 6
    start = threading.Barrier(threads + 1)

    def emit(n: int) -> None:
        start.wait()
        for i in range(per_thread):
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
    reads = 0
    while any(t.is_alive() for t in workers):  # reading while they write must never raise
        summary.to_json()
        reads += 1
    for t in workers:
        t.join()
    assert reads > 0
    data = summary.to_json()
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
    assert summary.to_json()["by_type"] == {}
