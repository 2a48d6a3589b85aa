"""Structured logging: JSON and text lines, the lock-free emitting path, ctx.logger fields."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from datetime import datetime

import pytest

from runner.config.models import LoggingConfig
from runner.events import Event
from runner.observe.logs import (
    TASK_LOGGER,
    LogListener,
    event_level,
    resolve_format,
    setup_logging,
    task_logger,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def make_logs():
    made: list[LogListener] = []

    def make(fmt: str = "json", level: str = "INFO", stream: io.StringIO | None = None):
        out = stream if stream is not None else io.StringIO()
        listener = setup_logging(LoggingConfig(format=fmt, level=level), stream=out)
        made.append(listener)
        return listener, out

    yield make
    for listener in made:
        listener.close()


def _json_lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_event_fields_and_omit_none(make_logs) -> None:
    logs, out = make_logs("json", level="DEBUG")  # task.published is DEBUG
    logs.handle(Event("task.published", ts=1_700_000_000.25, task_id="t1", type="email"))
    logs.handle(Event("task.started", task_id="t1", type="email", attempt=1, queue_wait_s=0.0125))
    logs.handle(
        Event("task.retrying", task_id="t1", type="email", attempt=1, duration_s=0.5,
              delay_s=0.05, outcome="retrying", error="OSError: boom")
    )  # fmt: skip
    logs.handle(
        Event("task.dead", task_id="t1", type="email", attempt=3, outcome="dead",
              reason="exhausted", error="OSError: boom")
    )  # fmt: skip
    logs.close()

    published, started, retrying, dead = _json_lines(out)
    assert published["ts"] == "2023-11-14T22:13:20.250Z"
    assert list(published)[:3] == ["ts", "level", "event"]
    assert published == {
        "ts": published["ts"], "level": "DEBUG", "event": "task.published", "task_id": "t1",
        "type": "email", "host": published["host"], "pid": os.getpid(),
    }  # fmt: skip
    assert published["host"]
    assert started["queue_wait_ms"] == 12.5 and started["attempt"] == 1
    assert "duration_ms" not in started  # None fields are left out
    assert retrying["duration_ms"] == 500.0 and retrying["delay_ms"] == 50.0
    assert retrying["outcome"] == "retrying" and retrying["error"] == "OSError: boom"
    assert dead["level"] == "WARNING" and dead["reason"] == "exhausted"
    for line in (published, started, retrying, dead):
        datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))


def test_event_levels() -> None:
    for name in ("task.dead", "task.timeout", "task.overrun", "task.lease_lost"):
        assert event_level(name) == logging.WARNING
    for name in ("task.started", "task.succeeded", "worker.started"):
        assert event_level(name) == logging.INFO
    assert event_level("task.published") == logging.DEBUG  # one INFO line per batch instead
    assert event_level("task.dead", "shutdown") == logging.DEBUG  # one line per type instead
    assert event_level("task.dead", "exhausted") == logging.WARNING


def test_level_filters_events(make_logs) -> None:
    logs, out = make_logs("json", level="WARNING")
    logs.handle(Event("task.succeeded", task_id="a", type="t", attempt=1, duration_s=0.1))
    logs.handle(Event("task.timeout", task_id="b", type="t", attempt=1))
    logs.close()
    assert [line["event"] for line in _json_lines(out)] == ["task.timeout"]


def test_task_logger_lines_carry_task_fields_and_extra(make_logs) -> None:
    logs, out = make_logs("json")
    log = task_logger("t9", "resize", 2)
    assert log.logger.name == TASK_LOGGER
    log.info("resized %s to %d px", "cat.png", 64, extra={"bytes": 1234})
    try:
        raise ValueError("bad image")
    except ValueError:
        log.exception("failed")
    logs.close()
    info, error = _json_lines(out)
    assert info["event"] == "task.log" and info["message"] == "resized cat.png to 64 px"
    assert (info["task_id"], info["type"], info["attempt"]) == ("t9", "resize", 2)
    assert info["bytes"] == 1234
    assert error["level"] == "ERROR" and "ValueError: bad image" in error["exc"]


def test_plain_runner_lines_are_json_too(make_logs) -> None:
    logs, out = make_logs("json")
    logging.getLogger("runner.app").warning("config has %d warnings", 2)
    logs.close()
    (line,) = _json_lines(out)
    assert line["event"] == "log" and line["logger"] == "runner.app"
    assert line["message"] == "config has 2 warnings" and line["level"] == "WARNING"


def test_text_format_is_aligned_and_readable(make_logs) -> None:
    logs, out = make_logs("text")
    logs.handle(Event("task.succeeded", task_id="abcdef123456", type="email", attempt=1,
                      duration_s=0.0125, outcome="succeeded"))  # fmt: skip
    logs.handle(Event("worker.started", detail="3 threads"))
    logs.close()
    first, second = out.getvalue().splitlines()
    assert "INFO    task.succeeded   email    ef123456" in first  # the id's end: short_id
    assert "duration_ms=12.5" in first and "outcome=succeeded" in first
    assert "worker.started" in second and "detail=3 threads" in second
    assert first.index("task.succeeded") == second.index("worker.started")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_failed_attempt_logs_its_traceback(make_logs, fmt: str) -> None:
    logs, out = make_logs(fmt)
    trace = 'Traceback (most recent call last):\n  File "h.py", line 1\nSystemExit: 3\n'
    logs.handle(Event("task.retrying", task_id="t1", type="email", attempt=1,
                      error="SystemExit: 3", traceback=trace))  # fmt: skip
    logs.close()
    if fmt == "json":
        [line] = _json_lines(out)
        assert line["exc"] == trace.rstrip()
    else:
        first, *rest = out.getvalue().splitlines()
        assert "task.retrying" in first and rest == trace.rstrip().splitlines()


def test_auto_format_follows_the_terminal() -> None:
    auto = LoggingConfig(format="auto")
    assert resolve_format(auto, _Tty()) == "text"
    assert resolve_format(auto, io.StringIO()) == "json"
    assert resolve_format(LoggingConfig(format="json"), _Tty()) == "json"
    assert resolve_format(LoggingConfig(format="text"), io.StringIO()) == "text"


def test_emitting_path_holds_no_lock(make_logs) -> None:
    logs, _ = make_logs("json")
    assert logs.handler.lock is None
    assert logs.logger.handlers == [logs.handler]
    assert logs.logger.propagate is False  # the root logger's handlers take locks


def test_emitting_thread_never_blocks_on_a_slow_writer(make_logs) -> None:
    """The writer thread owns the stream: a stream stuck in write() must not stall emitters."""
    gate = threading.Event()
    entered = threading.Event()

    class SlowStream(io.StringIO):
        def write(self, text: str) -> int:
            entered.set()
            gate.wait(10)
            return super().write(text)

    logs, out = make_logs("json", stream=SlowStream())
    logs.handle(Event("task.succeeded", task_id="x", type="t"))
    assert entered.wait(5)  # the writer thread is now stuck inside write()
    emitted = threading.Event()

    def emit_many() -> None:
        for i in range(100):
            logs.handle(Event("task.succeeded", task_id=str(i), type="t"))
        emitted.set()

    emitter = threading.Thread(target=emit_many)
    emitter.start()
    assert emitted.wait(5)
    gate.set()
    emitter.join()
    logs.close()
    assert len(out.getvalue().splitlines()) == 101


def test_close_is_idempotent_and_later_lines_are_dropped(make_logs) -> None:
    logs, out = make_logs("json")
    logs.handle(Event("worker.stopped"))
    logs.close()
    logs.close()
    logs.handle(Event("task.dead", task_id="late", type="t"))
    assert len(out.getvalue().splitlines()) == 1


def test_setup_again_replaces_the_previous_handler(make_logs) -> None:
    first, out1 = make_logs("json")
    first.close()
    second, out2 = make_logs("json")
    second.handle(Event("worker.started"))
    second.close()
    assert out1.getvalue() == "" and len(out2.getvalue().splitlines()) == 1
