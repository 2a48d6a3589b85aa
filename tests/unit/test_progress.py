"""The live progress view: what it shows, and when it is on."""

from __future__ import annotations

import io
import re
import sys

from rich.console import Console

from runner.brokers.base import Depth
from runner.config import LoggingConfig
from runner.events import Event
from runner.logs import setup_logging
from runner.progress import Progress, progress_enabled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeState:
    def __init__(self) -> None:
        self.running = {"email": 2, "resize": 0}

    def depth(self) -> dict[str, Depth]:
        return {}

    def inflight(self) -> dict[str, int]:
        return dict(self.running)

    def limits(self) -> dict[str, int]:
        return {"email": 2, "resize": 1}

    def dead_letter_count(self) -> int | None:
        return None

    def overrunning(self) -> int:
        return 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def render_text(progress: Progress, width: int = 120) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=width, color_system=None)
    console.print(progress.render())
    return out.getvalue()


def feed(progress: Progress) -> None:
    for i in range(8):
        progress.handle(Event("task.succeeded", task_id=f"e{i}", type="email"))
    progress.handle(Event("task.retrying", task_id="e9", type="email"))
    progress.handle(Event("task.timeout", task_id="r1", type="resize"))
    progress.handle(Event("task.dead", task_id="r1", type="resize"))
    progress.handle(Event("worker.started"))  # not a task event: ignored


def test_renders_done_rate_retries_dead_and_slots() -> None:
    clock = FakeClock()
    progress = Progress(total=20, limits={"email": 2, "resize": 1}, state=FakeState(), clock=clock)
    clock.now += 3.0
    feed(progress)
    text = render_text(progress)
    assert "9/20 done" in text
    assert "3.0/s" in text  # 9 done in 3 s
    assert "retries 1" in text and "dead 1" in text and "timeouts 1" in text
    assert re.search(r"email\s+running 2/2\s+done 8", text)
    assert re.search(r"resize\s+running 0/1\s+done 1", text)
    assert progress.done == 9


def test_without_total_shows_a_count_and_no_bar() -> None:
    progress = Progress(total=None, limits={"email": 2}, state=FakeState(), clock=FakeClock())
    progress.handle(Event("task.succeeded", task_id="a", type="email"))
    text = render_text(progress)
    assert "1 done" in text and "/None" not in text


def test_a_failing_state_still_renders() -> None:
    state = FakeState()
    state.inflight = None  # type: ignore[method-assign, assignment]  # calling it raises
    progress = Progress(total=1, limits={"email": 2}, state=state, clock=FakeClock())
    assert "email" in render_text(progress)


def test_live_view_draws_on_its_console_and_stops_once() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    progress = Progress(total=3, limits={"email": 2}, state=FakeState(), console=console)
    original_stderr = sys.stderr
    progress.start()
    try:
        for i in range(3):
            progress.handle(Event("task.succeeded", task_id=str(i), type="email"))
    finally:
        progress.stop()
    progress.stop()
    assert sys.stderr is original_stderr  # the redirect is undone
    assert "3/3 done" in out.getvalue()


def test_enabled_only_for_text_logs_on_a_terminal() -> None:
    assert progress_enabled(LoggingConfig(format="auto"), _Tty())
    assert progress_enabled(LoggingConfig(format="text"), _Tty())
    assert not progress_enabled(LoggingConfig(format="json"), _Tty())
    assert not progress_enabled(LoggingConfig(format="auto"), io.StringIO())
    assert not progress_enabled(LoggingConfig(format="text"), io.StringIO())


def test_text_log_lines_print_above_the_live_view() -> None:
    """Log lines written while the view is live go through its console, not around it."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    progress = Progress(total=2, limits={"email": 2}, state=FakeState(), console=console)
    logs = setup_logging(LoggingConfig(format="text"))  # writes to sys.stderr at write time
    progress.start()
    try:
        logs.handle(Event("task.succeeded", task_id="abc", type="email", duration_s=0.01))
        progress.handle(Event("task.succeeded", task_id="abc", type="email"))
        logs.close()  # joins the writer: the line has been written through the proxy
    finally:
        progress.stop()
    text = out.getvalue()
    assert "task.succeeded   email    abc" in text
    assert "1/2 done" in text
