"""Written-through log lines: an event with ``flush`` is on the stream when ``handle`` returns;
``write_now`` writes a runner's last words, even after close. Other lines stay asynchronous
(tests/unit/test_logs.py: a stuck writer never stalls an emitter)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from runner.config.models import LoggingConfig
from runner.events import Event
from runner.observe import logs as logs_module
from runner.observe.logs import LogListener, setup_logging

#: Each write of the slow stream below takes this long.
_SLOW_S = 0.2


class _SlowStream(io.StringIO):
    """A stream whose writes take a while, or block until ``gate`` is set when it is given."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.gate = gate

    def write(self, text: str) -> int:
        if self.gate is not None:
            self.gate.wait(30)
        else:
            time.sleep(_SLOW_S)
        return super().write(text)


@pytest.fixture
def made():
    listeners: list[LogListener] = []
    yield listeners
    for listener in listeners:
        listener.close()


def _logs(made: list[LogListener], stream: io.StringIO, fmt: str = "json") -> LogListener:
    listener = setup_logging(LoggingConfig(format=fmt, level="INFO"), stream=stream)
    made.append(listener)
    return listener


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_flushed_event_is_on_the_stream_when_handle_returns(made, fmt: str) -> None:
    out = _SlowStream()
    logs = _logs(made, out, fmt)
    logs.handle(Event("task.succeeded", task_id="before", type="t"))  # INFO, queued
    logs.handle(Event("task.started", task_id="killer01", type="t", attempt=2, flush=True))
    written = out.getvalue()
    assert "killer01" in written
    assert "before" in written  # the queue is in order: what came first is out first


def test_an_ordinary_event_does_not_wait_for_the_writer(made) -> None:
    out = _SlowStream()
    logs = _logs(made, out)
    t0 = time.monotonic()
    logs.handle(Event("task.started", task_id="plain", type="t", attempt=1))
    assert time.monotonic() - t0 < _SLOW_S
    assert "plain" not in out.getvalue()


def test_the_wait_for_a_stuck_stream_is_bounded(made, monkeypatch) -> None:
    monkeypatch.setattr(logs_module, "WRITE_WAIT_S", 0.3)
    gate = threading.Event()
    logs = _logs(made, _SlowStream(gate))
    t0 = time.monotonic()
    logs.handle(Event("task.started", task_id="stuck", type="t", attempt=2, flush=True))
    waited = time.monotonic() - t0
    gate.set()
    assert 0.3 <= waited < 3.0


def test_write_now_writes_through_before_and_at_once_after_close(made) -> None:
    out = _SlowStream()
    logs = _logs(made, out)
    logs.write_now(logging.WARNING, "process.first", "one")
    assert "process.first" in out.getvalue()
    logs.close()
    logs.write_now(logging.WARNING, "process.threads_left", "two", threads=["left"])
    # Lines of other loggers (event "log": a background thread another test left behind, in a
    # whole-suite run) may land in between; this test is about the runner's own two.
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    lines = [line for line in lines if line["event"] != "log"]
    assert [line["event"] for line in lines] == ["process.first", "process.threads_left"]
    assert lines[1]["level"] == "WARNING"
    assert lines[1]["message"] == "two"
    assert lines[1]["threads"] == ["left"]
    logs.handle(Event("task.dead", task_id="late", type="t"))  # events after close: dropped
    assert "late" not in out.getvalue()


def test_write_now_respects_the_level(made) -> None:
    out = io.StringIO()
    listener = setup_logging(LoggingConfig(format="json", level="ERROR"), stream=out)
    made.append(listener)
    listener.close()
    listener.write_now(logging.WARNING, "process.threads_left", "quiet")
    assert out.getvalue() == ""
