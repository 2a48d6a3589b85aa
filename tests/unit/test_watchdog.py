"""The watchdog's idle horizon: short tasks do not wake it, and no deadline is missed."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from runner.engine.timeouts import Guard, Run, Watchdog
from runner.model import Cancellation
from tests.unit.engine_kit import wait_until


class CountingQueue:
    """The watchdog's wake-up queue, counting the wake-ups it is sent and the waits for one
    (the watchdog waits for one after each scan)."""

    def __init__(self) -> None:
        self.inner: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.puts = 0
        self.waits = 0

    def put(self, item: None) -> None:
        self.puts += 1
        self.inner.put(item)

    def get(self, timeout: float | None = None) -> None:
        self.waits += 1
        self.inner.get(timeout=timeout)

    def get_nowait(self) -> None:
        self.inner.get_nowait()


def watched(horizon_s: float) -> tuple[Watchdog, CountingQueue]:
    watchdog = Watchdog(horizon_s=horizon_s)
    wakeups = CountingQueue()
    watchdog._wakeups = wakeups  # type: ignore[assignment]
    return watchdog, wakeups


def run_in_thread(watchdog: Watchdog, runs: list[Run], body: float = 0.0) -> None:
    """Run each of ``runs`` in one bound worker thread; each waits until cancelled or body s.
    Returns only once every run has finished in it, without an error (else the test fails:
    a thread that hangs or dies would starve the watchdog of starts and fake "no wake-up")."""
    finished: list[Run] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            guard = Guard(watchdog)
            guard.bind()
            for run in runs:
                guard.run(run, lambda run=run: run.cancelled.wait(body))
                finished.append(run)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=10 + body * len(runs))
    assert not thread.is_alive(), "the worker thread is still running its runs"
    assert errors == []
    assert finished == runs


def a_run(timeout_s: float, timed_out: list[Run] | None = None) -> Run:
    run = Run(deadline=time.monotonic() + timeout_s, cancelled=Cancellation(), interrupt=False)
    if timed_out is not None:
        run.on_timeout = timed_out.append
    return run


def settle(wakeups: CountingQueue) -> None:
    """Wait until the watchdog finished its first scan and waits: from then on it has set
    when it looks again, which decides whether a run's start wakes it."""
    wait_until(lambda: wakeups.waits >= 1, "the watchdog finished a scan")


@pytest.mark.parametrize(
    ("horizon_s", "wakes"),
    [
        (30.0, False),  # runs after an idle scan start without waking it
        (0.0, True),  # no horizon: every start after an idle scan wakes it (the cost removed)
    ],
)
def test_short_runs_wake_the_watchdog_only_without_a_horizon(horizon_s: float, wakes: bool) -> None:
    watchdog, wakeups = watched(horizon_s=horizon_s)
    watchdog.start()
    try:
        settle(wakeups)
        before = wakeups.puts
        run_in_thread(watchdog, [a_run(30.0) for _ in range(200)])
        assert (wakeups.puts > before) == wakes
    finally:
        watchdog.stop()


@pytest.mark.parametrize(
    ("horizon_s", "timeout_s", "wakes"),
    [
        (0.2, 0.5, False),  # longer than the horizon: found at the next look, no wake-up needed
        (30.0, 0.2, True),  # shorter: it wakes the watchdog
    ],
)
def test_a_run_times_out_on_time_whatever_the_horizon(
    horizon_s: float, timeout_s: float, wakes: bool
) -> None:
    timed_out: list[Run] = []
    watchdog, wakeups = watched(horizon_s=horizon_s)
    watchdog.start()
    try:
        settle(wakeups)
        before = wakeups.puts
        t0 = time.monotonic()
        run_in_thread(watchdog, [a_run(timeout_s, timed_out)], body=5.0)
        assert timed_out, "the run was never timed out"
        # On time is the timeout plus at most one look-again (0.7 s here); the rest of the 2 s
        # is margin for a loaded machine. A start that should wake the watchdog and does not
        # leaves the run to its 5 s body, never timed out.
        assert time.monotonic() - t0 < 2.0
        if wakes:
            assert wakeups.puts > before
    finally:
        watchdog.stop()


def test_a_run_that_starts_during_a_scan_is_not_missed() -> None:
    """Without a horizon the watchdog sleeps until woken once nothing runs; a run that starts
    while a scan is under way, on a guard the scan has already passed, must still wake it (the
    scan's own result does not know the run). Made certain by a second guard whose ``current``
    starts the run on the first as the scan reads it."""
    watchdog = Watchdog(horizon_s=0)
    passed = Guard(watchdog)
    passed.thread_id = threading.get_ident()
    run = Run(deadline=time.monotonic() + 0.1, cancelled=Cancellation(), interrupt=False)

    class StartsARunWhenRead(Guard):
        @property  # type: ignore[override]
        def current(self) -> Run | None:
            if passed.current is None and not run.cancelled.is_set():
                passed.current = run  # as Guard.run does, then tells the watchdog
                watchdog.started(run)
            return None

        @current.setter
        def current(self, value: Run | None) -> None:
            pass

    watchdog.register(passed)
    watchdog.register(StartsARunWhenRead(watchdog))
    watchdog.start()
    try:
        # Well past the 0.1 s deadline, on a loaded machine too; a missed run never expires.
        assert run.cancelled.wait(5.0), "the run that started during a scan never timed out"
    finally:
        watchdog.stop()
