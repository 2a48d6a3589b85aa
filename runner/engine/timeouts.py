"""Deadlines for handlers: cooperative cancellation, thread interruption, overrun detection.

Python cannot kill a thread. What it can do (and what Dramatiq's time limits do) is schedule an
asynchronous exception in it with ``PyThreadState_SetAsyncExc``; the exception is raised the
next time that thread runs Python bytecode. The limits, written down so nobody rediscovers them:

- A handler blocked in a C call (``time.sleep(60)``, a socket read without timeout) is not
  interrupted until the call returns. It keeps its worker slot meanwhile; the watchdog reports
  it once as an overrun.
- An exception that lands while a thread holds a lock acquired from Python code can leave the
  lock held. So interrupts are delivered only while the thread runs handler code (``Guard.run``),
  and the runner's own code on that thread takes no lock while an interrupt can still land.
- A handler that must never be interrupted mid-lock sets ``timeout_action: cancel``: only
  ``ctx.cancelled`` is set, and the attempt fails when the handler returns.

Race-free hand-off, relying on the GIL's sequential consistency: the sender sets ``sending``,
checks that the thread is still inside the same run, raises, clears ``sending``. The worker,
leaving the handler, clears its run, waits until no send is in progress, then cancels any
exception still pending. An interrupt that lands during that exit path is absorbed there.
"""

from __future__ import annotations

import ctypes
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from runner.errors import TaskInterrupted
from runner.model import Cancellation

T = TypeVar("T")

#: How long an interrupted handler may take to return before it is reported as an overrun.
OVERRUN_AFTER_S = 1.0
#: The shortest idle look-again of the watchdog (see Watchdog's horizon_s).
MIN_HORIZON_S = 0.05


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """Schedule ``exc`` in another thread (None cancels a pending one); returns threads hit."""
    target = ctypes.py_object(exc) if exc is not None else None
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target))


@dataclass(eq=False)
class Run:
    """One handler attempt being watched. Identity is the fencing token for interrupts."""

    deadline: float  # time.monotonic()
    cancelled: Cancellation
    interrupt: bool  # False for timeout_action: cancel
    on_timeout: Callable[[Run], None] = lambda run: None
    on_overrun: Callable[[Run], None] = lambda run: None
    expired: bool = False
    interrupted: bool = False
    overrun_at: float = field(default=float("inf"))
    overrun_reported: bool = False
    root: str = ""  # the pipeline the task belongs to ("": none), for dq-run cancel


class Guard:
    """Belongs to one worker thread; the only door through which interrupts enter it.

    ``current`` is the run the thread is inside (None between runs): the watchdog reads it,
    so starting and ending a run costs no lock.
    """

    def __init__(self, watchdog: Watchdog) -> None:
        self.thread_id = 0
        self.current: Run | None = None
        self._watchdog = watchdog
        self._sending = False
        self._sent = False

    def bind(self) -> None:
        """Call from the worker thread itself, once, before the first run."""
        self.thread_id = threading.get_ident()
        self._watchdog.register(self)

    def run(self, run: Run, fn: Callable[[], T]) -> T:
        """Call ``fn`` as ``run``; a TaskInterrupted raised in it propagates to the caller."""
        self.current = run
        try:
            self._watchdog.started(run)
            return fn()
        finally:
            self._leave()

    def _leave(self) -> None:
        while True:
            try:
                self.current = None
                while self._sending:
                    time.sleep(0)
                if self._sent:  # the C call is only needed after an interrupt was sent
                    self._sent = False
                    _set_async_exc(self.thread_id, None)
                return
            except TaskInterrupted:
                continue  # landed on the way out: the handler is done, absorb it

    def interrupt(self, run: Run) -> bool:
        """From another thread: raise TaskInterrupted in this thread if it still runs ``run``."""
        self._sending = True
        try:
            if self.current is not run:
                return False
            self._sent = True
            _set_async_exc(self.thread_id, TaskInterrupted)
            return True
        finally:
            self._sending = False


class Watchdog:
    """One thread that enforces the deadlines of every registered worker thread's runs.

    It scans the guards' ``current`` runs and sleeps until the earliest deadline or overrun
    check. A run that starts with an earlier deadline wakes it through a SimpleQueue, whose
    put takes no Python-level lock: ``started`` runs on a worker thread inside handler
    territory, where an interrupt landing inside a held lock would leave it held.

    No run is missed: ``_next_wake`` is infinite while a scan is under way (so a run starting
    then always wakes the watchdog), and afterwards holds the time the watchdog will look again.

    ``horizon_s`` is the shortest timeout a run will have (0: unknown). With nothing running,
    the watchdog looks again that long after its scan instead of sleeping until woken: a run
    starting meanwhile cannot fall due before then, so it need not wake the watchdog (short
    tasks would otherwise cost a wake-up each time the threads go idle and start again).
    """

    def __init__(self, overrun_after_s: float = OVERRUN_AFTER_S, horizon_s: float = 0.0) -> None:
        self._horizon_s = max(horizon_s, MIN_HORIZON_S) if horizon_s > 0 else math.inf
        self._guards: list[Guard] = []
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._next_wake = math.inf  # until the first scan has looked: every start wakes it
        self._stopped = False
        self._overrun_after_s = overrun_after_s
        self._thread = threading.Thread(target=self._loop, name="dq-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def register(self, guard: Guard) -> None:
        self._guards = [*self._guards, guard]  # copy-on-write: the loop iterates a snapshot

    def started(self, run: Run) -> None:
        """A run began: wake the watchdog if it would otherwise look too late."""
        if run.deadline < self._next_wake:
            self._wakeups.put(None)

    def expire_all(self) -> int:
        """Cancel and interrupt every running handler now (shutdown past its grace period)."""
        now = time.monotonic()
        runs = [run for guard in self._guards if (run := guard.current) is not None]
        for run in runs:
            run.deadline = min(run.deadline, now)
        self._wakeups.put(None)
        return len(runs)

    def stop(self) -> None:
        self._stopped = True
        self._wakeups.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stopped:
            self._next_wake = math.inf
            now = time.monotonic()
            next_wake = now + self._horizon_s
            for guard in self._guards:
                run = guard.current
                if run is None:
                    continue
                if not run.expired:
                    if now >= run.deadline:
                        self._expire(guard, run, now)
                    else:
                        next_wake = min(next_wake, run.deadline)
                if run.expired and not run.overrun_reported:
                    if now >= run.overrun_at:
                        run.overrun_reported = True
                        run.on_overrun(run)
                    else:
                        next_wake = min(next_wake, run.overrun_at)
            self._next_wake = next_wake
            try:
                timeout = None if next_wake == math.inf else max(0.0, next_wake - now)
                self._wakeups.get(timeout=timeout)
                while True:  # one scan answers every wake-up queued meanwhile
                    self._wakeups.get_nowait()
            except queue.Empty:
                pass

    def _expire(self, guard: Guard, run: Run, now: float) -> None:
        run.expired = True
        run.overrun_at = now + self._overrun_after_s
        run.cancelled.set()
        if run.interrupt:
            run.interrupted = guard.interrupt(run)
        run.on_timeout(run)
