"""Text logs as a person sees them (issue 17): publishing is quiet at INFO, the shutdown drain
is quiet per task, long lines wrap with an indent on a terminal, flush() waits for the writer."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import struct
import termios
from collections.abc import Iterator

import pytest

from runner.config.models import LoggingConfig
from runner.events import Event
from runner.observe.logs import FIELDS_ATTR, WRAP_INDENT, TextFormatter, setup_logging, wrap_line


@pytest.fixture
def tty80() -> Iterator[io.TextIOWrapper]:
    """The writing end of a pseudo-terminal 80 columns wide, and a reader draining it."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    stream = open(follower, "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    os.set_blocking(leader, False)
    stream.leader = leader  # type: ignore[attr-defined]
    yield stream
    stream.close()
    os.close(leader)


def read_all(leader: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_publishing_3000_tasks_prints_nothing_per_task_at_info() -> None:
    out = io.StringIO()
    logs = setup_logging(LoggingConfig(format="text", level="INFO"), stream=out)
    for i in range(3000):
        logs.handle(Event("task.published", task_id=f"t{i}", type="email", attempt=0))
    logs.handle(Event("task.started", task_id="t0", type="email", attempt=1))
    logs.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "task.started" in lines[0]


def test_publishing_is_still_there_at_debug() -> None:
    out = io.StringIO()
    logs = setup_logging(LoggingConfig(format="json", level="DEBUG"), stream=out)
    logs.handle(Event("task.published", task_id="t1", type="email", attempt=0))
    logs.close()
    assert '"event": "task.published"' in out.getvalue()


def test_the_shutdown_drain_is_debug_per_task_and_other_deaths_stay_warnings() -> None:
    out = io.StringIO()
    logs = setup_logging(LoggingConfig(format="text", level="INFO"), stream=out)
    for i in range(146):
        logs.handle(Event("task.dead", task_id=f"q{i}", type="email", reason="shutdown"))
    logs.handle(Event("task.dead", task_id="x", type="email", reason="exhausted"))
    logs.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "reason=exhausted" in lines[0]


def record_of(fields: dict[str, object], message: str = "") -> logging.LogRecord:
    record = logging.LogRecord("runner", logging.WARNING, __file__, 1, message, None, None)
    setattr(record, FIELDS_ATTR, fields)
    record.message = record.getMessage()
    return record


LONG = {
    "event": "task.retrying",
    "type": "resize",
    "task_id": "01a23c463d38aaaabbbbccccdddd1234",
    "attempt": 1,
    "duration_ms": 1008.229,
    "delay_ms": 54.72,
    "outcome": "retrying",
    "error": "TimeoutError: ran past its timeout of 1.0s while resizing a very large image",
}


def test_a_long_line_wraps_with_an_indent_at_the_terminal_width() -> None:
    record = record_of(LONG)
    text = TextFormatter(width=lambda: 80).format(record)
    first, *rest = text.splitlines()
    assert rest, text
    assert all(len(line) <= 80 for line in (first, *rest)), text
    assert all(line.startswith(WRAP_INDENT) and line[len(WRAP_INDENT)] != " " for line in rest)
    assert "task.retrying" in first
    unwrapped = TextFormatter().format(record)
    assert " ".join(text.split()) == " ".join(unwrapped.split())  # nothing lost or reordered


def test_a_short_line_and_a_traceback_are_left_as_they_are() -> None:
    fields = {"event": "task.succeeded", "type": "email", "task_id": "abcdef12", "exc": "T" * 120}
    text = TextFormatter(width=lambda: 80).format(record_of(fields))
    first, exc = text.splitlines()
    assert "task.succeeded" in first and exc == "T" * 120


def test_wrap_line_splits_a_word_longer_than_a_line() -> None:
    wrapped = wrap_line("head " + "x" * 200, 80)
    assert all(len(line) <= 80 for line in wrapped.splitlines())


def test_on_a_terminal_setup_logging_wraps_at_its_width(tty80: io.TextIOWrapper) -> None:
    logs = setup_logging(LoggingConfig(format="auto"), stream=tty80)
    logs.handle(Event("task.retrying", task_id=str(LONG["task_id"]), type="resize", attempt=1,
                      duration_s=1.008229, delay_s=0.05472, outcome="retrying",
                      error=str(LONG["error"])))  # fmt: skip
    logs.close()
    lines = read_all(tty80.leader).splitlines()  # type: ignore[attr-defined]
    assert len(lines) >= 2 and all(len(line) <= 80 for line in lines), lines
    assert lines[1].startswith(WRAP_INDENT)


def test_not_on_a_terminal_lines_stay_whole() -> None:
    out = io.StringIO()
    logs = setup_logging(LoggingConfig(format="text"), stream=out)
    logs.handle(Event("task.dead", task_id="t", type="resize", reason="exhausted",
                      error="E: " + "x" * 200))  # fmt: skip
    logs.close()
    assert len(out.getvalue().splitlines()) == 1


def test_flush_returns_once_the_queued_lines_are_written() -> None:
    written: list[str] = []

    class Slow(io.StringIO):
        def write(self, text: str) -> int:
            import time

            time.sleep(0.01)
            written.append(text)
            return len(text)

    logs = setup_logging(LoggingConfig(format="text"), stream=Slow())
    for i in range(20):
        logs.handle(Event("task.succeeded", task_id=f"t{i}", type="email", attempt=1))
    assert logs.flush(5.0)
    assert sum("task.succeeded" in w for w in written) == 20
    logs.close()
    assert logs.flush(0.1)  # after close: nothing to wait for
