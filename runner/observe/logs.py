"""Structured logging: one line per engine event, JSON for machines, aligned text for people.

``setup_logging(config)`` configures the ``runner`` logger tree and returns a ``LogListener``
that turns engine events into log records. Handlers get ``task_logger(...)`` as ``ctx.logger``,
so their own lines carry the task's fields and use the same output.

Why the emitting side takes no lock: worker threads can receive an asynchronous interrupt (see
timeouts.py). On CPython 3.11 an interrupt that lands while a thread holds a logging handler's
lock leaves that lock held, and every later log call in the process deadlocks. So the ``runner``
tree has exactly one handler, a ``QueueHandler`` without a lock that pushes onto a
``queue.SimpleQueue`` (whose ``put`` is one C call), and a ``QueueListener`` thread formats and
writes. The tree does not propagate to the root logger, whose handlers do take locks.

The price is that lines still queued when the process dies are lost: ``os._exit`` (or a kill)
does not wait for the writer. So an event with ``flush`` set (a redelivered task's
``task.started``: its handler may be what killed the last process, and may kill this one) is
written through: the emitting thread waits, at most ``WRITE_WAIT_S``, until the writer has
written and flushed that record. Waiting takes a lock (an Event's), which is safe there because
interrupts land only inside handler code (timeouts.py) and the engine emits it before the handler
runs. Every other event stays fire-and-forget.

What a person sees: per-task publish events (``task.published``) are DEBUG, so publishing 3,000
tasks does not print 3,000 lines at INFO (the simulator logs one INFO line per batch); so are the
memory broker's ``task.dead`` with reason ``shutdown`` (one per task still queued at shutdown:
``dq-run run`` logs one line per type instead). On a terminal, text lines longer than the
terminal wrap with an indent under the level column. Each text line is written holding
``STDERR_LOCK``, which the progress view also holds while it draws its first and last frame.

Size: about 420 lines, over our 400: both formats (JSON and aligned text, with wrapping to the
terminal) and the lock-free path from worker threads to the writer thread live together because
they share the record fields.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import logging.handlers
import os
import queue
import socket
import sys
import textwrap
import threading
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from runner.config.models import LoggingConfig
from runner.eventlog import FIELDS_ATTR
from runner.eventlog import log_event as log_event  # noqa: PLC0414  (re-exported for callers)
from runner.events import Event, EventName
from runner.model import DeadReason, short_id

ROOT_LOGGER = "runner"
TASK_LOGGER = "runner.task"
# The attribute of a written-through record: a threading.Event the writer sets once it is out.
WRITTEN_ATTR = "dq_written"
# The attribute of a flush() marker: a record the writer only acknowledges.
MARKER_ATTR = "dq_marker"
#: How long flush() waits for the lines queued before it (a backlog on a slow terminal).
FLUSH_WAIT_S = 2.0
#: How long a written-through line may hold up its thread (a stalled stream, a long backlog).
WRITE_WAIT_S = 5.0

# Order of keys in a JSON line; keys not listed here follow in insertion order.
_KEY_ORDER = (
    "ts", "level", "event", "task_id", "type", "attempt", "duration_ms", "queue_wait_ms",
    "outcome", "error", "reason", "delay_ms", "message", "detail", "host", "pid",
)  # fmt: skip

_WARNING_EVENTS = frozenset(
    {
        EventName.TASK_DEAD,
        EventName.TASK_TIMEOUT,
        EventName.TASK_OVERRUN,
        EventName.TASK_LEASE_LOST,
        EventName.BROKER_RECONNECTING,
        EventName.MIDDLEWARE_FAILED,
        EventName.SCHEDULE_MISSED,
        EventName.SCHEDULE_FULL,
        EventName.SCHEDULE_FAILED,
        EventName.SCHEDULE_CLOCK_SKEW,
        EventName.CIRCUIT_OPENED,
    }
)
# One per task published: the publisher logs one INFO line per batch instead.
_DEBUG_EVENTS = frozenset({EventName.TASK_PUBLISHED})
# Read once: a member lookup costs 0.1 us on Python 3.11, and event_level runs for every event.
_DEAD, _SHUTDOWN = EventName.TASK_DEAD, DeadReason.SHUTDOWN
#: Held while a text line is written to stderr, and by the progress view while it starts and
#: stops (see progress.py), so a line never lands inside the panel's first or last frame.
#: Only the writer thread and the main thread take it (never a worker thread); reentrant, for
#: a signal handler that runs while its thread holds it.
STDERR_LOCK = threading.RLock()
#: Continuation lines of a wrapped text line start under the level column.
WRAP_INDENT = " " * len("12:00:01.234 ")


def event_level(name: str, reason: str | None = None) -> int:
    """The level an engine event is logged at: WARNING for trouble, DEBUG for publishing and
    for the memory broker's shutdown drain (``task.dead`` with reason ``shutdown``), INFO for
    the rest."""
    if name in _DEBUG_EVENTS or (reason == _SHUTDOWN and name == _DEAD):
        return logging.DEBUG
    return logging.WARNING if name in _WARNING_EVENTS else logging.INFO


def event_fields(event: Event) -> dict[str, Any]:
    """An event as log fields: milliseconds instead of seconds, None fields left out."""
    fields: dict[str, Any] = {"event": event.name}
    for key in ("task_id", "type", "attempt", "root_id", "parent_id"):
        value = getattr(event, key)
        if value is not None:
            fields[key] = value
    for key, out in (("duration_s", "duration_ms"), ("queue_wait_s", "queue_wait_ms"),
                     ("delay_s", "delay_ms"), ("lag_s", "lag_ms")):  # fmt: skip
        value = getattr(event, key)
        if value is not None:
            fields[out] = round(value * 1000.0, 3)
    for key in ("outcome", "error", "reason", "schedule", "tick", "detail"):
        value = getattr(event, key)
        if value is not None:
            fields[key] = value
    if event.traceback:
        fields["exc"] = event.traceback.rstrip()  # printed below the line in text format
    return fields


def resolve_format(config: LoggingConfig, stream: TextIO | None = None) -> str:
    """``json`` or ``text``: ``auto`` means text on a terminal, JSON otherwise."""
    if config.format != "auto":
        return config.format
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


class _LockFreeQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler whose handle() takes no lock (see the module docstring)."""

    def createLock(self) -> None:
        self.lock = None  # Handler.acquire/release skip a None lock

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Resolve the message and traceback now, in the emitting thread: args may be mutated
        # later, and the listener must not touch live frames. Formatting is the listener's job.
        record = copy.copy(record)
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info = None
        return record


class _Writer(logging.handlers.QueueListener):
    """The writer thread; sets a written-through record's Event once its handlers returned
    (StreamHandler.emit flushes, so the line is on the stream by then)."""

    def handle(self, record: logging.LogRecord) -> None:
        try:
            if not record.__dict__.get(MARKER_ATTR):  # a flush() marker: nothing to write
                super().handle(record)
        finally:
            written = record.__dict__.get(WRITTEN_ATTR)
            if written is not None:
                written.set()


class _CurrentStderr:
    """Writes to whatever sys.stderr is at write time (so Rich's Live can redirect it)."""

    def write(self, text: str) -> int:
        with STDERR_LOCK:
            return sys.stderr.write(text)

    def flush(self) -> None:
        with STDERR_LOCK:
            sys.stderr.flush()


def terminal_width(stream: TextIO | None = None) -> Callable[[], int | None] | None:
    """For a terminal ``stream`` (default: stderr at setup), a function that returns its
    width now (it follows resizes; None once it cannot tell); None when it is not a terminal."""
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    if not (callable(isatty) and isatty()):
        return None
    try:
        fd = target.fileno()
    except (AttributeError, OSError, ValueError):  # a terminal-like object without a file
        return None

    def width() -> int | None:
        try:
            return os.get_terminal_size(fd).columns
        except OSError:
            return None

    return width


def wrap_line(line: str, width: int, indent: str = WRAP_INDENT) -> str:
    """``line`` broken at spaces into lines of at most ``width`` characters, every line after
    the first starting with ``indent``; a word longer than a line is split."""
    if len(line) <= width or width <= len(indent) + 10:
        return line
    return "\n".join(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: Mapping[str, Any] = getattr(record, FIELDS_ATTR, None) or {}
    out = dict(fields)
    out.setdefault("event", "log")
    if record.message and record.message != out["event"]:
        out["message"] = record.message
    if out["event"] == "log":
        out["logger"] = record.name
    if record.exc_text:
        out["exc"] = record.exc_text
    return out


def _iso_utc(ts: float) -> str:
    stamp = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, the event's fields, host, pid."""

    def __init__(self) -> None:
        super().__init__()
        self._host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        fields = _record_fields(record)
        line: dict[str, Any] = {"ts": _iso_utc(fields.pop("ts", record.created))}
        line["level"] = record.levelname
        line.update(fields)
        line["host"] = self._host
        line["pid"] = record.process
        ordered = {key: line[key] for key in _KEY_ORDER if key in line}
        ordered.update((key, value) for key, value in line.items() if key not in ordered)
        return json.dumps(ordered, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``12:00:01.234 INFO    task.succeeded   email    3f2a9c1e  attempt=1 duration_ms=12.5``
    (the task id in its short form, runner.model.short_id)."""

    def __init__(self, width: Callable[[], int | None] | None = None) -> None:
        # With ``width`` (the terminal's width now), a longer line wraps with WRAP_INDENT; a
        # traceback below it is printed as it is.
        super().__init__()
        self._width = width

    def format(self, record: logging.LogRecord) -> str:
        fields = _record_fields(record)
        ts = fields.pop("ts", record.created)
        clock = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        event = fields.pop("event")
        type_ = str(fields.pop("type", ""))
        task_id = short_id(str(fields.pop("task_id", "")))
        message = fields.pop("message", "")
        exc = fields.pop("exc", None)
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        head = f"{clock} {record.levelname:<7} {event:<16} {type_:<8} {task_id:<8}"
        line = " ".join(part for part in (head, message, pairs) if part).rstrip()
        width = self._width() if self._width is not None else None
        if width is not None:
            line = "\n".join(wrap_line(part, width) for part in line.split("\n"))
        return f"{line}\n{exc}" if exc else line


class LogListener:
    """Logs every engine event (an events.Listener); ``close()`` flushes and stops the writer."""

    def __init__(
        self,
        logger: logging.Logger,
        handler: _LockFreeQueueHandler,
        writer: _Writer,
        output: logging.Handler,
        format: str,
    ) -> None:
        self.logger = logger
        self.handler = handler
        self.format = format
        self._writer = writer
        self._output = output
        self._closed = False

    def handle(self, event: Event) -> None:
        level = event_level(event.name, event.reason)
        if not self.logger.isEnabledFor(level):
            return  # the cheap exit: per-task events cost one dict lookup when filtered out
        fields = event_fields(event)
        fields["ts"] = event.ts
        # makeRecord + handle skips findCaller's stack walk; the call site is the bus anyway.
        record = self.logger.makeRecord(
            self.logger.name, level, "(events)", 0, event.name, (), None,
            extra={FIELDS_ATTR: fields},
        )  # fmt: skip
        if event.flush:
            self._write_through(record)
        else:
            self.logger.handle(record)

    def write_now(self, level: int, event: str, message: str = "", **fields: Any) -> None:
        """Log a runner line and return once it is written out, even after ``close()``.

        For the last words of a process that is about to end with ``os._exit``. After close
        the line is formatted and written in the calling thread (the writer thread is gone).
        """
        if not self.logger.isEnabledFor(level):
            return
        record = self.logger.makeRecord(
            self.logger.name, level, "(runner)", 0, message or event, (), None,
            extra={FIELDS_ATTR: {"event": event, **fields}},
        )  # fmt: skip
        if not self._closed:
            self._write_through(record)
            return
        record.message = record.getMessage()  # what the queue handler's prepare() does
        self._output.handle(record)
        self._output.flush()

    def _write_through(self, record: logging.LogRecord) -> None:
        written = threading.Event()
        record.__dict__[WRITTEN_ATTR] = written
        self.logger.handle(record)
        # After close the record went to a NullHandler: nothing would ever set the Event.
        if not self._closed:
            written.wait(WRITE_WAIT_S)

    def flush(self, timeout: float = FLUSH_WAIT_S) -> bool:
        """Wait until every line queued so far is written out (at most ``timeout`` seconds);
        False if the wait timed out. The progress view calls it before its last frame, so the
        panel ends up below the last lines. A no-op after close."""
        if self._closed:
            return True
        marker = logging.LogRecord(self.logger.name, logging.DEBUG, "(flush)", 0, "", None, None)
        written = threading.Event()
        marker.__dict__[MARKER_ATTR] = True
        marker.__dict__[WRITTEN_ATTR] = written
        self.handler.enqueue(marker)  # past the level check and prepare(): the writer skips it
        return written.wait(timeout)

    def close(self) -> None:
        """Write out everything queued, stop the writer thread, detach. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._writer.stop()  # processes the queue up to its sentinel, then joins
        self._output.flush()
        self.logger.removeHandler(self.handler)
        # Records logged after close are dropped rather than reaching logging.lastResort,
        # whose handler takes a lock.
        self.logger.addHandler(logging.NullHandler())


def setup_logging(config: LoggingConfig, *, stream: TextIO | None = None) -> LogListener:
    """Configure the ``runner`` logger tree and start its writer thread.

    ``stream`` defaults to the current ``sys.stderr`` (looked up at each write). Calling it
    again replaces the previous setup's handler (close the previous listener first).
    """
    fmt = resolve_format(config, stream)
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else TextFormatter(terminal_width(stream))
    )
    output = logging.StreamHandler(stream if stream is not None else _CurrentStderr())
    output.setFormatter(formatter)
    events: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = _LockFreeQueueHandler(events)
    writer = _Writer(events, output)

    logger = logging.getLogger(ROOT_LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(config.level)
    logger.propagate = False
    # Warm the level cache now: a cache miss takes logging's module lock in the caller.
    for name in (ROOT_LOGGER, TASK_LOGGER):
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            logging.getLogger(name).isEnabledFor(level)
    _task_base_logger()
    writer.start()
    return LogListener(logger, handler, writer, output, fmt)


if TYPE_CHECKING:
    _AdapterBase = logging.LoggerAdapter[logging.Logger]
else:
    _AdapterBase = logging.LoggerAdapter


class TaskLoggerAdapter(_AdapterBase):
    """ctx.logger: adds task_id, type and attempt to each line; ``extra`` keys become fields."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        fields = dict(self.extra or {})
        fields.update(kwargs.get("extra") or {})
        kwargs["extra"] = {FIELDS_ATTR: fields}
        return msg, kwargs


@functools.cache
def _task_base_logger() -> logging.Logger:
    # getLogger takes logging's module lock; look it up once, never from handler code.
    return logging.getLogger(TASK_LOGGER)


def task_logger(task_id: str, type: str, attempt: int) -> logging.LoggerAdapter[logging.Logger]:
    """The logger a handler gets as ``ctx.logger``; its lines have event ``task.log``.

    Takes no lock once warmed (setup_logging warms it), so the engine may build it lazily
    while handler code runs.
    """
    fields = {"event": "task.log", "task_id": task_id, "type": type, "attempt": attempt}
    return TaskLoggerAdapter(_task_base_logger(), fields)
