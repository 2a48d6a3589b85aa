"""Async execution (``execution: async``): ``async def`` handlers awaited on an event loop the
worker owns.

An AsyncWorker is a Worker (the same books, dispatcher, fetcher, lease keeper and Settler, for
the async types only) whose worker threads are replaced by three: the loop thread, which runs
every attempt's coroutine (uvloop's loop where it is installed); the feeder, which takes the next
task from the books as a worker thread would (waiting for a free slot, fetching, running a
redelivered task alone) and starts its attempt on the loop; and the completer, which takes each
finished attempt's outcome off the loop and hands it on (to the Settler, or to the memory broker
at once). No broker call runs on the loop. The books count the async types' concurrency as their
"threads": an async type's tasks take none of the thread pool's slots, and its ``concurrency``
is how many of its coroutines are in flight.

Timeouts: past ``timeout`` the attempt's ``ctx.cancelled`` is set and, with ``timeout_action:
interrupt`` (the default), its coroutine is cancelled (CancelledError at its next ``await``)
and the attempt fails as timed out; with ``cancel`` it runs on and fails as timed out when it
returns. The watchdog's thread interrupt is never aimed at the loop. A loop blocked for over
``BLOCKED_S`` (a handler calling blocking code) is logged as ``task.overrun``, naming the task
whose coroutine blocks it (found on the loop thread's stack). At shutdown, coroutines still
running after the grace period are cancelled and their tasks handed back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from types import CoroutineType
from typing import Any

from runner.brokers.base import Delivery
from runner.engine.attempt import Begun, TypeRuntime
from runner.engine.settle import Outcome
from runner.engine.timeouts import Run
from runner.engine.worker import Worker
from runner.errors import PermanentError

log = logging.getLogger("runner.worker")

#: A loop that has not run its heartbeat for this long is blocked (logged as task.overrun).
BLOCKED_S = 1.0
#: How often the loop beats, and how often the monitor looks.
BEAT_S = 0.1
#: How long a cancelled coroutine gets to unwind before its attempt is failed anyway.
UNWIND_S = 1.0


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (optional), else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class LoopThread:
    """An event loop on its own daemon thread, with a monitor that reports it blocked."""

    def __init__(self, name: str, on_blocked: Any) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # made at start (closed at stop)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._monitor = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)
        self._on_blocked = on_blocked  # (seconds, the ids of the frames on the loop's stack)
        self._stopping = threading.Event()
        self._beat = time.monotonic()
        # Coroutines to start, each with its done callback, and whether a drain is due.
        self._launches: deque[
            tuple[Coroutine[Any, Any, Any], Callable[[asyncio.Task[Any]], None]]
        ] = deque()
        self._draining = False

    def start(self) -> None:
        self.loop = new_loop()
        self._thread.start()
        self._monitor.start()

    def launch(
        self, coro: Coroutine[Any, Any, Any], on_done: Callable[[asyncio.Task[Any]], None]
    ) -> None:
        """Run ``coro`` as a task on the loop (from any thread); ``on_done(task)`` is called on
        the loop when it ends. Launches wait in a queue that the loop empties in one turn, and
        only a launch that finds no emptying scheduled wakes the loop. (One
        ``run_coroutine_threadsafe`` per task, a concurrent Future chained to the task and a
        write to the loop's self-pipe each, cost about 50 us a task on our 2-core machine.)"""
        assert self.loop is not None, "started first"
        self._launches.append((coro, on_done))
        if not self._draining:
            self._draining = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """On the loop: start every launch waiting. The flag drops first, so a launch made
        while this runs either is taken here or schedules the next drain."""
        loop = self.loop
        assert loop is not None
        self._draining = False
        launches = self._launches
        while launches:
            coro, on_done = launches.popleft()
            loop.create_task(coro).add_done_callback(on_done)

    def call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (from any thread)."""
        assert self.loop is not None, "started first"
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if self._monitor.is_alive():
            self._monitor.join(timeout)

    def _run(self) -> None:
        loop = self.loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.call_soon(self._heartbeat, loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._beat = time.monotonic()
        loop.call_later(BEAT_S, self._heartbeat, loop)

    def _watch(self) -> None:
        reported = False
        while not self._stopping.wait(BEAT_S):
            stalled = time.monotonic() - self._beat
            if stalled <= BLOCKED_S:
                reported = False
            elif not reported:
                reported = True
                self._on_blocked(stalled, self._stack())

    def _stack(self) -> set[int]:
        """The ids of the frames on the loop thread's stack now (a blocking coroutine's is)."""
        frame = sys._current_frames().get(self._thread.ident or 0)
        found = set()
        while frame is not None:
            found.add(id(frame))
            frame = frame.f_back
        return found


class AsyncWorker(Worker):
    """Runs the async types' tasks as coroutines on its own event loop (module docstring)."""

    mode = "async"

    def _setup(self) -> None:
        # Its books' "threads" are the coroutines in flight (Worker's default: the sum of the
        # types' limits).
        self._loop = LoopThread("dq-loop", self._blocked)
        self._done: queue.SimpleQueue[tuple[Delivery, Outcome | BaseException] | None]
        self._done = queue.SimpleQueue()
        # The attempts in flight: receipt -> (its asyncio task, its run), read at shutdown; and
        # the frame of each one's handler coroutine (its id) -> its delivery, for a blocked loop.
        self._in_flight: dict[str, tuple[asyncio.Task[Any], Run]] = {}
        self._frames: dict[int, Delivery] = {}

    def _start_threads(self) -> None:
        self._loop.start()
        for name, target in (("dq-feeder", self._feed), ("dq-completer", self._complete)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _force(self) -> None:
        """Past the grace period: cancel every coroutine still in flight (handed back)."""
        self.attempts.forcing = True
        for task, run in list(self._in_flight.values()):
            run.expired = True
            run.cancelled.set()
            self._loop.call(task.cancel)

    def _closing(self) -> None:
        self._done.put(None)  # the completer exits once the books are closed

    def stop(self, grace_s: float) -> int:
        forced = super().stop(grace_s)
        self._loop.stop(timeout=2.0)
        return forced

    # -- the feeder and the completer -------------------------------------------------------

    def _feed(self) -> None:
        while True:
            try:
                delivery = self._next(None, None)
                if delivery is None:
                    return
                if self.leases.lapsed(delivery):
                    self.books.finished(delivery, None)  # dropped unrun: the lease moved on
                    continue
                if delivery.redelivered:
                    self._hand_back(self.books.isolate())
                self._loop.launch(self._attempt(delivery), partial(self._ended, delivery))
            except BaseException:
                log.exception("async feeder error; the feeder continues")

    def _ended(self, delivery: Delivery, task: asyncio.Task[Outcome]) -> None:
        """On the loop thread, as an attempt ends: its outcome (or what it raised) goes to the
        completer."""
        try:
            self._done.put((delivery, task.result()))
        except BaseException as exc:  # CancelledError too: nothing in _attempt should raise
            self._done.put((delivery, exc))

    def _complete(self) -> None:
        while (item := self._done.get()) is not None:
            delivery, ended = item
            outcome: Outcome | None = None
            try:
                if isinstance(ended, BaseException):
                    raise ended
                outcome = ended
                if not self._settler.background:
                    self._settler.settle_now(outcome)
                    outcome = None
            except BaseException:
                # The task stays leased until its lease expires, then runs again.
                log.exception("async attempt error; the completer continues")
            self.books.finished(delivery, outcome)

    # -- on the loop -------------------------------------------------------------------------

    async def _attempt(self, delivery: Delivery) -> Outcome:
        attempts = self.attempts
        begun = attempts.begin(delivery)
        if not isinstance(begun, Begun):
            return attempts.finish(delivery, begun)
        current = asyncio.current_task()
        assert current is not None
        self._in_flight[delivery.receipt] = (current, begun.run)
        attempts.running[delivery.receipt] = begun.run
        t0 = time.perf_counter()
        value: Any = None
        error: BaseException | None = None
        try:
            value = await self._call(delivery, begun)
        except BaseException as exc:  # CancelledError too: a shutdown past its grace
            error = exc
        finally:
            self._in_flight.pop(delivery.receipt, None)
            attempts.running.pop(delivery.receipt, None)
        duration = time.perf_counter() - t0
        return attempts.finish(delivery, attempts.end(delivery, begun, value, error, duration))

    async def _call(self, delivery: Delivery, begun: Begun) -> Any:
        """Await the handler's coroutine until its timeout (see the module docstring)."""
        rt, run = begun.rt, begun.run
        made = rt.handler(begun.payload, begun.ctx)
        if not inspect.isawaitable(made):
            raise PermanentError(
                f"the handler of async type {rt.name!r} returned {type(made).__name__}, not a "
                "coroutine: a middleware's wrap may have called it synchronously"
            )
        frame = getattr(made, "cr_frame", None)
        if frame is not None:
            self._frames[id(frame)] = delivery
        try:
            return await self._awaited(made, run, rt)
        finally:
            if frame is not None:
                self._frames.pop(id(frame), None)

    async def _awaited(self, made: Any, run: Run, rt: TypeRuntime) -> Any:
        loop = asyncio.get_running_loop()
        inner = (
            loop.create_task(made) if type(made) is CoroutineType else asyncio.ensure_future(made)
        )
        try:
            await _done_or_due(loop, inner, run.deadline - time.monotonic())
        except asyncio.CancelledError:
            inner.cancel()
            await asyncio.wait({inner}, timeout=UNWIND_S)
            raise
        if inner.done():
            return inner.result()
        run.expired = True
        run.cancelled.set()
        run.on_timeout(run)
        if not rt.interrupt:
            return await inner  # timeout_action: cancel: it runs on; end() fails it as timed out
        inner.cancel()
        await asyncio.wait({inner}, timeout=UNWIND_S)
        raise TimeoutError(f"ran past its timeout of {rt.timeout_s}s")

    def _blocked(self, seconds: float, stack: set[int]) -> None:
        """The loop has not turned for ``seconds``: report the task whose handler holds it."""
        culprit = next((d for f, d in list(self._frames.items()) if f in stack), None)
        self.attempts.loop_blocked(culprit, seconds)


async def _done_or_due(
    loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any], after: float
) -> None:
    """Wait until ``task`` is done or ``after`` seconds have passed: ``asyncio.wait`` of one
    task with a timeout, without the sets and the bookkeeping it makes for any number of them
    (it took about a quarter of an async attempt's time on the loop). Cancelling this wait
    leaves ``task`` running."""
    if task.done():
        return
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(max(0.0, after), wake)
    task.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        task.remove_done_callback(wake)
