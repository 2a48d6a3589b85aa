"""Group commit of the Redis broker's settle calls: batched, yet every caller gets its own answer.

The GroupCommit tests drive the batching with a flush that blocks on an event, so which ops
share a batch is decided by the test, not by timing. The RedisBroker tests settle many
deliveries from many threads at once, stale ones among them, against a real redis-server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from runner.brokers.base import DeadLetterFilter, Delivery
from runner.brokers.redis import RedisBroker
from runner.brokers.redis_batch import GroupCommit
from runner.task import AttemptRecord, DeadLetter, Task

MakeBroker = Callable[..., RedisBroker]


class HeldFlush:
    """A flush that records each batch and, while ``gate`` is clear, blocks its first call."""

    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail_with = fail_with

    def __call__(self, ops: Sequence[int]) -> list[int]:
        self.batches.append(list(ops))
        self.entered.set()
        assert self.gate.wait(10.0)
        if self.fail_with is not None:
            raise self.fail_with
        return [op * 10 for op in ops]


def wait_pending(commit: GroupCommit[int, int], n: int) -> None:
    deadline = time.monotonic() + 10.0
    while len(commit._pending) < n:  # the queue is what this test is about
        assert time.monotonic() < deadline, "submitters did not queue up"
        time.sleep(0.001)


def test_calls_arriving_during_a_flush_share_the_next_one_and_get_their_own_results() -> None:
    flush = HeldFlush()
    commit: GroupCommit[int, int] = GroupCommit(flush)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(commit.submit, 1)
        assert flush.entered.wait(10.0)
        rest = [pool.submit(commit.submit, op) for op in (2, 3, 4)]
        wait_pending(commit, 3)
        flush.gate.set()
        assert first.result(10.0) == 10
        assert [f.result(10.0) for f in rest] == [20, 30, 40]
    assert flush.batches[0] == [1]
    assert sorted(flush.batches[1]) == [2, 3, 4]
    assert len(flush.batches) == 2


def test_a_lone_call_flushes_at_once() -> None:
    flush = HeldFlush()
    flush.gate.set()
    commit: GroupCommit[int, int] = GroupCommit(flush)
    assert [commit.submit(op) for op in (1, 2)] == [10, 20]
    assert flush.batches == [[1], [2]]


def test_a_failed_flush_raises_in_every_caller_of_its_batch() -> None:
    flush = HeldFlush(fail_with=ConnectionError("gone"))
    commit: GroupCommit[int, int] = GroupCommit(flush)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(commit.submit, 1)
        assert flush.entered.wait(10.0)
        second = pool.submit(commit.submit, 2)
        wait_pending(commit, 1)
        flush.gate.set()
        for future in (first, second):
            with pytest.raises(ConnectionError, match="gone"):
                future.result(10.0)


def test_claimed_ops_are_answered_by_the_claimer_beside_a_flush_under_way() -> None:
    flush = HeldFlush()
    commit: GroupCommit[int, int] = GroupCommit(flush)
    assert commit.claim() is None
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(commit.submit, 1)
        assert flush.entered.wait(10.0)
        waiting = [pool.submit(commit.submit, op) for op in (2, 3)]
        wait_pending(commit, 2)
        batch = commit.claim()
        assert batch is not None
        assert sorted(batch.ops) == [2, 3]
        commit.finish(batch, [op * 100 for op in batch.ops])
        assert [f.result(10.0) for f in waiting] == [200, 300]
        assert not first.done()  # the flush under way is not disturbed
        flush.gate.set()
        assert first.result(10.0) == 10
    assert flush.batches == [[1]]


def test_a_claimed_batch_that_fails_raises_in_its_callers() -> None:
    flush = HeldFlush()
    commit: GroupCommit[int, int] = GroupCommit(flush)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(commit.submit, 1)
        assert flush.entered.wait(10.0)
        waiting = pool.submit(commit.submit, 2)
        wait_pending(commit, 1)
        batch = commit.claim()
        assert batch is not None
        commit.finish(batch, TimeoutError("lost"))
        with pytest.raises(TimeoutError):
            waiting.result(10.0)
        flush.gate.set()
        assert first.result(10.0) == 10


# -- against Redis ------------------------------------------------------------------------


@pytest.fixture
def make_broker(make_broker: MakeBroker) -> MakeBroker:
    """The shared factory (tests/integration/conftest.py), with room for bigger batches."""
    return partial(make_broker, capacity=200, overflow="reject")


def take(broker: RedisBroker, n: int) -> list[Delivery]:
    out: list[Delivery] = []
    deadline = time.monotonic() + 10.0
    while len(out) < n:
        assert time.monotonic() < deadline
        out += broker.get({"a": n - len(out)}, n - len(out), 1.0)
    return out


@pytest.mark.redis
def test_concurrent_acks_each_get_their_fenced_answer(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.2)
    broker.put_many([Task("a", 0)])
    (stale,) = take(broker, 1)
    (fresh,) = take(broker, 1)  # the same task, reclaimed after the visibility timeout
    assert fresh.task.id == stale.task.id
    broker.put_many([Task("a", i) for i in range(1, 41)])
    deliveries = take(broker, 40)
    calls = [stale, fresh, stale, *deliveries]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(broker.ack, calls))
    # The stale receipt is fenced whatever batch it rode in; fresh wins once and only once.
    assert answers[0] is False
    assert answers[1] is True
    assert answers[2] is False
    assert answers[3:] == [True] * 40
    assert broker.depth()["a"].total == 0
    broker.put_many([Task("a", i) for i in range(200)])  # every capacity slot came back


@pytest.mark.redis
def test_concurrent_retry_dead_release_and_ack_all_land(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.put_many([Task("a", i) for i in range(4)])
    by_payload = {d.task.payload: d for d in take(broker, 4)}
    now = time.time()
    failure = AttemptRecord(1, "RuntimeError", "boom", "tb", now, 0.01, "test:1")
    doomed = by_payload[2]
    record = DeadLetter(
        doomed.task.with_failure(failure), "error", "RuntimeError", "boom", "tb", 1, now, now, now
    )
    calls: list[Callable[[], bool]] = [
        lambda: broker.ack(by_payload[0]),
        lambda: broker.retry(by_payload[1], 0.0, failure),
        lambda: broker.dead(doomed, record),
        lambda: broker.release(by_payload[3]),
    ]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda call: call(), calls)) == [True] * 4
    back = {d.task.payload: d.task for d in take(broker, 2)}
    assert back[1].attempt == 2 and len(back[1].history) == 1  # retried: one more attempt
    assert back[3].attempt == 1  # released: the attempt it used is given back
    (dead,) = broker.dead_letters(DeadLetterFilter())
    assert dead.task.id == doomed.task.id
    assert broker.ack(by_payload[0]) is False  # settled once means settled
