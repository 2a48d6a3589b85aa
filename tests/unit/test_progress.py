"""The live progress view: what it shows, and when it is on."""

from __future__ import annotations

import io
import re
import sys
import threading
import time

import pytest
from rich.console import Console

from runner.brokers.base import Depth
from runner.config.models import LoggingConfig
from runner.events import Event
from runner.observe.logs import setup_logging
from runner.observe.progress import Progress, progress_enabled


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
    progress = Progress(
        planned=20, limits={"email": 2, "resize": 1}, state=FakeState(), clock=clock
    )
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
    progress = Progress(planned=None, limits={"email": 2}, state=FakeState(), clock=FakeClock())
    progress.handle(Event("task.succeeded", task_id="a", type="email"))
    text = render_text(progress)
    assert "1 done" in text and "/None" not in text


class FailingState(FakeState):
    """A broker that cannot answer (Redis down): every state read raises."""

    def depth(self) -> dict[str, Depth]:
        raise ConnectionError("broker down")

    def inflight(self) -> dict[str, int]:
        raise ConnectionError("broker down")


@pytest.mark.parametrize("shared", [False, True])
def test_a_failing_state_still_renders(shared: bool) -> None:
    """Everything the view knows from events still shows; only what it reads from the state
    is left out (no running counts, the queued count as "?")."""
    clock = FakeClock()
    progress = Progress(
        planned=20, limits={"email": 2, "resize": 1}, state=FailingState(), clock=clock,
        shared=shared,
    )  # fmt: skip
    clock.now += 3.0
    feed(progress)
    text = render_text(progress)
    assert ("9 done" if shared else "9/20 done") in text  # a shared broker: no total
    assert "retries 1" in text and "dead 1" in text and "timeouts 1" in text
    assert re.search(r"email\s+running 0/2\s+done 8", text)
    assert re.search(r"resize\s+running 0/1\s+done 1", text)
    assert ("queued ?" in text) is shared


def test_live_view_draws_on_its_console_and_stops_once() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    progress = Progress(planned=3, limits={"email": 2}, state=FakeState(), console=console)
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
    progress = Progress(planned=2, limits={"email": 2}, state=FakeState(), console=console)
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


# -- issue 17: the total, shared brokers, 80 columns, the last frame ---------------------------


class BacklogState(FakeState):
    """A broker with ``queued`` tasks waiting (ready) in it."""

    def __init__(self, queued: int) -> None:
        super().__init__()
        self.queued = queued
        self.depth_reads = 0

    def depth(self) -> dict[str, Depth]:
        self.depth_reads += 1
        return {"email": Depth(ready=self.queued)}


def recorded(progress: Progress, width: int) -> list[str]:
    """The panel as a terminal of ``width`` columns shows it (Rich's recording console)."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(progress.render())
    return console.export_text().splitlines()


def test_alone_on_a_broker_the_total_is_the_backlog_plus_what_is_published() -> None:
    """202 queued before the run, 100 planned: 302 to do (it showed 302/100 done)."""
    state = BacklogState(queued=202)
    progress = Progress(planned=100, limits={"email": 2}, state=state, clock=FakeClock())
    progress.backlog = sum(d.total for d in state.depth().values())
    for i in range(150):
        progress.handle(Event("task.published", task_id=f"p{i}", type="email"))
    for i in range(302):
        progress.handle(Event("task.succeeded", task_id=f"s{i}", type="email"))
    text = "\n".join(recorded(progress, 120))
    assert progress.total == 202 + 150  # more published than planned: what was published
    assert "302/352 done" in text


def test_start_reads_the_backlog_from_the_broker() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    state = BacklogState(queued=202)
    progress = Progress(planned=100, limits={"email": 2}, state=state, console=console)
    progress.start()
    progress.stop()
    assert progress.backlog == 202
    assert progress.total == 302
    assert "0/302 done" in out.getvalue()


def test_on_a_shared_broker_it_shows_done_and_the_queue_depth_not_a_fraction() -> None:
    clock = FakeClock()
    state = BacklogState(queued=202)
    progress = Progress(
        planned=100, limits={"email": 2}, state=state, shared=True, clock=clock, depth_every_s=1.0
    )
    progress.backlog = 202
    for i in range(7):
        progress.handle(Event("task.succeeded", task_id=f"s{i}", type="email"))
    lines = recorded(progress, 80)
    assert progress.total is None
    assert any(line.startswith("7 done  queued 202") for line in lines), lines
    assert not any("/100" in line or "/302" in line or "━" in line for line in lines)  # no bar
    state.queued = 150
    assert any("queued 202" in line for line in recorded(progress, 80))  # read once a second
    clock.now += 1.0
    assert any("queued 150" in line for line in recorded(progress, 80))


def test_the_depth_is_read_when_the_worker_stops_and_not_after() -> None:
    """The last frame is drawn after the broker closed: it shows the depth read at
    worker.stopped, not one up to a second old (it read `queued 196` after the queue emptied)."""
    clock = FakeClock()
    state = BacklogState(queued=196)
    progress = Progress(None, {"email": 2}, state, shared=True, clock=clock)
    assert any("queued 196" in line for line in recorded(progress, 80))
    state.queued = 0
    progress.handle(Event("worker.stopped", detail="forced=0"))
    progress._stopped_at = clock.now  # as stop() leaves it
    state.depth = None  # type: ignore[method-assign, assignment]  # the broker is closed
    clock.now += 5
    assert any("queued 0" in line for line in recorded(progress, 80))


def test_tasks_dead_lettered_at_shutdown_are_left_not_done() -> None:
    progress = Progress(planned=10, limits={"email": 2}, state=FakeState(), clock=FakeClock())
    progress.handle(Event("task.succeeded", task_id="a", type="email"))
    progress.handle(Event("task.dead", task_id="b", type="email", reason="exhausted"))
    for i in range(8):
        progress.handle(Event("task.dead", task_id=f"q{i}", type="email", reason="shutdown"))
    text = "\n".join(recorded(progress, 120))
    assert "2/10 done" in text and "dead 1" in text and "left 8" in text


def busy_progress(type_name: str = "email") -> Progress:
    clock = FakeClock()
    state = FakeState()
    state.running = {type_name: 2}
    progress = Progress(planned=6407, limits={type_name: 2}, state=state, clock=clock)
    clock.now += 123.4
    for i in range(6000):
        progress.handle(Event("task.succeeded", task_id=f"s{i}", type=type_name))
    for i in range(1234):
        progress.handle(Event("task.retrying", task_id=f"r{i}", type=type_name))
    for i in range(321):
        progress.handle(Event("task.dead", task_id=f"d{i}", type=type_name, reason="exhausted"))
        progress.handle(Event("task.timeout", task_id=f"d{i}", type=type_name))
    for i in range(86):
        progress.handle(Event("task.dead", task_id=f"q{i}", type=type_name, reason="shutdown"))
    return progress


@pytest.mark.parametrize("width", [80, 60, 40])
def test_the_panel_fits_the_width_dropping_the_least_useful_parts(width: int) -> None:
    """At 80 columns the status line was cut mid-word (`retries 2  de`)."""
    lines = recorded(busy_progress(), width)
    assert all(len(line) <= width for line in lines), lines
    bar, status, *types = lines
    assert set(bar.strip()) <= set("━╸╺") and bar.strip()  # the bar has a line of its own
    assert status.startswith("6321/6407 done")
    assert "dead 321" in status  # kept: trouble is what a person looks for
    if width >= 80:
        assert "retries 1234" in status and "left 86" in status
    assert "…" not in status  # parts drop whole; nothing is cut mid-word
    assert types and types[0].startswith("email")


def test_a_type_name_too_long_for_the_width_ends_in_an_ellipsis() -> None:
    lines = recorded(busy_progress("a_very_long_task_type_name_for_invoices_and_receipts"), 50)
    assert all(len(line) <= 50 for line in lines), lines
    assert any(line.startswith("a_very_long") and "…" in line for line in lines)


def test_a_log_line_is_not_written_while_the_last_frame_is_drawn(monkeypatch) -> None:
    """The panel tore at shutdown (`done 6407:55:22.231 WARNING task.dead ...`): a log line
    was written to the terminal while Live drew its last frame. Now the log writer holds
    logs.STDERR_LOCK per line and stop() holds it while Live stops."""
    from rich.live import Live

    drawing = threading.Event()
    order: list[str] = []
    real_stop = Live.stop

    def slow_stop(self: Live) -> None:
        drawing.set()
        time.sleep(0.3)  # a slow terminal: the last frame takes a while
        real_stop(self)
        order.append("last frame drawn")

    monkeypatch.setattr(Live, "stop", slow_stop)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, color_system=None)
    progress = Progress(planned=3, limits={"email": 2}, state=FakeState(), console=console)
    logs = setup_logging(LoggingConfig(format="text"))  # writes to sys.stderr at write time
    progress.start()
    try:

        def log_meanwhile() -> None:
            drawing.wait(5)
            logs.handle(Event("task.dead", task_id="abc", type="email", reason="exhausted"))
            logs.flush()
            order.append("log line written")

        writer = threading.Thread(target=log_meanwhile)
        writer.start()
        progress.stop()
        writer.join(5)
    finally:
        logs.close()
    assert order == ["last frame drawn", "log line written"]


def test_lines_queued_before_the_stop_print_above_the_last_frame() -> None:
    """The final panel is the last thing before the summary, not buried under log lines."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, color_system=None)
    logs = setup_logging(LoggingConfig(format="text"))
    progress = Progress(
        planned=1, limits={"email": 2}, state=FakeState(), console=console, flush_logs=logs.flush
    )
    progress.start()
    try:
        gate = threading.Event()
        logs.handle(Event("task.started", task_id="t0", type="email", attempt=1))
        original = sys.stderr.write

        def slow_write(text: str) -> int:  # the writer lags behind the emitter
            gate.wait(0.2)
            return original(text)

        sys.stderr.write = slow_write  # type: ignore[method-assign]
        for i in range(5):
            logs.handle(Event("task.succeeded", task_id=f"late{i}", type="email", attempt=1))
        progress.handle(Event("task.succeeded", task_id="x", type="email"))
        progress.stop()
    finally:
        logs.close()
    text = out.getvalue()
    assert text.rindex("late4") < text.rindex("1/1 done")
