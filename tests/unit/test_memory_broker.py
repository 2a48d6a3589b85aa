"""Memory-broker behaviour beyond the shared contract: ordering choices, the shutdown drain,
no busy polling, and the factory. The contract itself is in tests/contract."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from runner.backends import create_broker
from runner.brokers.base import (
    Answer,
    Arrival,
    DeadLetterFilter,
    Delivery,
    Depth,
    Effects,
    Pause,
    RateLimit,
    Settle,
    SettleIncomplete,
)
from runner.brokers.memory import MemoryBroker
from runner.config.models import PipelineConfig
from runner.deadletter.file import FileDeadLetters
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import BrokerClosed, BrokerUnavailable
from runner.model import AttemptRecord, DeadLetter, Task

ANY = DeadLetterFilter()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def make(clock: FakeClock | None = None, capacity: int = 100, **kw: object) -> MemoryBroker:
    return MemoryBroker(
        capacity=capacity,
        enqueue_timeout=0.2,
        overflow="block",
        visibility_timeout=1.0,
        dead_letters=kw.pop("dead_letters", MemoryDeadLetters()),  # type: ignore[arg-type]
        clock=clock or FakeClock(),
    )


def failure(attempt: int) -> AttemptRecord:
    return AttemptRecord(attempt, "OSError", "disk", "tb", 999.0, 0.5, "w:1")


def payloads(deliveries: list[Delivery]) -> list[object]:
    return [d.task.payload for d in deliveries]


def test_a_delayed_task_becomes_ready_exactly_at_not_before() -> None:
    clock = FakeClock()
    broker = make(clock)
    broker.put_many([Task("a", "later", not_before=clock.now + 5)])
    clock.now += 4.999
    assert broker.get({"a": 1}, 1, 0) == []
    clock.now += 0.001
    assert payloads(broker.get({"a": 1}, 1, 0)) == ["later"]


def test_put_stamps_enqueued_at_only_when_unset() -> None:
    clock = FakeClock()
    broker = make(clock)
    broker.put_many([Task("a", 1), Task("a", 2, enqueued_at=5.0)])
    assert [d.task.enqueued_at for d in broker.get({"a": 2}, 2, 0)] == [clock.now, 5.0]


def test_an_expired_lease_goes_back_to_the_front_of_its_queue() -> None:
    clock = FakeClock()
    broker = make(clock)
    broker.put_many([Task("a", i) for i in range(4)])
    assert len(broker.get({"a": 2}, 2, 0)) == 2
    clock.now += 1.0  # both leases expire; they were put before tasks 2 and 3
    again = broker.get({"a": 4}, 4, 0)
    assert payloads(again) == [0, 1, 2, 3]
    assert [(d.task.attempt, d.redelivered) for d in again] == [
        (2, True),
        (2, True),
        (1, False),
        (1, False),
    ]


def test_release_goes_to_the_front_and_keeps_the_redelivered_flag() -> None:
    clock = FakeClock()
    broker = make(clock)
    broker.put_many([Task("a", 0), Task("a", 1)])
    broker.get({"a": 1}, 1, 0)
    clock.now += 1.0
    (redelivery,) = broker.get({"a": 1}, 1, 0)
    assert broker.release(redelivery)
    (again,) = broker.get({"a": 1}, 1, 0)
    assert (again.task.payload, again.task.attempt, again.redelivered) == (0, 2, True)


def test_a_binding_limit_rotates_between_types() -> None:
    broker = make()
    broker.put_many([Task(t, i) for i in range(3) for t in ("a", "b")])
    types = [broker.get({"a": 5, "b": 5}, 1, 0)[0].task.type for _ in range(4)]
    assert sorted(types) == ["a", "a", "b", "b"]


def test_drain_moves_queued_and_delayed_tasks_to_dead_letters_with_reason_shutdown() -> None:
    clock = FakeClock()
    store = MemoryDeadLetters()
    broker = make(clock, capacity=3, dead_letters=store)
    broker.put_many([Task("a", "in backoff"), Task("a", "running"), Task("a", "queued")])
    backoff, running = broker.get({"a": 2}, 2, 0)
    assert broker.retry(backoff, 30, failure(1))
    drained = broker.drain_to_dead_letters()
    records = store.records(ANY)
    assert drained == records
    assert [(r.task.payload, r.reason) for r in records] == [
        ("queued", "shutdown"),
        ("in backoff", "shutdown"),
    ]
    assert records[1].error_type == "OSError" and records[1].attempts == 1
    assert records[0].attempts == 0 and "never ran" in records[0].message
    assert broker.depth()["a"] == Depth(leased=1)
    assert broker.ack(running)  # a running task is not touched by default
    broker.put_many([Task("a", i) for i in range(3)], timeout=0)  # and capacity was given back


def test_drain_can_include_leased_tasks_and_fences_them() -> None:
    store = MemoryDeadLetters()
    broker = make(dead_letters=store)
    broker.put_many([Task("a", "running")])
    (running,) = broker.get({"a": 1}, 1, 0)
    broker.close()
    assert len(broker.drain_to_dead_letters(include_leased=True)) == 1  # works after close
    assert [(r.task.payload, r.attempts) for r in store.records(ANY)] == [("running", 1)]
    with pytest.raises(BrokerClosed):
        broker.ack(running)


def test_a_failing_dead_letter_store_leaves_the_task_leased() -> None:
    class Broken(MemoryDeadLetters):
        def add(self, record: DeadLetter) -> None:
            raise OSError("disk full")

    broker = make(dead_letters=Broken())
    broker.put_many([Task("a", None)])
    (d,) = broker.get({"a": 1}, 1, 0)
    record = DeadLetter(d.task, "error", "E", "m", "", 1, 0, 0, 0)
    with pytest.raises(OSError):
        broker.dead(d, record)
    assert broker.depth()["a"] == Depth(leased=1)
    assert broker.ack(d)


class _FailingOn(MemoryDeadLetters):
    """A store whose writes of the ids in ``failing`` raise, as a full disk does."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    def add(self, record: DeadLetter) -> None:
        if record.id in self.failing:
            raise OSError("disk full")
        super().add(record)

    def take(self, ids: list[str]) -> list[DeadLetter]:
        if self.failing & set(ids):
            raise OSError("disk full")
        return super().take(ids)


def test_a_hand_off_the_store_cannot_write_changes_nothing_until_it_can() -> None:
    # A dead pipeline task starts its on_dead task and dead-letters its join: when the join's
    # record cannot be written, the settle must not have taken effect either (the task stays
    # leased), or its retry would answer ALREADY_DONE and the on_dead task would never start.
    store = _FailingOn()
    broker = make(dead_letters=store)
    broker.put_many([Task("a", None, id="t1")])
    (d,) = broker.get({"a": 1}, 1, 0)
    record = DeadLetter(d.task, "error", "E", "m", "", 1, 0, 0, 0)
    joined = DeadLetter(Task("j", None, id="join1"), "upstream dead", "U", "m", "", 0, 0, 0, 0)
    on_dead = Task("b", "record", id="t1-dead")
    effects = Effects(puts=(on_dead,), dead_letters=(joined,))
    op = Settle(d, "dead", record=record, effects=effects)
    store.failing = {"join1"}
    with pytest.raises(OSError):
        broker.settle_many([op])
    assert broker.depth() == {"a": Depth(leased=1)}
    store.failing = set()
    assert broker.settle_many([op]) == [Answer.DONE]
    assert [x.task.id for x in broker.get({"b": 1}, 1, 0)] == ["t1-dead"]
    assert sorted(r.id for r in store.records(ANY)) == ["join1", "t1"]


def test_a_join_whose_dead_record_cannot_be_taken_does_not_fire_until_it_can() -> None:
    store = _FailingOn()
    broker = make(dead_letters=store)
    broker.put_many([Task("a", i, id=f"p{i}") for i in range(2)])
    first, second = broker.get({"a": 2}, 2, 0)
    joined = Task("j", None, id="join1")

    def arriving(d: Delivery, index: int, **more: object) -> Settle:
        arrival = Arrival("join:g", index, 2, str(index), joined)
        return Settle(d, "ack", effects=Effects(arrivals=(arrival,), **more))  # type: ignore[arg-type]

    # The first part's death dead-letters the join (its record); the part is replayed and
    # succeeds: the join fires with its last part, and its record goes.
    upstream = DeadLetter(joined, "upstream dead", "U", "m", "", 0, 0, 0, 0)
    assert broker.settle_many([arriving(first, 0, dead_letters=(upstream,))]) == [Answer.DONE]
    store.failing = {"join1"}
    with pytest.raises(OSError):
        broker.settle_many([arriving(second, 1)])
    assert broker.depth() == {"a": Depth(leased=1)}
    store.failing = set()
    assert broker.settle_many([arriving(second, 1)]) == [Answer.DONE]
    assert [(x.task.id, x.task.payload) for x in broker.get({"j": 1}, 1, 0)] == [("join1", [0, 1])]
    assert store.records(ANY) == []


def test_a_dead_letter_the_store_cannot_write_holds_back_no_other_op_of_its_batch() -> None:
    class Full(MemoryDeadLetters):
        def add(self, record: DeadLetter) -> None:
            raise BrokerUnavailable("dead-letter file: cannot write: No space left on device")

    broker = make(dead_letters=Full())
    broker.put_many([Task("a", i, id=f"t{i}") for i in range(3)])
    first, second, third = broker.get({"a": 3}, 3, 0)
    record = DeadLetter(second.task, "error", "E", "m", "", 1, 0, 0, 0)
    batch = [Settle(first, "ack"), Settle(second, "dead", record=record), Settle(third, "ack")]
    with pytest.raises(SettleIncomplete, match="No space left") as caught:
        broker.settle_many(batch)
    assert caught.value.answers == (Answer.DONE, None, Answer.DONE)
    assert broker.depth()["a"] == Depth(leased=1)  # the dead one's task, to try again


def test_a_join_record_written_by_a_dead_settle_that_failed_goes_when_the_join_fires() -> None:
    # The part's own record cannot be written, after its join's was: the settle fails, the
    # part comes back and this time succeeds; when the join fires, that record must go too.
    clock = FakeClock()
    store = _FailingOn()
    broker = make(clock, dead_letters=store)
    broker.put_many([Task("a", i, id=f"p{i}") for i in range(2)])
    first, second = broker.get({"a": 2}, 2, 0)
    joined = Task("j", None, id="join1")
    upstream = DeadLetter(joined, "upstream dead", "U", "m", "", 0, 0, 0, 0)
    record = DeadLetter(first.task, "error", "E", "m", "", 1, 0, 0, 0)
    store.failing = {"p0"}
    with pytest.raises(OSError):
        broker.settle_many([Settle(first, "dead", record=record,
                                   effects=Effects(dead_letters=(upstream,)))])  # fmt: skip
    store.failing = set()
    assert [r.id for r in store.records(ANY)] == ["join1"]  # written before the part's own

    def arrive(d: Delivery, index: int) -> list[Answer]:
        arrival = Arrival("join:g", index, 2, str(index), joined)
        return broker.settle_many([Settle(d, "ack", effects=Effects(arrivals=(arrival,)))])

    assert arrive(second, 1) == [Answer.DONE]
    clock.now += 2  # the first part's lease runs out: it is handed out again, and succeeds
    (again,) = broker.get({"a": 1}, 1, 0)
    assert arrive(again, 0) == [Answer.DONE]
    assert [x.task.id for x in broker.get({"j": 1}, 1, 0)] == ["join1"]
    assert store.records(ANY) == []


def test_a_cancel_the_store_cannot_write_leaves_the_tasks_queued() -> None:
    class Broken(MemoryDeadLetters):
        def add_many(self, records: Sequence[DeadLetter]) -> None:
            raise OSError("disk full")

    clock = FakeClock()
    broker = make(clock, dead_letters=Broken())
    lineage = {"root_id": "r1", "parent_id": "r1"}
    broker.put_many([Task("a", 0, id="c1", headers=lineage)])
    broker.put_many([Task("a", 1, id="c2", headers=lineage, not_before=clock.now + 5)])
    with pytest.raises(OSError):
        broker.cancel("r1", "cancelled by the operator")
    assert broker.depth() == {"a": Depth(ready=1, delayed=1)}
    clock.now += 5
    assert [d.task.id for d in broker.get({"a": 2}, 2, 0)] == ["c1", "c2"]


def test_many_extends_do_not_grow_the_expiry_heap_without_bound() -> None:
    broker = make()
    broker.put_many([Task("a", i) for i in range(10)])
    held = broker.get({"a": 10}, 10, 0)
    for _ in range(200):
        assert broker.extend(held) == [Answer.DONE] * 10
    assert len(broker._expiry) <= 2 * 10 + 64 + 10


def test_a_settled_receipt_is_remembered_for_one_visibility_timeout() -> None:
    clock = FakeClock()
    broker = make(clock)  # visibility_timeout 1.0
    broker.put_many([Task("a", 0), Task("a", 1)])
    acked, released = broker.get({"a": 2}, 2, 0)
    assert broker.ack(acked) is Answer.DONE
    clock.now += 0.5
    assert broker.release(released) is Answer.DONE
    clock.now += 0.499
    assert broker.ack(acked) is Answer.ALREADY_DONE
    assert broker.extend([acked, released]) == [Answer.ALREADY_DONE] * 2
    clock.now += 0.001  # one visibility timeout after the ack, half of one after the release
    assert broker.ack(acked) is Answer.FENCED
    assert broker.ack(released) is Answer.ALREADY_DONE
    clock.now += 0.5
    assert broker.extend([released]) == [Answer.FENCED]


def test_settled_receipts_older_than_the_visibility_timeout_are_dropped() -> None:
    clock = FakeClock()
    broker = make(clock)
    broker.put_many([Task("a", i) for i in range(50)])
    for d in broker.get({"a": 50}, 50, 0):
        assert broker.ack(d) is Answer.DONE
    assert len(broker._settled) == 50
    clock.now += 0.5
    broker.put_many([Task("a", "later")])
    (later,) = broker.get({"a": 1}, 1, 0)
    assert broker.ack(later) is Answer.DONE
    assert len(broker._settled) == 51  # nothing is a visibility timeout old yet
    clock.now += 0.5
    broker.put_many([Task("a", "last")])
    (last,) = broker.get({"a": 1}, 1, 0)
    assert broker.ack(last) is Answer.DONE  # the first 50 are now one timeout old
    assert set(broker._settled) == {later.receipt, last.receipt}


def test_a_blocked_get_sleeps_until_the_next_due_time_instead_of_polling() -> None:
    broker = MemoryBroker(100, 1, "block", 30, MemoryDeadLetters(), clock=time.time)
    broker.put_many([Task("a", "soon", not_before=time.time() + 0.3)])
    start = time.monotonic()
    got = broker.get({"a": 1}, 1, 5)
    assert payloads(got) == ["soon"]
    assert 0.3 <= time.monotonic() - start < 0.9 + 0.5
    # With a counting clock: an idle 0.5 s get reads the clock a handful of times, not hundreds.
    counting = FakeClock()
    idle = make(counting)
    idle.get({"a": 1}, 1, 0.5)
    assert counting.calls < 10


def test_watchers_hear_of_each_change_no_waiting_get_saw_after_the_lock_is_released() -> None:
    """The ``watch`` hook is told of a put, a retry, a release, a replay, a resume, a put_if
    and a put_unique made while no get waits (the engine's leader may have left the next wait
    to whichever thread idles next), with the broker's lock free; never of one a waiting get
    saw, nor of a call that gives a get nothing (an ack, an extend)."""
    broker = MemoryBroker(100, 1, "block", 30, MemoryDeadLetters(), clock=time.time)
    heard: list[bool] = []
    assert broker.watch(lambda: heard.append(not broker._cond._is_owned()))  # type: ignore[attr-defined]
    # One hook per broker: two workers' hooks could each wait for the other's lock.
    assert not broker.watch(lambda: heard.append(False))

    def told(call: Callable[[], object]) -> int:
        before = len(heard)
        call()
        assert all(heard[before:]), "a hook was called with the broker's lock held"
        return len(heard) - before

    assert told(lambda: broker.put_many([Task("a", 1), Task("a", 2), Task("a", 3)])) == 1
    first, second, third = broker.get({"a": 3}, 3, 0)
    assert told(lambda: broker.retry(first, 0.0, failure(1))) == 1
    assert told(lambda: broker.release(second)) == 1
    assert told(lambda: broker.settle_many([Settle(third, "ack")])) == 0
    assert told(lambda: broker.extend([])) == 0
    assert told(lambda: broker.set_gate("a", Pause())) == 1
    assert told(lambda: broker.clear_gate("a", Pause)) == 1
    assert told(lambda: broker.put_if("k", None, "v", [Task("a", 4)])) == 1
    assert told(lambda: broker.put_unique([Task("a", 5, unique_key="u")])) == 1
    broker.get({"a": 10}, 10, 0)
    dead = Task("a", 6)
    broker.dead_letter_store.add(DeadLetter(dead, "error", "E", "m", "", 1, 0, 0, 0))
    assert told(lambda: broker.replay([dead.id])) == 1
    assert payloads(broker.get({"a": 10}, 10, 0)) == [6]
    # A put that a waiting get sees is not told.
    getter = threading.Thread(target=lambda: broker.get({"a": 1}, 1, 5))
    getter.start()
    wait_for_getter(broker)
    assert told(lambda: broker.put_many([Task("a", 7)])) == 0
    getter.join()


def wait_for_getter(broker: MemoryBroker) -> None:
    deadline = time.monotonic() + 5
    while not broker._getters:
        assert time.monotonic() < deadline, "the get never waited"
        time.sleep(0.001)


def test_only_leases_fall_due_on_a_broker_whose_timers_are_idle() -> None:
    broker = MemoryBroker(100, 1, "block", 30, MemoryDeadLetters(), clock=time.time)
    broker.put_many([Task("a", 1)])
    assert broker.get({"a": 1}, 1, 0)
    assert broker.timers_idle()  # a lease does not count: the engine renews its own
    broker.put_many([Task("a", 2, not_before=time.time() + 60)])
    assert not broker.timers_idle()
    other = MemoryBroker(100, 1, "block", 30, MemoryDeadLetters(), clock=time.time)
    other.set_gate("a", Pause(until=time.time() + 60))
    assert not other.timers_idle()
    limited = MemoryBroker(100, 1, "block", 30, MemoryDeadLetters(), clock=time.time)
    limited.set_gate("a", RateLimit(5.0))
    assert not limited.timers_idle()


def test_a_put_waiting_for_room_wakes_when_a_task_is_acked() -> None:
    broker = MemoryBroker(1, 30, "block", 30, MemoryDeadLetters())
    broker.put_many([Task("a", 1)])
    done = threading.Event()
    thread = threading.Thread(target=lambda: (broker.put_many([Task("a", 2)]), done.set()))
    thread.start()
    assert not done.wait(0.1)
    (d,) = broker.get({"a": 1}, 1, 0)
    broker.ack(d)
    assert done.wait(5)
    thread.join()


class _CountingLock:
    """A lock that counts how often it was taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.taken += 1
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *_: object) -> None:
        self.release()


def test_settle_many_takes_the_lock_once_for_the_whole_batch() -> None:
    # One lock hold per task from every worker thread, next to the publisher's and the fetch's,
    # is what made threads queue on it (docs/performance.md): the engine settles in batches.
    broker = make()
    assert broker.batch_settles
    broker.put_many([Task("a", i) for i in range(10)])
    deliveries = broker.get({"a": 10}, 10, 0)
    lock = _CountingLock()
    broker._cond = threading.Condition(lock)  # type: ignore[arg-type]
    answers = broker.settle_many([Settle(d, "ack") for d in deliveries])
    assert answers == [Answer.DONE] * 10
    assert lock.taken == 1
    assert broker.depth()["a"] == Depth(ready=0, delayed=0, leased=0)


def _config(tmp_path: Path, **dead_letter: str) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "broker": {
                "kind": "memory",
                "capacity": 7,
                "visibility_timeout": "2s",
                "overflow": "reject",
            },
            "task_types": {"a": {"handler": "mod:fn", "timeout": 1}},
            "dead_letter": dead_letter,
        }
    )


def test_create_broker_builds_a_memory_broker_from_config(tmp_path: Path) -> None:
    broker = create_broker(_config(tmp_path))
    assert isinstance(broker, MemoryBroker)
    assert (broker.capacity, broker.visibility_timeout, broker.overflow) == (7, 2.0, "reject")
    assert isinstance(broker.dead_letter_store, MemoryDeadLetters)


def test_create_broker_wires_a_file_dead_letter_store(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    broker = create_broker(_config(tmp_path, kind="file", path=str(path)))
    assert isinstance(broker, MemoryBroker)
    assert isinstance(broker.dead_letter_store, FileDeadLetters)
    assert broker.dead_letter_store.path == path
