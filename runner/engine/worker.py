"""The worker: scheduling tasks from one broker onto threads the runner owns.

A Worker is its parts, each with one job: the books (``books``: what is held, per type, and who
waits for what, under one lock), the dispatcher (``dispatch``: keeps a small buffer of
prefetched deliveries filled, asking the broker only for types with room), the fetcher
(``fetch``: one broker call into reserved room, for the dispatcher and for threads fetching for
themselves), the lease keeper (``leases``), the Settler (``settle``) and the watchdog
(``timeouts``). This module starts and stops them and runs the worker threads' loop: take the
next task of a type whose running count is below its limit (the books), run it
(runner.engine.attempt), hand its broker call on (sent along with the next fetch, or by the
Settler's thread; inline on a broker without ``batch_settles``) and take the next one in the
same step. Without a prefetch buffer (``prefetch: 0``), a thread that finds nothing to run
fetches for itself (``Broker.exchange``, carrying the finished tasks' settles): no hand-off to
the dispatcher and back.

Prefetched deliveries have been handed out (their attempt counts) but not started; shutdown
hands them back at once. A crash cannot hand them back, so a crashing worker uses up an attempt
of each: that is why the buffer is shallow on durable brokers (PipelineConfig.effective_prefetch),
and why a task handed out again after its lease expired (its last worker may have died of it)
runs alone: nothing fetched and unstarted beside it, and no other task starts while it runs
(``Books.isolate``), so a task that kills its process costs a healthy task at most one attempt
per crash, and only when it was fetched with it the first time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

from runner.brokers.base import Broker, Delivery, Settle, Watched
from runner.engine.attempt import (
    Attempts,
    TaskLogger,
    TypeRuntime,
    default_task_logger,
    type_logger,
    worker_identity,
)
from runner.engine.books import GET_TIMEOUT_S, Books, Fetch
from runner.engine.dispatch import Dispatcher
from runner.engine.fetch import Fetcher
from runner.engine.leases import LeaseKeeper
from runner.engine.settle import Outcome, Settler
from runner.engine.timeouts import Guard, Watchdog
from runner.errors import BrokerClosed, TaskInterrupted
from runner.events import Event, EventBus, EventName

__all__ = ["GET_TIMEOUT_S", "TaskLogger", "TypeRuntime", "Worker", "worker_identity"]

log = logging.getLogger("runner.worker")

#: After the grace period, how long stop() waits in all for interrupted handlers to return and
#: for its threads to end.
FORCED_WAIT_S = 1.0
#: How long stop() waits for the Settler to send the last finished tasks' broker calls.
SETTLE_DRAIN_S = 10.0


class Worker:
    """Runs tasks from one broker on ``threads`` threads with per-type limits."""

    #: How its types execute (``execution``): thread; async (AsyncWorker), process
    #: (ProcessWorker).
    mode = "thread"

    def __init__(
        self,
        broker: Broker,
        types: Mapping[str, TypeRuntime],
        threads: int | None = None,
        *,
        events: EventBus,
        visibility_timeout_s: float,
        task_logger: TaskLogger = default_task_logger,
        prefetch: int | None = None,
        settle_in_background: bool = False,
    ) -> None:
        self.broker = broker
        self.types = dict(types)
        # None: a slot for each task its types may run at once (an AsyncWorker's coroutines, a
        # ProcessWorker's children).
        self.threads = threads = (
            sum(rt.limit for rt in types.values()) if threads is None else threads
        )
        self.events = events
        self.identity = worker_identity()
        self._stopping = threading.Event()
        self._watchdog = Watchdog(horizon_s=min(rt.timeout_s for rt in self.types.values()))
        self.attempts = Attempts(
            self.types, events, self._watchdog, task_logger, hand_back=broker.settle_effects
        )
        self._settler = Settler(
            broker, self.attempts.settled, settle_in_background, batch_done=self._settled
        )
        watched = broker if not broker.shared and isinstance(broker, Watched) else None
        self.books = Books(
            {name: rt.limit for name, rt in self.types.items()},
            threads,
            threads if prefetch is None else prefetch,
            self._stopping,
            submit=self._settler.submit,
            wake_broker=broker.wake,
            lead=not broker.shared,  # an idle thread waits in get: in-process brokers always,
            lead_when_drained=broker.shared,  # others while their queue is drained
            carry=broker.carry_settles,
            guarded=frozenset(name for name, rt in self.types.items() if rt.breaker),
        )
        if watched is not None and watched.watch(self.books.put_arrived):
            self.books.quiet = watched.timers_idle
        self._fetcher = Fetcher(broker, self.books, self._settler)
        self._dispatcher = Dispatcher(self.books, self._fetcher, self._settler, self._stopping)
        self.leases = LeaseKeeper(broker, self.books, events, visibility_timeout_s, self._stopping)
        self._threads: list[threading.Thread] = []
        self._setup()

    def _setup(self) -> None:
        """What a subclass adds to the parts above (an AsyncWorker's loop, a ProcessWorker's
        children)."""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for name in self.types:
            type_logger(name)  # warm: handler code must never be first to call getLogger
        self._watchdog.start()
        self._settler.start()
        self._start_threads()
        self._dispatcher.start()
        self.leases.start()
        self.events.emit(
            Event(EventName.WORKER_STARTED, detail=f"{self.identity} threads={self.threads}")
        )

    def stop(self, grace_s: float) -> int:
        """Stop taking tasks, release unstarted ones, give running handlers ``grace_s``.

        Handlers still running after the grace period are cancelled and interrupted; their
        tasks are released back to the broker as they return. One that does not return within
        FORCED_WAIT_S (blocked in a C call) is left to its daemon thread, its task leased
        until the lease expires. Returns how many had to be interrupted.
        """
        if self._stopping.is_set() or not self._dispatcher.is_alive():
            return 0
        self.events.emit(Event(EventName.WORKER_STOPPING, detail=f"grace={grace_s}s"))
        deadline = time.monotonic() + grace_s
        self._stopping.set()
        self.broker.wake()
        self.books.stop_requested()
        # The dispatcher leaves within one broker.get, and the threads' own fetches (which do
        # not block) end; after that nothing new arrives locally.
        self._dispatcher.join(timeout=GET_TIMEOUT_S + 5)
        self.books.wait_fetches_done(timeout=GET_TIMEOUT_S + 5)
        self._hand_back(self.books.take_unstarted())
        forced = self.books.wait_released(deadline)
        # Interrupted handlers get FORCED_WAIT_S, in all, to return; one blocked in a C call
        # keeps its thread (a daemon) and its task stays leased: it comes back once the
        # lease expires. The process does not wait for it.
        after_grace = time.monotonic() + FORCED_WAIT_S
        if forced:
            self._force()
            self.books.wait_released(after_grace)
        self._settler.stop(timeout=SETTLE_DRAIN_S)
        self.books.close()
        self._closing()
        joined_by = max(after_grace, time.monotonic() + 0.5)
        for t in self._threads:
            t.join(timeout=max(0.0, joined_by - time.monotonic()))
        self.leases.join(timeout=max(0.0, joined_by - time.monotonic()))
        self._watchdog.stop()
        self.events.emit(Event(EventName.WORKER_STOPPED, detail=f"forced={forced}"))
        return forced

    def _start_threads(self) -> None:
        """The threads that run the tasks: ``threads`` worker threads (an AsyncWorker runs
        coroutines instead: runner.engine.aio)."""
        for i in range(self.threads):
            t = threading.Thread(target=self._work_loop, name=f"dq-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _force(self) -> None:
        """Past the grace period: cut the running handlers short (interrupts)."""
        self.attempts.forcing = True
        self._watchdog.expire_all()

    def _closing(self) -> None:
        """The books are closed: the worker threads are leaving."""

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
        return self.books.running()

    def limits(self) -> dict[str, int]:
        return {name: rt.limit for name, rt in self.types.items()}

    def overrunning(self) -> int:
        """Handlers reported as overruns that still hold their thread."""
        return self.attempts.overrunning()

    def alive_threads(self) -> int:
        """Worker threads still alive (never fewer than ``threads`` while running)."""
        return sum(1 for t in self._threads if t.is_alive())

    def idle(self) -> bool:
        return self.books.idle()

    def _settled(self, outcomes: Sequence[Outcome]) -> None:
        """The Settler's thread answered a batch: the books drop it."""
        self.books.settled(outcomes)

    def _hand_back(self, unstarted: list[Delivery]) -> None:
        """Release unstarted deliveries to the broker (their attempt is given back)."""
        if not unstarted:
            return
        self._settler.call([Settle(delivery, "release") for delivery in unstarted])
        for delivery in unstarted:
            self.books.forget(delivery, started=False)

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

    def _next(self, done: Delivery | None, outcome: Outcome | None) -> Delivery | None:
        """The next task to run (None: exit), fetching for this thread when the books say so."""
        step = self.books.next_task(done, outcome)
        while isinstance(step, Fetch):
            fetched: int | None = None
            try:
                fetched = self._fetcher.run(step, by_dispatcher=False)
            except BrokerClosed:
                pass
            except BaseException:
                self.books.own_fetch_abandoned()
                raise
            step = self.books.after_own_fetch(fetched)
        return step

    def _start(self, guard: Guard, delivery: Delivery) -> Outcome | None:
        """Run a picked delivery; None when it must not run (its lease lapsed and moved on)."""
        if self.leases.lapsed(delivery):
            return None
        if delivery.redelivered:
            self._hand_back(self.books.isolate())
        return self._run(guard, delivery)

    def _run(self, guard: Guard, delivery: Delivery) -> Outcome:
        """Run a delivery's attempt on this thread (a ProcessWorker's, in its child)."""
        return self.attempts.run(guard, delivery)
