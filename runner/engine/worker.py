"""The worker: scheduling tasks from one broker onto threads the runner owns.

One dispatcher thread asks the broker only for types with room (so a saturated type never
stalls the others) and keeps a small local buffer of prefetched deliveries per type, so worker
threads rarely wait for it and the broker can hand out tasks in batches. Worker threads take
the next task of a type whose running count is below its limit, run it (runner.engine.attempt),
hand its broker call on (runner.engine.settle: made inline on the memory broker; on durable ones
sent along with the next fetch, or by the Settler's thread) and take the next one in the same
lock round.
Without a prefetch buffer (``prefetch: 0``), a thread that finds nothing to run
fetches for itself (``Broker.exchange``, carrying the finished tasks' settles): no hand-off to
the dispatcher and back. One thread fetches at a time; threads that go idle meanwhile leave
their settles to the next fetch, which fetches for them all. Every fetch first reserves the
room it asks for, so fetches under way at once (a thread's and the dispatcher's) never ask for
the same room twice; the dispatcher keeps the blocking wait for an empty queue. A lease
keeper renews the lease of every held delivery (prefetched, running or settling) every
visibility_timeout / 3; a watchdog enforces deadlines (runner.engine.timeouts).

Limits, precisely: at most ``limit`` tasks of a type run at once and at most ``threads`` in
all; a type holds at most ``limit + min(prefetch, max(limit, prefetch // busy))`` deliveries
(its running ones plus its share of the buffer; ``busy`` counts the types the last fetch that
asked for them found tasks of, so idle types take no share), and the process at most
``threads + prefetch``. Prefetched deliveries have been handed out (their attempt counts) but
not started; shutdown hands them back at once. A crash cannot hand them back, so a crashing
worker uses up an attempt of each: that is why the buffer is shallow on durable brokers
(PipelineConfig.effective_prefetch), and why a task handed out again after its lease expired
(its last worker may have died of it) runs alone: nothing fetched and unstarted beside it, and
no other task starts while it runs (``_isolate``), so a task that kills its process costs a
healthy task at most one attempt per crash, and only when it was fetched with it the first time.

A process frozen past its leases (SIGSTOP, a VM pause) must not start, once thawed, prefetched
tasks another worker ran meanwhile: a task whose lease was last known good more than half a
lease ago is checked with the broker before it starts, and dropped unrun if the lease moved on
(``_lease_lapsed``). A renewal the broker answers FENCED drops an unstarted task the same way.

Size: about 700 lines, over our 500: one Worker class owns the dispatcher, the worker
threads, the lease keeper and the per-type books under one lock. Issue 15 splits it into
engine/ parts (bookkeeping, dispatch, leases, lifecycle), each with its own tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

from runner.brokers.base import Answer, Broker, Delivery, Settle
from runner.engine.attempt import (
    Attempts,
    TaskLogger,
    TypeRuntime,
    default_task_logger,
    type_logger,
    worker_identity,
)
from runner.engine.settle import Outcome, Settler
from runner.engine.timeouts import Guard, Watchdog
from runner.errors import BrokerClosed, BrokerError, TaskInterrupted
from runner.events import Event, EventBus

__all__ = ["GET_TIMEOUT_S", "TaskLogger", "TypeRuntime", "Worker", "worker_identity"]

log = logging.getLogger("runner.worker")

#: How long the dispatcher blocks in one broker.get before it looks around again.
GET_TIMEOUT_S = 1.0
#: After the grace period, how long stop() waits in all for interrupted handlers to return and
#: for its threads to end.
FORCED_WAIT_S = 1.0
#: How long stop() waits for the Settler to send the last finished tasks' broker calls.
SETTLE_DRAIN_S = 10.0
#: After a failed fetch, worker threads leave fetching to the dispatcher for this long.
FETCH_PAUSE_S = 0.5
#: While threads fetch for themselves, the longest a finished task's settle waits for the next
#: fetch to carry it before the dispatcher sends it (threads busy with long tasks fetch rarely).
CARRY_WAIT_S = 0.05


class Worker:
    """Runs tasks from one broker on ``threads`` threads with per-type limits."""

    def __init__(
        self,
        broker: Broker,
        types: Mapping[str, TypeRuntime],
        threads: int,
        events: EventBus,
        visibility_timeout_s: float,
        task_logger: TaskLogger = default_task_logger,
        prefetch: int | None = None,
        settle_in_background: bool = False,
    ) -> None:
        self.broker = broker
        self.types = dict(types)
        self.threads = threads
        self.events = events
        self.identity = worker_identity()
        self._renew_every_s = visibility_timeout_s / 3
        self._prefetch = threads if prefetch is None else prefetch
        # A type may prefetch its fair share of the buffer, or as many as its limit if that is
        # more: a slow type cannot fill the buffer and starve the others. The buffer is shared
        # among the busy types (those the last fetch that asked for them found tasks of), so
        # idle types do not shrink a busy type's share (which would make it fetch one task per
        # freed slot instead of in batches).
        self._busy = set(self.types)
        self._room_of = self._rooms()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # worker threads wait for a task here
        self._room = threading.Condition(self._lock)  # the dispatcher and stop() wait here
        self._ready: dict[str, deque[Delivery]] = {name: deque() for name in self.types}
        self._running_by_type = dict.fromkeys(self.types, 0)
        self._held: dict[str, Delivery] = {}  # receipt -> delivery (prefetched or running)
        self._held_by_type = dict.fromkeys(self.types, 0)
        # Finished, their broker call handed to the Settler and not yet answered. No longer
        # counted against any room, but still held: leases renewed, stop() waits for them.
        self._settling: dict[str, Delivery] = {}
        self._max_unsettled = max(64, 4 * threads)  # then threads wait before taking more
        # Settles the next fetch (a thread's own, or the dispatcher's) sends along with it
        # (Broker.exchange): one round trip or transaction for both. Only while the dispatcher
        # is not blocked in a get; else the Settler.
        self._carry: list[Outcome] = []
        self._blocked_in_get = False
        self._dispatching = False  # the dispatcher runs and will take what is carried
        self._waiting_threads = 0
        # Threads asleep for a task, and how many of them were woken and are not back yet: a
        # wake-up goes only to a task no earlier one covers, and a thread that takes a task
        # while more wait wakes the next (so short tasks do not wake every thread each time).
        self._sleeping = 0
        self._signalled = 0
        self._ready_count = 0
        # Room promised to the fetches under way (the dispatcher's, and those of idle worker
        # threads fetching for themselves): counted as held, so that fetches running at the
        # same time never ask for the same room twice.
        self._reserved_by_type = dict.fromkeys(self.types, 0)
        self._reserved = 0
        # Without a prefetch buffer, a thread that finds nothing to run fetches for itself
        # rather than wait for the dispatcher to fetch and hand over; with one, the dispatcher
        # keeps the buffer filled in batches and the threads only take from it.
        self._threads_fetch = self._prefetch == 0
        self._fetchers = 0  # worker threads fetching for themselves right now
        # Receipts of running tasks that were handed out again after a lease expired (their
        # last worker may have died of them): while any runs, nothing is fetched and no other
        # task starts.
        self._suspects: set[str] = set()
        # When each held delivery's lease was last known good (fetched or renewed; monotonic,
        # which runs on while the process is stopped): one older than half the lease is checked
        # with the broker before it starts (the process may have been frozen past its lease,
        # and another worker may have run the task meanwhile).
        self._renewed_at: dict[str, float] = {}
        self._visibility_timeout_s = visibility_timeout_s
        self._fetches_begun = 0  # fetches that reserved room, and those that gave it back
        self._fetches_ended = 0
        self._fetch_paused_until = 0.0  # after a failed fetch, threads leave it to the dispatcher
        self._asking: frozenset[str] = frozenset()  # types in the broker.get under way
        self._order = list(self.types)
        self._stopping = threading.Event()
        self._closing = False  # worker threads exit once they see it
        self._watchdog = Watchdog(horizon_s=min(rt.timeout_s for rt in self.types.values()))
        self.attempts = Attempts(self.types, events, self._watchdog, task_logger)
        self._settler = Settler(
            broker, self.attempts.settled, settle_in_background, batch_done=self._settled
        )
        self._threads: list[threading.Thread] = []
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="dq-dispatcher", daemon=True
        )
        self._lease_keeper = threading.Thread(
            target=self._keep_leases, name="dq-leases", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for name in self.types:
            type_logger(name)  # warm: handler code must never be first to call getLogger
        self._watchdog.start()
        self._settler.start()
        for i in range(self.threads):
            t = threading.Thread(target=self._work_loop, name=f"dq-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._dispatching = True
        self._dispatcher.start()
        self._lease_keeper.start()
        self.events.emit(Event("worker.started", detail=f"{self.identity} threads={self.threads}"))

    def stop(self, grace_s: float) -> int:
        """Stop taking tasks, release unstarted ones, give running handlers ``grace_s``.

        Handlers still running after the grace period are cancelled and interrupted; their
        tasks are released back to the broker as they return. One that does not return within
        FORCED_WAIT_S (blocked in a C call) is left to its daemon thread, its task leased
        until the lease expires. Returns how many had to be interrupted.
        """
        if self._stopping.is_set() or not self._dispatcher.is_alive():
            return 0
        self.events.emit(Event("worker.stopping", detail=f"grace={grace_s}s"))
        deadline = time.monotonic() + grace_s
        self._stopping.set()
        self.broker.wake()
        with self._lock:
            self._room.notify_all()
        # The dispatcher leaves within one broker.get, and the threads' own fetches (which do
        # not block) end; after that nothing new arrives locally.
        self._dispatcher.join(timeout=GET_TIMEOUT_S + 5)
        with self._lock:
            self._room.wait_for(lambda: not self._fetchers, timeout=GET_TIMEOUT_S + 5)
        self._release_unstarted()
        with self._lock:
            while self._held and time.monotonic() < deadline:
                self._room.wait(timeout=max(0.0, deadline - time.monotonic()))
            forced = len(self._held)
        # Interrupted handlers get FORCED_WAIT_S, in all, to return; one blocked in a C call
        # keeps its thread (a daemon) and its task stays leased: it comes back once the
        # lease expires. The process does not wait for it.
        after_grace = time.monotonic() + FORCED_WAIT_S
        if forced:
            self.attempts.forcing = True
            self._watchdog.expire_all()
            with self._lock:
                self._room.wait_for(lambda: not self._held, timeout=FORCED_WAIT_S)
        self._settler.stop(timeout=SETTLE_DRAIN_S)
        with self._lock:
            self._closing = True
            self._wake_all()
        joined_by = max(after_grace, time.monotonic() + 0.5)
        for t in (*self._threads, self._lease_keeper):
            t.join(timeout=max(0.0, joined_by - time.monotonic()))
        self._watchdog.stop()
        self.events.emit(Event("worker.stopped", detail=f"forced={forced}"))
        return forced

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def interrupts(self) -> int:
        return self.attempts.interrupts

    @property
    def overruns(self) -> int:
        return self.attempts.overruns

    def inflight(self) -> dict[str, int]:
        """Tasks running now, per type."""
        with self._lock:
            return dict(self._running_by_type)

    def limits(self) -> dict[str, int]:
        return {name: rt.limit for name, rt in self.types.items()}

    def overrunning(self) -> int:
        """Handlers reported as overruns that still hold their thread."""
        return self.attempts.overrunning()

    def alive_threads(self) -> int:
        """Worker threads still alive (never fewer than ``threads`` while running)."""
        return sum(1 for t in self._threads if t.is_alive())

    def idle(self) -> bool:
        with self._lock:
            return not self._held and not self._settling

    # -- dispatcher ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            self._dispatch_loop()
        finally:
            with self._lock:
                self._dispatching = False
                left, self._carry = self._carry, []
            for outcome in left:
                self._settler.submit(outcome)

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                slots, room = self._free_room()
                carry, self._carry = self._carry, []
                fetch = bool(slots) and self._should_fetch()
                if fetch:
                    self._reserve(slots, room)
                    self._asking = frozenset(slots)
                    self._blocked_in_get = not carry
                    self._order.append(self._order.pop(0))  # rotate: fairness when room < slots
                elif not carry:
                    self._room.wait(CARRY_WAIT_S if self._threads_fetch else GET_TIMEOUT_S)
                    continue
            if not fetch:
                for outcome in carry:
                    self._settler.submit(outcome)
                continue
            try:
                fetched = self._fetch(slots, room, carry, block=not carry)
            except BrokerClosed:
                return
            finally:
                self._asking = frozenset()
                self._blocked_in_get = False
            if fetched is None:
                self._stopping.wait(0.5)

    def _fetch(
        self, slots: dict[str, int], room: int, carry: list[Outcome], block: bool
    ) -> int | None:
        """Fetch into the reserved ``slots`` / ``room`` (lock not held): ``broker.get`` when
        ``block``, else ``broker.exchange`` (which carries ``carry``'s settles and does not
        block). Files what came for the threads and gives the reservation back. Returns how
        many came, None when the broker call failed (logged); raises BrokerClosed."""
        deliveries: list[Delivery] = []
        call = "get" if block else "exchange"
        try:
            if block:
                deliveries = self.broker.get(slots, room, GET_TIMEOUT_S)
                return len(deliveries)
            try:
                answers, deliveries = self.broker.exchange([o.settle for o in carry], slots, room)
            except Exception:
                for outcome in carry:
                    self._settler.submit(outcome)  # tried again there (settles are fenced)
                raise
            self._settler.report(carry, answers)
            return len(deliveries)
        except BrokerClosed:
            raise
        except BrokerError as exc:
            log.warning("broker.%s failed: %s", call, exc)
            return None
        except Exception:
            # Not a broker error the broker knew to wrap (a bug, or a backend error it did
            # not expect): no fetching thread may die of it, or the worker stops consuming.
            log.exception("broker.%s failed; the worker continues", call)
            return None
        finally:
            with self._lock:
                self._unreserve(slots, room)
                self._note_demand(deliveries, slots, room)
                self._file(deliveries)

    def _reserve(self, slots: dict[str, int], room: int) -> None:
        """Promise ``slots`` / ``room`` to a fetch about to start (lock held)."""
        self._fetches_begun += 1
        self._reserved += room
        for name, n in slots.items():
            self._reserved_by_type[name] += n

    def _unreserve(self, slots: dict[str, int], room: int) -> None:
        self._fetches_ended += 1
        if self._suspects:
            self._room.notify_all()  # _isolate may wait for the fetch
        self._reserved -= room
        for name, n in slots.items():
            self._reserved_by_type[name] -= n

    def _rooms(self) -> dict[str, int]:
        """How many deliveries each type may hold: its limit plus its share of the buffer."""
        share = self._prefetch // max(1, len(self._busy))
        return {
            name: rt.limit + min(self._prefetch, max(rt.limit, share))
            for name, rt in self.types.items()
        }

    def _note_demand(self, deliveries: list[Delivery], slots: dict[str, int], room: int) -> None:
        """Types a fetch found tasks of are busy; those it asked for and found none of, while
        it had room left, are idle (lock held). Busy types share the buffer."""
        busy = self._busy | {d.task.type for d in deliveries}
        if len(deliveries) < room:
            busy -= slots.keys() - {d.task.type for d in deliveries}
        if busy != self._busy:
            self._busy = busy
            self._room_of = self._rooms()

    def _file(self, deliveries: list[Delivery]) -> None:
        """Hold fetched deliveries and offer them to the threads (lock held)."""
        now = time.monotonic()
        for delivery in deliveries:
            self._held[delivery.receipt] = delivery
            self._renewed_at[delivery.receipt] = now
            self._held_by_type[delivery.task.type] += 1
            self._ready[delivery.task.type].append(delivery)
        if deliveries:
            self._ready_count += len(deliveries)
            self._wake()  # the threads it finds wake the others (see _pick)

    def _room_left(self) -> int:
        """How many more deliveries the process may hold (lock held): none while a suspect
        runs."""
        if self._suspects:
            return 0
        return self.threads + self._prefetch - len(self._held) - self._reserved

    def _free_room(self) -> tuple[dict[str, int], int]:
        """Per-type room and room in all for more deliveries (lock held)."""
        room = self._room_left()
        if room <= 0:
            return {}, 0
        slots = {}
        for name in self._order:
            free = self._room_of[name] - self._held_by_type[name] - self._reserved_by_type[name]
            if free > 0:
                slots[name] = free
        return slots, min(room, sum(slots.values()))  # promise no more than the types can take

    def _should_fetch(self) -> bool:
        """Fetch in batches: when half the buffer is free, or when a thread would starve."""
        return self._room_left() * 2 >= self._prefetch or self._waiting_threads > 0

    def _release_unstarted(self) -> None:
        with self._lock:
            unstarted = self._take_unstarted()
        self._hand_back(unstarted)

    def _take_unstarted(self) -> list[Delivery]:
        """Every prefetched delivery no thread has taken yet, out of the ready queues (lock
        held)."""
        unstarted = [d for queue in self._ready.values() for d in queue]
        for queue in self._ready.values():
            queue.clear()
        self._ready_count = 0
        return unstarted

    def _hand_back(self, unstarted: list[Delivery]) -> None:
        """Release unstarted deliveries to the broker (their attempt is given back)."""
        if not unstarted:
            return
        self._settler.call([Settle(delivery, "release") for delivery in unstarted])
        for delivery in unstarted:
            self._forget(delivery, started=False)

    def _isolate(self) -> None:
        """Before running a task handed out again after its lease expired (its last worker may
        have died of it, and may die again; ``_pick`` made it a suspect): hand back every
        fetched task not yet started, whose attempt a crash would use up too (other suspects
        fetched in the same batch among them: release keeps their redelivered flag, so each
        runs alone in turn), once the fetches under way have ended. Until it ends, nothing is
        fetched (``_room_left``) and no other task starts (``_pick``)."""
        with self._lock:
            under_way = self._fetches_begun
            if self._fetches_ended < under_way:
                self.broker.wake()  # a blocked get returns at once
                self._room.wait_for(
                    lambda: self._fetches_ended >= under_way, timeout=GET_TIMEOUT_S + 5
                )
            unstarted = self._take_unstarted()
        self._hand_back(unstarted)

    def _keep_leases(self) -> None:
        while not self._stopping.wait(self._renew_every_s):
            with self._lock:
                held = [*self._held.values(), *self._settling.values()]
            if held:
                self._renew(held)

    def _renew(self, held: list[Delivery]) -> list[Answer] | None:
        """Extend the leases of ``held``; a delivery whose lease another delivery now owns
        (FENCED) is dropped unrun if it has not started, and reported. ALREADY_DONE (its
        settle went through meanwhile) is no loss. None when the broker failed (logged)."""
        asked = time.monotonic()
        try:
            answers = self.broker.extend(held)
        except BrokerError as exc:
            log.warning("lease renewal failed: %s", exc)
            return None
        lost: list[Delivery] = []
        with self._lock:
            for delivery, answer in zip(held, answers, strict=True):
                if answer is Answer.DONE and delivery.receipt in self._renewed_at:
                    self._renewed_at[delivery.receipt] = asked
                elif answer is Answer.FENCED:
                    lost.append(delivery)
                    queue = self._ready[delivery.task.type]
                    if delivery in queue:  # prefetched, never started: drop it unrun
                        queue.remove(delivery)
                        self._ready_count -= 1
                        self._release_slot(delivery, started=False)
        for delivery in lost:
            task = delivery.task
            self.events.emit(
                Event("task.lease_lost", task_id=task.id, type=task.type,
                      attempt=task.attempt, detail="extend refused")
            )  # fmt: skip
        return answers

    def _lease_lapsed(self, delivery: Delivery) -> bool:
        """Whether a task about to start may no longer be ours: if its lease was last known
        good more than half a lease ago (the process was frozen, or the renewals failed), ask
        the broker first. Lost (FENCED): it must not run (another worker may have run it)."""
        renewed = self._renewed_at.get(delivery.receipt)
        if renewed is None or time.monotonic() - renewed < self._visibility_timeout_s / 2:
            return False
        answers = self._renew([delivery])
        return answers is not None and answers[0] is Answer.FENCED

    # -- worker threads --------------------------------------------------------------------

    def _work_loop(self) -> None:
        guard = Guard(self._watchdog)
        guard.bind()
        done: Delivery | None = None
        outcome: Outcome | None = None  # done's broker call, to be settled in the background
        while True:
            delivery: Delivery | None = None
            try:
                delivery = self._next(done, outcome)
                done = outcome = None
                if delivery is None:
                    return
                ended = self._start(guard, delivery)
                if ended is None:
                    pass  # dropped unrun: the lease had moved on
                elif self._settler.background:
                    outcome = ended
                else:
                    self._settler.settle_now(ended)
            except TaskInterrupted:
                # Guard.run absorbs late interrupts; this is the last line of defence, so that
                # a worker thread is never lost (Dramatiq #445).
                log.warning("interrupt landed outside a handler; worker thread continues")
            except BaseException:
                # Whatever escapes (a bug, a handler's BaseException raised outside the
                # attempt), the thread lives on: a dead thread would hold its task forever.
                log.exception("worker loop error; worker thread continues")
            # Settled, handed to the Settler, or failed before its broker call (then the broker
            # hands the task out again when its lease expires): its slot is freed with the next
            # pick.
            done = delivery

    def _start(self, guard: Guard, delivery: Delivery) -> Outcome | None:
        """Run a picked delivery; None when it must not run (its lease lapsed and moved on)."""
        if self._lease_lapsed(delivery):
            return None
        if delivery.redelivered:
            self._isolate()
        return self.attempts.run(guard, delivery)

    def _next(self, done: Delivery | None, outcome: Outcome | None) -> Delivery | None:
        """Free the slot of ``done``, hand ``outcome`` on to be settled, and take the next task
        to run, in one lock round; with nothing to take but room to fetch, fetch it here."""
        with self._lock:
            if done is not None:
                self._release_slot(done, started=True)
                if outcome is not None:
                    self._settling[done.receipt] = done
            may_fetch = self._threads_fetch
            self._waiting_threads += 1
            try:
                while True:
                    if self._closing:
                        self._hand_on(outcome)
                        return None
                    # While the Settler is behind, wait for it (it notifies _work).
                    behind = len(self._settling) >= self._max_unsettled
                    if not self._stopping.is_set() and not behind:
                        delivery = self._pick()
                        if delivery is not None:
                            self._hand_on(outcome)
                            return delivery
                        if may_fetch and self._fetch_here(outcome):
                            outcome = None  # it went along with the fetch
                            may_fetch = False  # until woken: the queue may be empty
                            continue
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
                    may_fetch = self._threads_fetch
            finally:
                self._waiting_threads -= 1

    def _dispatcher_needed(self, may_fetch: bool) -> bool:
        """Whether a thread about to idle should wake the dispatcher (lock held). Threads that
        fetch for themselves leave it the blocking wait for an empty queue: needed once this
        thread's own fetch found nothing, or fetching failed a moment ago; not while another
        thread's fetch is under way (which wakes a thread for the next one if it found tasks,
        or the dispatcher if it found none)."""
        if not self._threads_fetch or not may_fetch:
            return True
        return time.monotonic() < self._fetch_paused_until

    def _hand_on(self, outcome: Outcome | None) -> None:
        """Pass a finished task's settle to the dispatcher's next fetch or the Settler (lock
        held)."""
        if outcome is None:
            return
        if not self._dispatching or self._blocked_in_get or self._stopping.is_set():
            self._settler.submit(outcome)
            return
        self._carry.append(outcome)
        # Sent with the next fetch: a thread's own (then the dispatcher need not wake; it
        # looks every CARRY_WAIT_S while threads fetch), or the dispatcher's.
        if not self._threads_fetch:
            self._room.notify_all()

    def _fetch_here(self, outcome: Outcome | None) -> bool:
        """Fetch for this idle thread (and any other idle ones) in this thread, carrying
        ``outcome`` and the other waiting settles: no hand-off to the dispatcher and back
        (lock held; released during the broker call). One such fetch at a time: threads that
        go idle meanwhile leave their settles to the next one, which fetches for them all (a
        transaction or round trip per batch, not per task). False when another fetch is under
        way, there is no room to fetch into, or fetches failed a moment ago."""
        if self._fetchers:
            return False
        slots, room = self._free_room()
        if not slots or time.monotonic() < self._fetch_paused_until:
            return False
        carry, self._carry = self._carry, []
        if outcome is not None:
            carry.append(outcome)
        self._reserve(slots, room)
        self._fetchers += 1
        self._lock.release()
        fetched: int | None = None
        try:
            fetched = self._fetch(slots, room, carry, block=False)
        except BrokerClosed:
            pass
        finally:
            self._lock.acquire()
            self._fetchers -= 1
            if fetched is None:
                self._fetch_paused_until = time.monotonic() + FETCH_PAUSE_S
            elif fetched and self._free_room()[0]:
                self._wake()  # threads that went idle meanwhile: the next fetch is theirs
            if self._stopping.is_set():
                self._room.notify_all()  # stop() waits for the last fetch under way
        return True

    def _pick(self) -> Delivery | None:
        """The oldest prefetched task of the first type below its limit (lock held). None
        while a task handed out again after its lease expired runs (see ``_isolate``)."""
        if self._suspects:
            return None
        for name in self._order:
            queue = self._ready[name]
            if queue and self._running_by_type[name] < self.types[name].limit:
                self._running_by_type[name] += 1
                if queue[0].redelivered:
                    self._suspects.add(queue[0].receipt)  # nothing else starts until it ends
                if not self._threads_fetch and self._waiting_threads > 1 and self._should_fetch():
                    self._room.notify()  # refill the buffer
                self._ready_count -= 1
                if self._ready_count > self._signalled:
                    self._wake()  # more wait than threads on their way: wake the next
                return queue.popleft()
        return None

    def _wake(self) -> None:
        """Wake one sleeping thread that no earlier wake-up reached yet (lock held)."""
        if self._sleeping > self._signalled:
            self._signalled += 1
            self._work.notify()

    def _wake_all(self) -> None:
        self._signalled = self._sleeping
        self._work.notify_all()

    def _settled(self, outcomes: Sequence[Outcome]) -> None:
        """The Settler's thread answered (and reported) ``outcomes``: drop them from the books."""
        with self._lock:
            behind = len(self._settling) >= self._max_unsettled
            for outcome in outcomes:
                self._settling.pop(outcome.settle.delivery.receipt, None)
            if behind:
                self._wake_all()
            if not self._settling and self._stopping.is_set():
                self._room.notify_all()  # stop() may wait for the last of them

    def _forget(self, delivery: Delivery, started: bool) -> None:
        with self._lock:
            self._release_slot(delivery, started)

    def _release_slot(self, delivery: Delivery, started: bool) -> None:
        """Drop a settled delivery from the books and wake whoever can use its room."""
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
            self._running_by_type[name] -= 1
            if self._ready[name]:
                self._wake()  # a task of this type may have waited for this slot
        # Without prefetch the thread that freed the slot fetches for itself (or wakes the
        # dispatcher before it idles); with it, the dispatcher refills the buffer in batches.
        if self._stopping.is_set() or (self._prefetch and self._should_fetch()):
            self._room.notify_all()
        if self._asking and name not in self._asking:
            self.broker.wake()  # the get under way could not take this type: ask again
