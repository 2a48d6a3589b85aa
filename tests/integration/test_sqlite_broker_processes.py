"""SqliteBroker shared by real processes: exclusive claims, and recovery from a killed worker."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

from runner.brokers.sqlite.broker import SqliteBroker
from runner.model import Task

# A consumer process: prints "ready", then claims, "works" ~1 ms per task, acks, and prints
# each task id it acked; stops once the queue is empty after the file named by its second
# argument exists (the producer has put everything). Not after a quiet spell: on a loaded
# machine the producer can be that slow to start.
CONSUMER = """
import sys
import time
from pathlib import Path
from runner.brokers.sqlite.broker import SqliteBroker
broker = SqliteBroker(sys.argv[1], 10_000, 5.0, "block", 60.0)
all_put = Path(sys.argv[2])
print("ready", flush=True)
while True:
    put_before = all_put.exists()  # looked at first: nothing is put after it appears
    got = broker.get({"a": 4, "b": 4}, 6, 0.1)
    if not got:
        if put_before:
            break
        continue
    for delivery in got:
        time.sleep(0.001)
        assert broker.ack(delivery), delivery
        print(delivery.task.id, delivery.task.attempt, flush=True)
broker.close()
"""

# Claims one task and dies without acking it (os._exit skips every cleanup, like SIGKILL).
CRASHER = """
import os, sys
from runner.brokers.sqlite.broker import SqliteBroker
broker = SqliteBroker(sys.argv[1], 10_000, 5.0, "block", float(sys.argv[2]))
(delivery,) = broker.get({"a": 1}, 1, 5.0)
print(delivery.task.id, delivery.receipt, flush=True)
os._exit(9)
"""


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_two_processes_consume_every_task_exactly_once(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    all_put = tmp_path / "all-put"
    producer = SqliteBroker(path, 10_000, 5.0, "block", 60.0)
    consumers = [spawn(CONSUMER, path, str(all_put)) for _ in range(2)]
    try:
        for proc in consumers:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
        tasks = [Task("a" if i % 3 else "b", i) for i in range(600)]
        for i in range(0, len(tasks), 50):
            producer.put_many(tasks[i : i + 50])
        all_put.touch()
        outputs = [proc.communicate(timeout=60) for proc in consumers]
    finally:
        for proc in consumers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(consumers, outputs, strict=True):
        assert proc.returncode == 0, err
    per_process = [[line.split() for line in out.splitlines()] for out, _ in outputs]
    acked = collections.Counter(task_id for lines in per_process for task_id, _ in lines)
    assert set(acked) == {t.id for t in tasks}
    assert max(acked.values()) == 1  # never handed out twice (the lease never expired)
    assert all(attempt == "1" for lines in per_process for _, attempt in lines)
    assert all(len(lines) > 0 for lines in per_process), "both processes must have claimed"
    assert producer.depth() == {}
    producer.close()


def test_a_killed_workers_task_is_redelivered_after_its_lease(tmp_path: Path) -> None:
    path = str(tmp_path / "crash.db")
    visibility = 0.5
    broker = SqliteBroker(path, 100, 1.0, "block", visibility)
    broker.put_many([Task("a", "survivor")])
    crasher = spawn(CRASHER, path, str(visibility))
    out, err = crasher.communicate(timeout=30)
    assert crasher.returncode == 9, err
    task_id, stale_receipt = out.split()
    claimed_at = time.monotonic()
    got = broker.get({"a": 1}, 1, visibility + 5)
    waited = time.monotonic() - claimed_at
    assert len(got) == 1
    (again,) = got
    assert again.task.id == task_id and again.redelivered and again.task.attempt == 2
    assert again.receipt != stale_receipt
    assert waited < visibility + 1.0
    assert broker.ack(again)
    broker.close()


def test_tasks_put_while_no_worker_runs_are_consumed_by_a_later_process(tmp_path: Path) -> None:
    path = str(tmp_path / "later.db")
    with SqliteBroker(path, 100, 1.0, "block", 60.0) as producer:
        producer.put_many([Task("b", i) for i in range(20)])
    all_put = tmp_path / "all-put"
    all_put.touch()
    consumer = spawn(CONSUMER, path, str(all_put))
    out, err = consumer.communicate(timeout=60)
    assert consumer.returncode == 0, err
    assert len(out.splitlines()) == 21  # "ready" and 20 task ids
