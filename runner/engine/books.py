"""The worker's books: which deliveries it holds, per type, and who waits for what.

One lock guards them. Every public method takes it for one step and returns; the private ones
run under it, called only from the public ones. No thread is started here and no broker is
called: the parts that fetch, run and renew (``fetch``, ``dispatch``, ``leases``, ``worker``)
ask the books what to do, do it without the lock, and tell the books what came of it. Two
callables cross that line while the lock is held, both of which return at once: ``submit``
(a finished task's settle, to the Settler) and ``wake_broker`` (end a blocking get early).

What is counted, per type: deliveries ``ready`` (fetched, not started), ``running``, ``held``
(both, by receipt), room ``reserved`` by fetches under way (so that fetches running at the
same time never ask for the same room twice), the ``suspects`` (tasks handed out again after
their lease expired: while one runs nothing is fetched and nothing else starts) and when each
held lease was last known good. Settles handed on and not yet answered (``settling``) count
against no room but are still held: their leases are renewed and stop() waits for them.

Limits, precisely: at most ``limit`` tasks of a type run at once and at most ``threads`` in
all; a type holds at most ``limit + min(prefetch, max(limit, prefetch // busy))`` deliveries
(its running ones plus its share of the buffer; ``busy`` counts the types the last fetch that
asked for them found tasks of, so idle types take no share), and the process at most
``threads + prefetch``.

Wake-ups: worker threads sleep on ``work``, the dispatcher and stop() on ``room``. A thread is
woken only for a task no earlier wake-up covers (``sleeping`` / ``signalled``), and a thread
that takes a task while more wait wakes the next, so short tasks do not wake every thread.

The leader (``lead``, on a broker in this process: memory): when the buffer is empty and a
worker thread idles, the blocking wait for the queue (``broker.get``) is made by that thread,
not by the dispatcher (which offers it: ``lead_offered``, then waits on ``room`` while the
``leading`` thread's get is under way). A task published to an idle worker then passes one
thread hand-off (the broker wakes the leader, which runs it) instead of two (the broker wakes
the dispatcher, which wakes a thread): publish -> start p50 0.16-0.20 ms -> 0.10-0.16 ms on
memory (docs/performance.md). The leader keeps the first task it fetched and wakes threads
only for the rest; as it takes that task it offers the next wait to another idle thread, and
leaves the parked dispatcher asleep (it wakes it only when no thread can take the offer). On
SQLite and Redis (``lead_when_drained``, with a prefetch buffer) a thread leads only while the
queue is drained: from a blocking get that had to wait for its tasks (the process was idle)
until a fetch comes back with as many as it had room for. Under a backlog, and while a
pipeline's later stages trickle in, the dispatcher keeps the wait and fetches ahead in batches
(a leader there made the end-to-end no-op 6-11% slower on Redis); at 1,000 tasks/s, idle
between tasks, the leader takes out a thread hand-off (docs/performance.md has the runs).

The offer left lying (``quiet``: a Watched broker, runner.brokers.base, whose only timers are
leases; the first worker on it only, as it takes one hook): offering the next wait means waking
a thread, which costs the leader 3-15 us on its way to its task. So, while nothing in the
broker falls due by the clock alone, the leader wakes nobody: the offer stays
(``_lead_offered``, no thread ``_lead_called``) for the next thread to idle, most often the
leader itself once its task is done. A call that gives the broker something while no get waits
(a put, a retry, a hand-off, a resume) calls ``put_arrived`` once the broker's lock is free,
which wakes a sleeping thread for the offer, or, when every thread is busy, hands it back to
the dispatcher; an offer nobody took for a parked wait of GET_TIMEOUT_S goes back to the
dispatcher too (a lease that expired meanwhile is noticed within that). Publish -> start p50 on
memory 12-15 us (17-22%) lower in alternating runs. ``put_arrived`` reads ``_lead_offered`` and
``_leading`` without the lock, so they never both read False while a leader's get has ended and
its offer is not settled: each is set before the other is unset.

Carrying (``carry``, the broker's ``carry_settles``): the settles handed on while the
dispatcher is not blocked in a get wait for its next fetch, which sends them along. On a broker
that does not carry (Redis), the dispatcher hands what waited to the Settler in one go as it
fetches, so the settle's round trip and the claim's overlap (no-op tasks 3-8% faster, a
3-stage pipeline 5-9%, in alternating runs); a thread's own fetch (``prefetch: 0``) still
carries its own settle.

Guarded types (``guarded``: those with a circuit breaker, which counts outcomes as they are
settled): the slot of a finished task of such a type stays taken until the broker answered its
settle, except to the fetch that carries that settle (an exchange settles before it claims). So
no claim overtakes an outcome the circuit has not counted yet, however far the Settler lags: a
failing type starts at most ``min_calls`` + its room per process before its circuit opens
(without it, a loaded machine let 15 calls through where 13 were the bound). Other types' slots
are free as soon as their task ends.

Size: about 810 lines, over our 400, because the books are one consistent state: splitting the
counting from the waking (or the leader from both) would put the lock rules back into comments.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from runner.brokers.base import Answer, Delivery
from runner.engine.settle import Outcome

#: How long the dispatcher waits for room or a carried settle before it looks around again.
GET_TIMEOUT_S = 1.0
#: After a failed fetch, worker threads leave fetching to the dispatcher for this long.
FETCH_PAUSE_S = 0.5
#: The longest a suspect waits for the settles of finished tasks before it runs (the Settler
#: gives up on a broker that does not answer well within this).
SETTLE_WAIT_S = 15.0
#: While threads fetch for themselves, the longest a finished task's settle waits for the next
#: fetch to carry it before the dispatcher sends it (threads busy with long tasks fetch rarely).
CARRY_WAIT_S = 0.05


@dataclass(frozen=True, slots=True)
class Reservation:
    """Room promised to one fetch: per type, and in all."""

    slots: dict[str, int]
    room: int


def _came_back_drained(deliveries: Sequence[Delivery], reservation: Reservation) -> bool:
    """Whether a fetch found the queue drained: fewer deliveries than its room, and fewer of
    each type asked for than that type's slots (a busy type beside idle ones fills its own)."""
    if len(deliveries) >= reservation.room:
        return False
    found: dict[str, int] = {}
    for delivery in deliveries:
        name = delivery.task.type
        found[name] = found.get(name, 0) + 1
    return all(found.get(name, 0) < n for name, n in reservation.slots.items())


@dataclass(frozen=True, slots=True)
class Fetch:
    """A fetch to make now, without the lock: into ``reservation``, carrying ``carry``'s
    settles; ``block``: a blocking ``get`` (nothing to carry) rather than an ``exchange``."""

    reservation: Reservation
    carry: list[Outcome]
    block: bool


@dataclass(frozen=True, slots=True)
class View:
    """The books at one moment (``Books.observe``), for tests and diagnostics."""

    held: int
    running: dict[str, int]
    ready: int
    settling: int
    reserved: int
    own_fetches: int
    sleeping: int
    signalled: int
    leading: bool  # a thread waits for work in the broker's get (the leader), not asleep
    threads: int
    fetch_due: bool
    blocked_in_get: bool
    asking: frozenset[str]
    drained: bool  # a thread may lead on a broker of many processes (lead_when_drained)


class _Condition(threading.Condition):
    """A Condition whose notify does no more than check its caller holds the lock when
    nobody waits: the books notify about five times per task, nearly always with nobody
    waiting, and the Condition's own notify is several calls in Python (about 0.3 us) before
    it finds that out. Waiters join ``_waiters`` under the lock, so reading it there is
    safe."""

    def notify(self, n: int = 1) -> None:
        if self._waiters:  # type: ignore[attr-defined]
            super().notify(n)
        elif not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot notify on un-acquired lock")

    def notify_all(self) -> None:
        self.notify(len(self._waiters))  # type: ignore[attr-defined]


class Books:
    """Per-type bookkeeping of one worker; see the module docstring."""

    def __init__(
        self,
        limits: Mapping[str, int],
        threads: int,
        prefetch: int,
        stopping: threading.Event,
        submit: Callable[[Outcome], None],
        wake_broker: Callable[[], None],
        lead: bool = False,
        lead_when_drained: bool = False,
        carry: bool = True,
        guarded: frozenset[str] = frozenset(),
    ) -> None:
        self.threads = threads
        self.lead = lead
        # On a broker of many processes (SQLite, Redis), a thread leads only while the queue
        # is drained: under a backlog the dispatcher keeps fetching ahead in batches.
        self.lead_when_drained = lead_when_drained and prefetch > 0
        # The queue was found drained: a blocking get waited for its tasks, and no fetch since
        # came back with as many as it had room for.
        self._drained = False
        # Set before the worker starts: the broker's timers_idle, once a Watched broker took
        # put_arrived as its hook; while it answers True the leader's next get may wait for an
        # idle thread.
        self.quiet: Callable[[], bool] | None = None
        self.carry = carry
        # Types with a circuit breaker: the slot of a finished task stays taken until its
        # outcome reached the broker (see "Guarded types" in the module docstring).
        self._unrecorded = dict.fromkeys(guarded, 0)
        self.prefetch = prefetch
        # Without a prefetch buffer, a thread that finds nothing to run fetches for itself
        # rather than wait for the dispatcher to fetch and hand over; with one, the dispatcher
        # keeps the buffer filled in batches and the threads only take from it.
        self.threads_fetch = prefetch == 0
        self._limits = dict(limits)
        self._stopping = stopping
        self._submit = submit
        self._wake_broker = wake_broker
        # An RLock, though nothing takes it twice: a Condition checks that its caller holds
        # the lock on every notify it makes, which for a plain Lock is two calls in Python and
        # for an RLock one in C.
        self._lock = threading.RLock()
        self._work = _Condition(self._lock)  # worker threads wait for a task here
        self._room = _Condition(self._lock)  # the dispatcher and stop() wait here
        self._busy = set(self._limits)
        self._room_of = self._rooms()
        self._order = list(self._limits)
        self._ready: dict[str, deque[Delivery]] = {name: deque() for name in self._limits}
        self._ready_count = 0
        self._running = dict.fromkeys(self._limits, 0)
        self._held: dict[str, Delivery] = {}  # receipt -> delivery (prefetched or running)
        self._held_by_type = dict.fromkeys(self._limits, 0)
        self._settling: dict[str, Delivery] = {}
        self._max_unsettled = max(64, 4 * threads)  # then threads wait before taking more
        # Settles the next fetch (a thread's own, or the dispatcher's) sends along with it
        # (Broker.exchange): one round trip or transaction for both. Only while the dispatcher
        # is not blocked in a get; else the Settler.
        self._carry: list[Outcome] = []
        self._blocked_in_get = False
        self._dispatching = False  # the dispatcher runs and will take what is carried
        self._asking: frozenset[str] = frozenset()  # types in the dispatcher's get under way
        self._waiting_threads = 0
        self._sleeping = 0
        self._signalled = 0
        self._reserved_by_type = dict.fromkeys(self._limits, 0)
        self._reserved = 0
        self._fetches_begun = 0  # fetches that reserved room, and those that gave it back
        self._fetches_ended = 0
        self._fetchers = 0  # worker threads fetching for themselves right now (or leading)
        self._lead_offered = False  # the dispatcher's blocking get, for an idle thread to make
        self._lead_called = False  # a sleeping thread was woken to make it
        self._leading = False  # a worker thread makes it now
        self._parked = False  # the dispatcher waits meanwhile
        self._fetch_paused_until = 0.0
        self._suspects: set[str] = set()
        self._renewed_at: dict[str, float] = {}
        self._closing = False  # worker threads exit once they see it

    # -- the dispatcher ----------------------------------------------------------------------

    def dispatcher_started(self) -> None:
        with self._lock:
            self._dispatching = True

    def dispatch_step(self) -> Fetch | list[Outcome] | None:
        """What the dispatcher does next: a Fetch (room reserved), settles to hand to the
        Settler (carried, with no fetch to go along), or None after waiting a while."""
        with self._lock:
            if self._leading or self._lead_offered:
                if self._carry:
                    carry, self._carry = self._carry, []
                    return carry
                if not self._parked_wait() and self._lead_offered and not self._lead_called:
                    # An offer left for the next thread to idle, untaken for GET_TIMEOUT_S
                    # (a lease may have expired meanwhile): the dispatcher looks itself.
                    self._lead_offered = False
                return None
            carry, self._carry = self._carry, []
            if carry and not self.carry:  # to the Settler in one go, beside the fetch
                for outcome in carry:
                    self._submit(outcome)
                carry = []
            slots, room = self._free_room(carry)
            if slots and self._should_fetch() and not carry and self._offer_lead():
                self._parked_wait()
                return None
            if slots and self._should_fetch():
                return self._get_or_exchange(slots, room, carry)
            if carry:
                return carry
            self._room.wait(CARRY_WAIT_S if self.threads_fetch else GET_TIMEOUT_S)
            return None

    def _get_or_exchange(self, slots: dict[str, int], room: int, carry: list[Outcome]) -> Fetch:
        """The fetch the dispatcher (or the leader) makes into ``slots``/``room``: an exchange
        carrying ``carry``, or with nothing to carry the blocking get."""
        self._reserve(slots, room)
        self._asking = frozenset(slots)
        self._blocked_in_get = not carry
        self._order.append(self._order.pop(0))  # rotate: fairness when room < slots
        return Fetch(Reservation(slots, room), carry, block=not carry)

    def _parked_wait(self) -> bool:
        """The dispatcher waits while a thread makes (or is about to make) the blocking get:
        until that thread takes a task and no other idle thread can take the wait over. False
        when it waited GET_TIMEOUT_S in vain."""
        self._parked = True
        try:
            return self._room.wait(GET_TIMEOUT_S)
        finally:
            self._parked = False

    def _offer_lead(self, lazy: bool = False) -> bool:
        """Offer the blocking get to a sleeping thread (see the leader in the module docstring)
        and wake it (with ``lazy``, on a quiet Watched broker, it is left for the next thread
        to idle, or for ``put_arrived`` to wake one): only while the buffer is empty and no
        fetch is under way."""
        if (
            not (self.lead or (self.lead_when_drained and self._drained))
            or self._lead_offered
            or self._ready_count
            or self._sleeping <= self._signalled
            or self._fetches_begun != self._fetches_ended
            or self._suspects
            or self._stopping.is_set()
        ):
            return False
        self._lead_offered = True
        self._lead_called = not (lazy and self.quiet is not None and self.quiet())
        if self._lead_called:
            self._wake()
        return True

    def put_arrived(self) -> None:
        """The broker changed with no get waiting (a Watched broker's hook, called without its
        lock): an offer left for the next thread to idle goes to a sleeping thread now, or,
        when every thread is busy, back to the dispatcher."""
        if not (self._lead_offered or self._leading):  # read without the lock: see fetched
            return
        with self._lock:
            if self._lead_offered and not self._lead_called:
                self._pass_lead(lazy=False)

    def dispatcher_done(self) -> list[Outcome]:
        """The dispatcher left: what was carried for its next fetch goes to the Settler."""
        with self._lock:
            self._dispatching = False
            left, self._carry = self._carry, []
            return left

    # -- fetches (the dispatcher's and the threads' own) -------------------------------------

    def fetched(
        self,
        reservation: Reservation,
        deliveries: Sequence[Delivery],
        by_dispatcher: bool,
        lead: bool = False,
        waited: bool = False,
    ) -> None:
        """A fetch ended: give its reservation back, note which types are busy, hold what came
        and offer it to the threads (``lead``: the leader's get, whose thread takes the first
        itself; ``waited``: a blocking get that waited for its tasks)."""
        with self._lock:
            self._fetches_ended += 1
            if self._suspects:
                self._room.notify_all()  # isolate() may wait for the fetch
            self._reserved -= reservation.room
            for name, n in reservation.slots.items():
                self._reserved_by_type[name] -= n
            self._note_demand(deliveries, reservation)
            if self.lead_when_drained:  # else nothing reads it: no count per fetch
                if not _came_back_drained(deliveries, reservation):
                    self._drained = False  # a backlog: the dispatcher fetches ahead
                elif waited:
                    self._drained = True  # the queue was empty when the get asked: idle
            self._file(deliveries, wake=not lead)
            if by_dispatcher or lead:
                self._asking = frozenset()
                self._blocked_in_get = False
            if lead:
                # Its thread passes the next wait on as it takes a task (_pass_lead). Offered
                # before the leader is unset: put_arrived reads the two without the lock, and
                # must never see neither while no get waits.
                self._lead_offered = True
                self._lead_called = False
                self._leading = False

    def _reserve(self, slots: dict[str, int], room: int) -> None:
        self._fetches_begun += 1
        self._reserved += room
        for name, n in slots.items():
            self._reserved_by_type[name] += n

    def _rooms(self) -> dict[str, int]:
        """How many deliveries each type may hold: its limit plus its share of the buffer."""
        share = self.prefetch // max(1, len(self._busy))
        return {
            name: limit + min(self.prefetch, max(limit, share))
            for name, limit in self._limits.items()
        }

    def _note_demand(self, deliveries: Sequence[Delivery], reservation: Reservation) -> None:
        """Types a fetch found tasks of are busy; those it asked for and found none of, while
        it had room left, are idle. Busy types share the buffer."""
        found = {d.task.type for d in deliveries}
        busy = self._busy | found
        if len(deliveries) < reservation.room:
            busy -= reservation.slots.keys() - found
        if busy != self._busy:
            self._busy = busy
            self._room_of = self._rooms()

    def _file(self, deliveries: Sequence[Delivery], wake: bool = True) -> None:
        now = time.monotonic()
        for delivery in deliveries:
            self._held[delivery.receipt] = delivery
            self._renewed_at[delivery.receipt] = now
            self._held_by_type[delivery.task.type] += 1
            self._ready[delivery.task.type].append(delivery)
        if deliveries:
            self._ready_count += len(deliveries)
            if wake:
                self._wake()  # the threads it finds wake the others (see _pick)

    def _room_left(self) -> int:
        """How many more deliveries the process may hold: none while a suspect runs."""
        if self._suspects:
            return 0
        return self.threads + self.prefetch - len(self._held) - self._reserved

    def _free_room(self, carry: Sequence[Outcome] = ()) -> tuple[dict[str, int], int]:
        """Room for a fetch that carries ``carry``: per type, and in all."""
        room = self._room_left()
        if room <= 0:
            return {}, 0
        unrecorded = self._unrecorded_now(carry) if self._unrecorded else {}
        slots = {}
        for name in self._order:
            free = self._room_of[name] - self._held_by_type[name] - self._reserved_by_type[name]
            free -= unrecorded.get(name, 0)
            if free > 0:
                slots[name] = free
        return slots, min(room, sum(slots.values()))  # promise no more than the types can take

    def _unrecorded_now(self, carry: Sequence[Outcome]) -> dict[str, int]:
        """Per guarded type, its finished tasks whose outcome has not reached the broker and
        will not before this fetch claims (the fetch that carries one settles it first)."""
        unrecorded = dict(self._unrecorded)
        for outcome in carry:
            name = outcome.settle.delivery.task.type
            if name in unrecorded:
                unrecorded[name] -= 1
        return unrecorded

    def _settle_pending(self, done: Delivery) -> None:
        """``done`` finished and its settle was handed on: held until the broker answers."""
        self._settling[done.receipt] = done
        if done.task.type in self._unrecorded:
            self._unrecorded[done.task.type] += 1

    def _should_fetch(self) -> bool:
        """Fetch in batches: when half the buffer is free, or when a thread would starve."""
        return self._room_left() * 2 >= self.prefetch or self._waiting_threads > 0

    # -- worker threads ----------------------------------------------------------------------

    def next_task(self, done: Delivery | None, outcome: Outcome | None) -> Delivery | Fetch | None:
        """Free the slot of ``done``, hand ``outcome`` on to be settled, and take the next task
        to run, all in one step; waits while there is none. A Fetch: fetch it in this thread
        (no lock held), then call ``after_own_fetch``. None: the thread is to exit."""
        with self._lock:
            if done is not None:
                self._release_slot(done, started=True)
                if outcome is not None:
                    self._settle_pending(done)
            self._waiting_threads += 1
            return self._take(outcome, may_fetch=self.threads_fetch)

    def finished(self, done: Delivery, outcome: Outcome | None) -> None:
        """A task that ran off the worker threads (a coroutine on the event loop) ended: free
        its slot and hand ``outcome`` on to be settled, as ``next_task`` does for a thread."""
        with self._lock:
            self._release_slot(done, started=True)
            if outcome is not None:
                self._settle_pending(done)
                self._hand_on(outcome)

    def after_own_fetch(self, fetched: int | None) -> Delivery | Fetch | None:
        """This thread's own fetch ended (``fetched``: how many came, None when it failed):
        go on as ``next_task`` does."""
        with self._lock:
            self._fetchers -= 1
            if fetched is None:
                self._fetch_paused_until = time.monotonic() + FETCH_PAUSE_S
            elif fetched and self.threads_fetch and self._free_room()[0]:
                self._wake()  # threads that went idle meanwhile: the next fetch is theirs
            if self._stopping.is_set():
                self._room.notify_all()  # stop() waits for the last fetch under way
            return self._take(None, may_fetch=False)  # until woken: the queue may be empty

    def own_fetch_abandoned(self) -> None:
        """This thread's own fetch raised past the fetcher (it is leaving the loop)."""
        with self._lock:
            self._fetchers -= 1
            self._waiting_threads -= 1
            self._room.notify_all()

    def _take(self, outcome: Outcome | None, may_fetch: bool) -> Delivery | Fetch | None:
        """The loop of ``next_task``: counted in ``_waiting_threads`` until it returns a task
        or None (a Fetch leaves it counted: the thread is still waiting for work)."""
        while True:
            if self._closing:
                self._hand_on(outcome)
                self._waiting_threads -= 1
                return None
            # While the Settler is behind, wait for it (it notifies _work).
            behind = len(self._settling) >= self._max_unsettled
            if not self._stopping.is_set() and not behind:
                delivery = self._pick()
                if delivery is not None:
                    if self.lead or self.lead_when_drained:
                        self._pass_lead(lazy=True)
                    self._hand_on(outcome)
                    self._waiting_threads -= 1
                    return delivery
                if self._lead_offered and (fetch := self._lead(outcome)) is not None:
                    return fetch
                if may_fetch and (fetch := self._own_fetch(outcome)) is not None:
                    return fetch
                if self._dispatcher_needed(may_fetch):
                    self._room.notify()  # a thread is about to idle: fetch anyway
            self._hand_on(outcome)
            outcome = None
            self._sleeping += 1
            try:
                self._work.wait()
            finally:
                self._sleeping -= 1
                self._signalled = max(0, self._signalled - 1)
            may_fetch = self.threads_fetch

    def _own_fetch(self, outcome: Outcome | None) -> Fetch | None:
        """A fetch for this idle thread (and any other idle ones), carrying ``outcome`` and
        the other waiting settles: no hand-off to the dispatcher and back. One such fetch at a
        time: threads that go idle meanwhile leave their settles to the next one, which fetches
        for them all. None when another is under way, there is no room to fetch into, or
        fetches failed a moment ago."""
        if self._fetchers:
            return None
        carry = self._carry if outcome is None else [*self._carry, outcome]
        slots, room = self._free_room(carry)
        if not slots or time.monotonic() < self._fetch_paused_until:
            return None
        self._carry = []
        self._reserve(slots, room)
        self._fetchers += 1
        return Fetch(Reservation(slots, room), carry, block=False)

    def _lead(self, outcome: Outcome | None) -> Fetch | None:
        """The blocking get the dispatcher offered, for this thread to make (the leader): None
        when there is no room to fetch into any more (the dispatcher looks again)."""
        self._lead_called = False
        slots, room = self._free_room()
        if not slots:
            self._lead_offered = False
            self._room.notify_all()
            return None
        fetch = self._get_or_exchange(slots, room, [])  # the blocking get
        self._leading = True  # before the offer is unset (see fetched)
        self._lead_offered = False
        self._fetchers += 1
        self._hand_on(outcome)  # to the Settler: nothing is carried by a blocking get
        return fetch

    def _pass_lead(self, lazy: bool) -> None:
        """The blocking get goes to another idle thread, else to the dispatcher: from a thread
        with work, which does not make it, or (not ``lazy``) from ``put_arrived``. With
        ``lazy``, on a quiet Watched broker the offer is not sent (a wake-up costs the thread
        that sends it 3-15 us, on the way to its task): the next thread to idle takes it (often
        this one, its task done), or ``put_arrived`` wakes one for a task that arrives before
        that."""
        self._lead_offered = False
        if not self._offer_lead(lazy) and self._parked:
            self._room.notify_all()

    def _dispatcher_needed(self, may_fetch: bool) -> bool:
        """Whether a thread about to idle should wake the dispatcher. Threads that fetch for
        themselves leave it the blocking wait for an empty queue: needed once this thread's own
        fetch found nothing, or fetching failed a moment ago; not while another thread's fetch
        is under way (which wakes a thread for the next one if it found tasks, or the
        dispatcher if it found none)."""
        if not self.threads_fetch or not may_fetch:
            return True
        return time.monotonic() < self._fetch_paused_until

    def _hand_on(self, outcome: Outcome | None) -> None:
        """Pass a finished task's settle to the dispatcher's next fetch or the Settler."""
        if outcome is None:
            return
        if not self._dispatching or self._blocked_in_get or self._stopping.is_set():
            self._submit(outcome)
            return
        self._carry.append(outcome)
        # Sent with the next fetch: a thread's own (then the dispatcher need not wake; it
        # looks every CARRY_WAIT_S while threads fetch), or the dispatcher's.
        if not self.threads_fetch:
            self._room.notify_all()

    def _pick(self) -> Delivery | None:
        """The oldest prefetched task of the first type below its limit. None while a task
        handed out again after its lease expired runs (see ``isolate``)."""
        if self._suspects:
            return None
        for name in self._order:
            queue = self._ready[name]
            if queue and self._running[name] < self._limits[name]:
                self._running[name] += 1
                if queue[0].redelivered:
                    self._suspects.add(queue[0].receipt)  # nothing else starts until it ends
                if (
                    not self.threads_fetch
                    and not self._parked  # _take offers the lead or wakes it
                    and self._waiting_threads > 1
                    and self._should_fetch()
                ):
                    self._room.notify()  # refill the buffer
                self._ready_count -= 1
                if self._ready_count > self._signalled:
                    self._wake()  # more wait than threads on their way: wake the next
                return queue.popleft()
        return None

    def _wake(self) -> None:
        """Wake one sleeping thread that no earlier wake-up reached yet."""
        if self._sleeping > self._signalled:
            self._signalled += 1
            self._work.notify()

    def _wake_all(self) -> None:
        self._signalled = self._sleeping
        self._work.notify_all()

    # -- settles, hand-backs and suspects ----------------------------------------------------

    def settled(self, outcomes: Sequence[Outcome]) -> None:
        """The Settler's thread answered (and reported) ``outcomes``: drop them from the books."""
        with self._lock:
            behind = len(self._settling) >= self._max_unsettled
            recorded: set[str] = set()
            for outcome in outcomes:
                delivery = self._settling.pop(outcome.settle.delivery.receipt, None)
                if delivery is not None and delivery.task.type in self._unrecorded:
                    self._unrecorded[delivery.task.type] -= 1
                    recorded.add(delivery.task.type)
            if recorded:  # their slots are free now: whoever fetches looks again
                self._room.notify_all()
                if self._asking and not recorded <= self._asking:
                    self._wake_broker()
            if behind:
                self._wake_all()
            if not self._settling and (self._stopping.is_set() or self._suspects):
                self._room.notify_all()  # stop() or isolate() may wait for the last of them

    def forget(self, delivery: Delivery, started: bool) -> None:
        """Drop a delivery handed back (or settled outside ``next_task``) from the books."""
        with self._lock:
            self._release_slot(delivery, started)

    def take_unstarted(self) -> list[Delivery]:
        """Every prefetched delivery no thread has taken yet, out of the ready queues (still
        held: the caller hands them back, then ``forget``s each)."""
        with self._lock:
            return self._take_unstarted()

    def isolate(self) -> list[Delivery]:
        """Before a suspect runs (``_pick`` made it one): once the fetches under way have
        ended and every finished task's settle has been answered (a suspect may kill the
        process: a healthy task whose ack was still on its way would run again), take every
        fetched task not yet started, to be handed back (other suspects among them keep their
        redelivered flag, so each runs alone in turn). Until the suspect ends nothing is
        fetched (``_room_left``) and nothing else starts (``_pick``)."""
        with self._lock:
            under_way = self._fetches_begun
            if self._fetches_ended < under_way:
                self._wake_broker()  # a blocked get returns at once
                self._room.wait_for(
                    lambda: self._fetches_ended >= under_way, timeout=GET_TIMEOUT_S + 5
                )
            # Settles waiting for a fetch to carry them would wait for the suspect (nothing is
            # fetched while it runs): they go to the Settler now.
            carried, self._carry = self._carry, []
            for outcome in carried:
                self._submit(outcome)
            self._room.wait_for(lambda: not self._settling, timeout=SETTLE_WAIT_S)
            return self._take_unstarted()

    def _take_unstarted(self) -> list[Delivery]:
        unstarted = [d for queue in self._ready.values() for d in queue]
        for queue in self._ready.values():
            queue.clear()
        self._ready_count = 0
        return unstarted

    def _release_slot(self, delivery: Delivery, started: bool) -> None:
        """Drop a delivery from the books and wake whoever can use its room."""
        if self._held.pop(delivery.receipt, None) is None:
            return
        self._renewed_at.pop(delivery.receipt, None)
        name = delivery.task.type
        self._held_by_type[name] -= 1
        if self._suspects:
            self._suspects.discard(delivery.receipt)
            if not self._suspects:
                self._wake_all()  # threads that found nothing they could start look again
        if started:
            self._running[name] -= 1
            if self._ready[name]:
                self._wake()  # a task of this type may have waited for this slot
        # Without prefetch the thread that freed the slot fetches for itself (or wakes the
        # dispatcher before it idles); with it, the dispatcher refills the buffer in batches,
        # but not while a thread leads or the offer to lead stands (it would only park again).
        if self._stopping.is_set() or (
            self.prefetch and self._should_fetch() and not (self._leading or self._lead_offered)
        ):
            self._room.notify_all()
        if self._asking and name not in self._asking:
            self._wake_broker()  # the get under way could not take this type: ask again

    # -- leases ------------------------------------------------------------------------------

    def held_now(self) -> list[Delivery]:
        """Every delivery whose lease must be kept: prefetched, running or being settled."""
        with self._lock:
            return [*self._held.values(), *self._settling.values()]

    def renewed(
        self, deliveries: Sequence[Delivery], answers: Sequence[Answer], asked: float
    ) -> list[Delivery]:
        """The broker answered a renewal asked at ``asked``: note the leases known good, drop
        unstarted deliveries it refused (FENCED) unrun. Returns those dropped: a refused one
        that is running (or waiting for its settle) is reported once, by its settle, which
        the broker refuses too (reporting the renewal as well counted one loss twice, or once
        per renewal while the task ran on)."""
        lost: list[Delivery] = []
        with self._lock:
            for delivery, answer in zip(deliveries, answers, strict=True):
                if answer is Answer.DONE and delivery.receipt in self._renewed_at:
                    self._renewed_at[delivery.receipt] = asked
                elif answer is Answer.FENCED:
                    queue = self._ready[delivery.task.type]
                    if delivery in queue:  # prefetched, never started: drop it unrun
                        queue.remove(delivery)
                        self._ready_count -= 1
                        self._release_slot(delivery, started=False)
                        lost.append(delivery)
        return lost

    def renewed_at(self, delivery: Delivery) -> float | None:
        """When ``delivery``'s lease was last known good (monotonic), None if not held.

        Read without the lock: it runs before every task starts, and one dict read is atomic;
        a value a moment old only makes the caller ask the broker when it need not have."""
        return self._renewed_at.get(delivery.receipt)

    # -- stopping ----------------------------------------------------------------------------

    def stop_requested(self) -> None:
        """``stopping`` was just set: whoever waits for room looks again."""
        with self._lock:
            self._room.notify_all()

    def wait_fetches_done(self, timeout: float) -> None:
        """Wait until no thread fetches for itself (they do not block, and stop soon)."""
        with self._lock:
            self._room.wait_for(lambda: not self._fetchers, timeout=timeout)

    def wait_released(self, deadline: float) -> int:
        """Wait until nothing is held or ``deadline`` (monotonic); how many are still held."""
        with self._lock:
            while self._held and time.monotonic() < deadline:
                self._room.wait(timeout=max(0.0, deadline - time.monotonic()))
            return len(self._held)

    def close(self) -> None:
        """Worker threads exit (each hands on its last settle first)."""
        with self._lock:
            self._closing = True
            self._wake_all()

    # -- what the books say ------------------------------------------------------------------

    def running(self) -> dict[str, int]:
        with self._lock:
            return dict(self._running)

    def idle(self) -> bool:
        with self._lock:
            return not self._held and not self._settling

    @contextmanager
    def observe(self) -> Iterator[View]:
        """The books at one moment, held still while the caller looks elsewhere too (brokers
        never take this lock, so asking one inside is safe). For tests and diagnostics."""
        with self._lock:
            slots, _ = self._free_room()
            yield View(
                held=len(self._held),
                running=dict(self._running),
                ready=self._ready_count,
                settling=len(self._settling),
                reserved=self._reserved,
                own_fetches=self._fetchers,
                sleeping=self._sleeping,
                signalled=self._signalled,
                leading=self._leading,
                threads=self.threads,
                fetch_due=bool(slots) and self._should_fetch(),
                blocked_in_get=self._blocked_in_get,
                asking=self._asking,
                drained=self._drained,
            )
