"""The worker's books on their own: no threads, no broker; every step is one call.

Each test drives the books the way the worker's parts do (the dispatcher asks what to fetch,
the fetcher tells what came, a thread takes its next task) and checks what they answer.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from runner.brokers.base import Answer, Delivery, Settle
from runner.engine.books import Books, Fetch, Reservation
from runner.engine.settle import Outcome
from runner.model import Task

_receipts = itertools.count()


def delivery(type_name: str, redelivered: bool = False) -> Delivery:
    return Delivery(Task(type_name, None), f"r{next(_receipts)}", redelivered=redelivered)


class Calls:
    """What the books handed out of their lock: settles submitted, broker wake-ups."""

    def __init__(self) -> None:
        self.submitted: list[Outcome] = []
        self.wakes = 0

    def submit(self, outcome: Outcome) -> None:
        self.submitted.append(outcome)

    def wake(self) -> None:
        self.wakes += 1


def books(
    limits: dict[str, int],
    threads: int,
    prefetch: int,
    carry: bool = True,
    guarded: frozenset[str] = frozenset(),
) -> tuple[Books, Calls, threading.Event]:
    calls = Calls()
    stopping = threading.Event()
    b = Books(
        limits, threads, prefetch, stopping, calls.submit, calls.wake, carry=carry, guarded=guarded
    )
    return b, calls, stopping


def fill(b: Books, *deliveries: Delivery) -> None:
    """A fetch by the dispatcher that brought ``deliveries`` (each fetch also rotates the
    order in which types are offered, as the dispatcher does for fairness)."""
    step = b.dispatch_step()
    assert isinstance(step, Fetch), "no fetch was due"
    for d in deliveries:
        assert d.task.type in step.reservation.slots
    b.fetched(step.reservation, deliveries, by_dispatcher=True)


def outcome(d: Delivery) -> Outcome:
    return Outcome(Settle(d, "ack"), "task.succeeded")


def test_the_dispatcher_asks_each_type_for_its_room_and_no_more_in_all() -> None:
    """limit + the type's share of the buffer, per type; threads + prefetch in all."""
    b, _, _ = books({"a": 1, "b": 3}, threads=3, prefetch=3)
    step = b.dispatch_step()
    assert isinstance(step, Fetch)
    # a: 1 + min(3, max(1, 3 // 2)) = 2; b: 3 + min(3, max(3, 1)) = 6; in all 3 + 3.
    assert step.reservation == Reservation({"a": 2, "b": 6}, 6)
    assert step.block  # nothing carried: the blocking get


def test_room_reserved_by_one_fetch_is_not_offered_to_another() -> None:
    b, _, _ = books({"a": 4}, threads=2, prefetch=0)  # threads fetch for themselves
    first = b.dispatch_step()
    assert isinstance(first, Fetch) and first.reservation == Reservation({"a": 4}, 2)
    with b.observe() as now:
        assert now.reserved == 2
        assert not now.fetch_due  # all the room is promised: another fetch would double it
    b.fetched(first.reservation, [delivery("a")], by_dispatcher=True)
    with b.observe() as now:
        assert (now.reserved, now.held, now.ready) == (0, 1, 1)


def test_a_thread_takes_the_oldest_task_of_the_first_type_below_its_limit() -> None:
    b, _, _ = books({"a": 1, "b": 2}, threads=3, prefetch=6)
    a1, a2, b1 = delivery("a"), delivery("a"), delivery("b")
    fill(b, a1, a2)
    fill(b, b1)  # two fetches: a is offered first again
    assert b.next_task(None, None) is a1
    assert b.next_task(None, None) is b1  # a is at its limit: the next type's task, not a2
    assert b.running() == {"a": 1, "b": 1}
    assert b.next_task(a1, None) is a2  # a1 ended: its slot goes to a2 in the same step
    assert b.running() == {"a": 1, "b": 1}


def test_a_finished_tasks_settle_is_handed_on_with_its_slot_freed() -> None:
    b, calls, _ = books({"a": 2}, threads=2, prefetch=2)
    a1, a2 = delivery("a"), delivery("a")
    fill(b, a1, a2)
    assert b.next_task(None, None) is a1
    # The dispatcher is not running: a settle cannot wait for its fetch, the Settler takes it.
    assert b.next_task(a1, outcome(a1)) is a2
    assert [o.settle.delivery for o in calls.submitted] == [a1]
    with b.observe() as now:
        assert (now.held, now.settling) == (1, 1)  # a2 held; a1 held until its settle answers
    assert [d.receipt for d in b.held_now()] == [a2.receipt, a1.receipt]
    b.settled(calls.submitted)
    with b.observe() as now:
        assert now.settling == 0


def test_a_settle_rides_with_the_dispatchers_next_fetch_while_it_is_not_blocked() -> None:
    b, calls, _ = books({"a": 2}, threads=2, prefetch=2)
    b.dispatcher_started()
    a1, a2 = delivery("a"), delivery("a")
    fill(b, a1, a2)
    assert b.next_task(None, None) is a1
    assert b.next_task(a1, outcome(a1)) is a2
    assert calls.submitted == []  # carried, not submitted
    step = b.dispatch_step()
    assert isinstance(step, Fetch) and not step.block  # an exchange, carrying the settle
    assert [o.settle.delivery for o in step.carry] == [a1]
    assert b.dispatcher_done() == []


def test_on_a_broker_that_does_not_carry_settles_the_fetch_hands_them_to_the_settler() -> None:
    """Redis (carry_settles False): what waited for the dispatcher's fetch goes to the Settler
    in one go as it fetches, and the fetch goes alone, so the two round trips overlap."""
    b, calls, _ = books({"a": 2}, threads=2, prefetch=2, carry=False)
    b.dispatcher_started()
    a1, a2 = delivery("a"), delivery("a")
    fill(b, a1, a2)
    assert b.next_task(None, None) is a1
    assert b.next_task(a1, outcome(a1)) is a2
    assert calls.submitted == []  # handed on: it waits for the dispatcher's fetch
    step = b.dispatch_step()
    assert isinstance(step, Fetch) and step.carry == []
    assert step.block  # nothing carried: the blocking get, which returns at once with tasks
    assert [o.settle.delivery for o in calls.submitted] == [a1]


def test_a_guarded_types_slot_is_claimed_again_only_once_its_outcome_was_recorded() -> None:
    """A type with a circuit breaker: a finished task's settle sent apart from any fetch (to
    the Settler) keeps its slot taken until the broker answered, so no claim overtakes an
    outcome the circuit has not counted yet; an unguarded type's slot is free at once."""
    for guarded in (frozenset({"a"}), frozenset()):
        b, calls, _ = books({"a": 2}, threads=2, prefetch=2, guarded=guarded)
        a = [delivery("a") for _ in range(4)]
        fill(b, *a)  # a's room: 2 + min(2, max(2, 2)) = 4
        assert b.next_task(None, None) is a[0]
        assert b.next_task(a[0], outcome(a[0])) is a[1]
        assert [o.settle.delivery for o in calls.submitted] == [a[0]]  # to the Settler
        with b.observe() as now:
            assert now.fetch_due == (not guarded)  # guarded: a[0]'s slot is still taken
        b.settled(calls.submitted)
        step = b.dispatch_step()
        assert isinstance(step, Fetch) and step.reservation.slots == {"a": 1}


def test_a_fetch_that_carries_a_guarded_types_outcome_may_claim_its_slot() -> None:
    """The fetch that carries a settle records it before it claims (exchange is settle_many,
    then get): the slot of the outcome it carries is room for it."""
    b, _, _ = books({"a": 2}, threads=2, prefetch=0, guarded=frozenset({"a"}))
    a1, a2 = delivery("a"), delivery("a")
    step = b.next_task(None, None)
    assert isinstance(step, Fetch)
    b.fetched(step.reservation, [a1, a2], by_dispatcher=False)
    assert b.after_own_fetch(2) is a1
    assert b.next_task(None, None) is a2
    step = b.next_task(a1, outcome(a1))
    assert isinstance(step, Fetch) and [o.settle.delivery for o in step.carry] == [a1]
    assert step.reservation.slots == {"a": 1}


def test_a_redelivered_task_runs_alone() -> None:
    """Picked, it becomes a suspect: nothing else starts, nothing is fetched, and isolate()
    gives every unstarted task back; once it ends the books go on as before."""
    b, _, _ = books({"a": 2}, threads=2, prefetch=4)
    suspect, other, later = delivery("a", redelivered=True), delivery("a"), delivery("a")
    fill(b, suspect, other, later)
    assert b.next_task(None, None) is suspect
    with b.observe() as now:
        assert not now.fetch_due  # no room while a suspect runs
    assert {d.receipt for d in b.isolate()} == {other.receipt, later.receipt}  # no wait
    for d in (other, later):
        b.forget(d, started=False)
    with b.observe() as now:
        assert (now.held, now.ready, now.fetch_due) == (1, 0, False)
    b.forget(suspect, started=True)
    with b.observe() as now:
        assert (now.held, now.fetch_due) == (0, True)


def test_a_refused_renewal_drops_an_unstarted_task_and_keeps_a_running_one() -> None:
    b, _, _ = books({"a": 2}, threads=2, prefetch=2)
    running, waiting = delivery("a"), delivery("a")
    fill(b, running, waiting)
    assert b.next_task(None, None) is running
    lost = b.renewed([running, waiting], [Answer.FENCED, Answer.FENCED], asked=123.0)
    assert lost == [waiting]  # the running one is reported by its own (refused) settle
    with b.observe() as now:
        assert (now.held, now.ready, now.running) == (1, 0, {"a": 1})  # the running one stays


def test_a_renewal_answered_done_is_the_new_time_the_lease_was_known_good() -> None:
    b, _, _ = books({"a": 1}, threads=1, prefetch=1)
    d = delivery("a")
    fill(b, d)
    before = b.renewed_at(d)
    assert before is not None
    assert b.renewed([d], [Answer.DONE], asked=before + 100.0) == []
    assert b.renewed_at(d) == before + 100.0
    b.forget(d, started=False)
    assert b.renewed_at(d) is None


def test_idle_types_leave_the_buffer_to_the_busy_ones() -> None:
    """A fetch that asked for a and b with room to spare and found only a marks b idle: a's
    share of the buffer becomes all of it."""
    b, _, _ = books({"a": 1, "b": 1}, threads=2, prefetch=8)
    step = b.dispatch_step()
    assert isinstance(step, Fetch) and step.reservation.slots == {"a": 5, "b": 5}
    b.fetched(step.reservation, [delivery("a")], by_dispatcher=True)
    step = b.dispatch_step()
    assert isinstance(step, Fetch)
    assert step.reservation.slots["a"] == 1 + 8 - 1  # limit + the whole buffer, less the held


def test_a_thread_with_nothing_to_take_fetches_for_itself_when_there_is_no_buffer() -> None:
    b, _, _ = books({"a": 2}, threads=2, prefetch=0)
    step = b.next_task(None, None)
    assert isinstance(step, Fetch) and not step.block
    assert step.reservation == Reservation({"a": 2}, 2)
    d = delivery("a")
    b.fetched(step.reservation, [d], by_dispatcher=False)
    assert b.after_own_fetch(1) is d


def test_closing_sends_threads_home_with_their_last_settle_handed_on() -> None:
    b, calls, _ = books({"a": 1}, threads=1, prefetch=1)
    d = delivery("a")
    fill(b, d)
    assert b.next_task(None, None) is d
    b.close()
    assert b.next_task(d, outcome(d)) is None
    assert [o.settle.delivery for o in calls.submitted] == [d]


def test_a_slot_freed_of_a_type_the_get_under_way_does_not_ask_for_wakes_the_broker() -> None:
    b, calls, _ = books({"a": 1, "b": 1}, threads=2, prefetch=0)
    a1 = delivery("a")
    fill(b, a1)
    assert b.next_task(None, None) is a1
    step = b.dispatch_step()  # the dispatcher blocks in a get for b only (a is full)
    assert isinstance(step, Fetch) and set(step.reservation.slots) == {"b"}
    b.forget(a1, started=True)
    assert calls.wakes == 1  # the get could not take a: it returns to ask again


def test_the_books_wait_and_notify_on_an_rlock() -> None:
    """Their Conditions sit on an RLock: a notify first checks that its caller holds the lock,
    in C for an RLock (0.07 us) and in Python for a plain Lock (0.29 us), about five times per
    task. Nothing takes the lock twice; a notify without it still fails, with or without a
    waiter."""
    b, _, _ = books({"a": 1}, threads=1, prefetch=0)
    assert isinstance(b._lock, type(threading.RLock()))
    for condition in (b._work, b._room):
        with pytest.raises(RuntimeError, match="un-acquired lock"):
            condition.notify()


def test_a_notify_wakes_the_threads_that_wait_and_costs_nothing_without_them() -> None:
    """The books' Conditions skip the notify's work when nobody waits: a waiter must still
    be woken, by notify one at a time and by notify_all all at once."""
    b, _, _ = books({"a": 1}, threads=1, prefetch=0)
    woken: list[str] = []

    def waiter(name: str) -> None:
        with b._lock:
            if b._work.wait(timeout=10):
                woken.append(name)

    threads = [threading.Thread(target=waiter, args=(str(i),)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(b._work._waiters) < 3 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.001)
    with b._lock:
        b._room.notify_all()  # nobody waits there: nothing happens
        b._work.notify()
    while not woken and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)  # a second waiter woken by mistake would be in by now
    assert len(woken) == 1
    with b._lock:
        b._work.notify_all()
    for t in threads:
        t.join(timeout=10)
    assert sorted(woken) == ["0", "1", "2"]


def test_a_shared_brokers_queue_counts_as_drained_from_a_get_that_waited_to_a_full_fetch() -> None:
    """On a broker of many processes a thread leads only while the queue is drained: a
    blocking get that waited for its tasks drains it; a fetch that came back with fewer than
    it had room for but did not wait (a pipeline's later stage trickling in) leaves it as it
    was; one that came back full (a backlog) ends it."""
    calls = Calls()
    b = Books({"a": 2}, 2, 2, threading.Event(), calls.submit, calls.wake, lead_when_drained=True)

    def fetch(n: int, waited: bool) -> bool:
        step = b.dispatch_step()
        assert isinstance(step, Fetch)
        b.fetched(step.reservation, [delivery("a") for _ in range(n)], True, waited=waited)
        for _ in range(n):  # run and finish them, so the next fetch is due
            taken = b.next_task(None, None)
            assert isinstance(taken, Delivery)
            b.finished(taken, None)
        with b.observe() as now:
            return now.drained

    assert not fetch(1, waited=False)  # partial, but it found a task at once
    assert fetch(1, waited=True)  # the get waited: the process was idle
    assert fetch(0, waited=False)  # nothing and no wait: as it was
    assert not fetch(4, waited=True)  # as many as its room: a backlog
    assert not fetch(1, waited=False)
