"""The line a second Ctrl-C prints counts every task.

- On a durable broker: those queued, and those leased, prefetched ones included. It counted
  the queued ones and the running ones only. A task this process had prefetched but not
  started is neither: leased in the broker, not running. A second signal during the stop,
  before the prefetched tasks were handed back, said "34 tasks stay queued ...; the 2 running
  here ..." of 40 (tests/cli/test_screen_cli.py failed on it now and then).
- On the memory broker: those the stop dead-lettered, once it has counted them, and those it
  had not reached yet (``Runner.drain_now``).
- And it comes after the logs the stop was flushing (``Runner.close_observers`` called again
  waits for the closing under way)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from runner import PipelineConfig, TaskContext, build_runtime
from runner.events import Event, EventName
from runner.ops.leftover import forced_exit_line

RELEASE = threading.Event()


def hold(payload: Any, ctx: TaskContext) -> None:
    """Runs until the test lets it go."""
    RELEASE.wait(timeout=30)


def test_prefetched_tasks_are_counted_as_leased(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": "sqlite", "path": str(db), "visibility_timeout": 30},
            "workers": 2,
            "prefetch": 4,
            "task_types": {"slow": {"handler": f"{__name__}:hold", "timeout": 60}},
            "metrics": {"enabled": False},
            "logging": {"level": "WARNING"},
        }
    )
    runner = build_runtime(config, observe=False)
    RELEASE.clear()
    runner.publish_many([("slow", {"n": n}) for n in range(10)])
    runner.start()
    try:
        deadline = time.monotonic() + 20
        # 2 running, 4 prefetched (the most the books hold: the 2 slots and a buffer of 4)
        while runner.depth()["slow"].leased < 6 or sum(runner.inflight().values()) < 2:
            assert time.monotonic() < deadline, (runner.depth(), runner.inflight())
            time.sleep(0.01)
        line = forced_exit_line(runner, config, stopped=False)
    finally:
        RELEASE.set()
        runner.stop()
    found = re.fullmatch(
        rf"forced exit: 4 tasks stay queued in the SQLite file {re.escape(str(db))} and 6 "
        r"are leased \(2 running here\); this process's leases expire after "
        r"visibility_timeout \(30s\) and their tasks are handed out again",
        line,
    )
    assert found, line


def test_a_forced_drain_waits_for_the_stops_drain_to_be_counted() -> None:
    # The stop's drain writes its records, then counts them through task.dead events (the
    # summary). A forced exit that drained in between found the broker empty and the count
    # short: "nothing was left queued or running" of 10 dead-lettered.
    config = PipelineConfig.model_validate(
        {
            "task_types": {"slow": {"handler": f"{__name__}:hold", "timeout": 60}},
            "metrics": {"enabled": False},
            "logging": {"level": "WARNING"},
        }
    )
    runner = build_runtime(config, observe=False)
    counting = threading.Event()

    class SlowCount:  # after the summary's listener: the count goes slowly
        def handle(self, event: Event) -> None:
            if event.name == EventName.TASK_DEAD:
                counting.set()
                time.sleep(0.02)

    runner.events.subscribe(SlowCount())
    runner.publish_many([("slow", {"n": n}) for n in range(10)])
    stopping = threading.Thread(target=runner.stop)  # not started: all 10 stay queued
    stopping.start()
    try:
        assert counting.wait(10)
        assert runner.drain_now() == 10
    finally:
        stopping.join(10)


def test_closing_the_observers_again_waits_for_the_closing_under_way() -> None:
    # A forced exit closes the observers (flushing the logs) while the stop may be closing
    # them: it must not write its last line before the stop's flush is done.
    config = PipelineConfig.model_validate(
        {
            "task_types": {"slow": {"handler": f"{__name__}:hold", "timeout": 60}},
            "metrics": {"enabled": False},
        }
    )
    runner = build_runtime(config, observe=False)
    closing, closed = threading.Event(), threading.Event()

    def slow_close() -> None:
        closing.set()
        time.sleep(0.2)
        closed.set()

    runner.attach(_Quiet(), slow_close)
    first = threading.Thread(target=runner.close_observers)
    first.start()
    assert closing.wait(10)
    runner.close_observers()
    assert closed.is_set()
    first.join(10)


class _Quiet:
    def handle(self, event: Event) -> None:
        pass
