"""The child side of ``execution: process``: what runs inside each child process.

A child is started with its type's spec (JSON: the handler's ``module:function``, the handler
paths, the config's middlewares, and the ``module:function`` that builds the handlers from it:
runner.app's child_handlers), imports the handler and wraps it as the parent would (payload
validation, the simulator, the config's middlewares: their ``wrap`` runs here, their hooks run
in the parent), says it is ready, then runs one task at a time as its parent asks. Everything
crossing the pipe is JSON (runner.engine.processes holds the parent's side and the messages):

- parent -> child: ``{"run": {...}}`` (the task's payload and context), ``{"cancel": true}``
  (set the running task's ``ctx.cancelled``), ``{"exit": true}``;
- child -> parent: ``{"ready": pid}`` or ``{"failed": why}`` once at start, ``{"log": [level,
  message, fields]}`` for each log record (any logger), and one answer per task: ``{"ok":
  value}`` or ``{"error": {...}}``, with the child's resident memory (``rss``) when the parent
  recycles by memory.

A reader thread takes the parent's messages, so a cancel reaches a busy child; when the parent's
end closes (the parent died, even by SIGKILL), the reader ends the child at once with
``os._exit``, whatever the handler is doing: no orphan outlives its parent. SIGTERM (the parent's
hard timeout) marks ``ctx.cancelled`` and raises SystemExit in the handler, so its ``finally``
blocks run before the child exits (the handler's threads waiting on ``ctx.cancelled`` are
woken as it leaves); SIGINT is ignored (a Ctrl-C reaches the whole process group:
the parent decides what stops).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

from runner.errors import PermanentError, Retry
from runner.model import NO_HEADERS, Cancellation, TaskContext

#: The exit code of a child whose parent went away.
ORPHANED_EXIT = 3
#: The exit code of a child that left on SIGTERM.
TERMINATED_EXIT = 143


def main(conn: Connection, spec_text: str) -> None:
    """A child process's life: import, say ready, run tasks until told to exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = _Child(conn)
    signal.signal(signal.SIGTERM, child.terminated)
    try:
        spec = json.loads(spec_text)
        for path in reversed(spec.get("sys_path", [])):
            if path not in sys.path:
                sys.path.insert(0, path)
        child.forward_logs(int(spec.get("log_level", logging.INFO)))
        child.load(spec)
        child.measure_rss = bool(spec.get("rss"))
    except BaseException as exc:
        child.send({"failed": f"{type(exc).__name__}: {exc}"})
        return
    child.send({"ready": os.getpid()})
    child.serve()


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak (other platforms)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def describe(exc: BaseException) -> dict[str, Any]:
    """A handler's exception as JSON: enough for the parent to decide on a retry."""
    cls = type(exc)
    retry = None
    if isinstance(exc, Retry):
        at = exc.at.timestamp() if exc.at is not None else None
        retry = {"delay": exc.delay, "at": at, "count": exc.count, "message": str(exc)}
    return {
        "kind": cls.__name__,
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "permanent_error": isinstance(exc, PermanentError),
        "retry": retry,
    }


class _Forward(logging.Handler):
    """Sends each log record to the parent, which logs it with the task's fields."""

    def __init__(self, send: Callable[[dict[str, Any]], None], level: int) -> None:
        super().__init__(level)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(getattr(record, "fields", None) or {})
            if not record.name.startswith("runner.task"):
                fields["logger"] = record.name
            if record.exc_info:
                fields["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self._send({"log": [record.levelno, record.getMessage(), fields]})
        except Exception:
            self.handleError(record)


class _TaskLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """ctx.logger in a child: ``extra`` keys travel as the line's fields (the parent adds the
    task's own)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {"fields": dict(kwargs.get("extra") or {})}
        return msg, kwargs


class _Child:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._current: Cancellation | None = None
        self._terminating = False
        # Report the resident memory after each task (the parent recycles by memory).
        self.measure_rss = False
        # Per type: its wrapped handler, and the payload check to run first (None: none).
        self.handlers: dict[str, tuple[Callable[[Any, TaskContext], Any], Any]] = {}

    def send(self, message: dict[str, Any]) -> None:
        self._send_bytes(json.dumps(message, default=str).encode())

    def _send_bytes(self, data: bytes) -> None:
        with self._send_lock:
            self.conn.send_bytes(data)

    def forward_logs(self, level: int) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_Forward(self.send, level))
        root.setLevel(level)

    def load(self, spec: dict[str, Any]) -> None:
        """The handlers, built by the function the spec names (``module:function``, given the
        spec; runner.app's child_handlers): the engine does not build handler chains itself."""
        module_name, _, name = spec["factory"].partition(":")
        factory = getattr(importlib.import_module(module_name), name)
        self.handlers = factory(spec)

    def terminated(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM: past its timeout. The handler sees ctx.cancelled, then SystemExit.

        It runs on the main thread between two of the handler's bytecodes, maybe while that
        thread holds ctx.cancelled's lock (in its ``wait()``): so it only marks it, and
        ``_run`` wakes the handler's other threads that wait on it once SystemExit is out of
        the handler (setting it here could wait for good on that lock)."""
        self._terminating = True
        if self._current is not None:
            self._current.mark()
        raise SystemExit(TERMINATED_EXIT)

    def serve(self) -> None:
        threading.Thread(target=self._read, name="dq-child-reader", daemon=True).start()
        while (message := self._inbox.get()) is not None:
            answer = self._run(message["run"])
            if self.measure_rss:
                answer["rss"] = rss_bytes()
            self._send_bytes(_encoded(answer))

    def _read(self) -> None:
        while True:
            try:
                message = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                os._exit(ORPHANED_EXIT)  # the parent is gone: leave now, whatever runs
            if "cancel" in message:
                current = self._current
                if current is not None:
                    current.set()
            elif "exit" in message:
                self._inbox.put(None)
            else:
                self._inbox.put(message)

    def _run(self, task: dict[str, Any]) -> dict[str, Any]:
        handler, check = self.handlers[task["type"]]
        cancelled = Cancellation()
        ctx = TaskContext(
            task["id"],
            task["type"],
            task["attempt"],
            task["max_attempts"],
            time.monotonic() + task["left_s"],
            cancelled,
            partial(_TaskLogger, logging.getLogger(f"runner.task.{task['type']}"), {}),
            task["headers"] or NO_HEADERS,
        )
        self._current = cancelled
        try:
            payload = task["payload"]
            value = handler(check(payload) if check is not None else payload, ctx)
            return {"ok": value}
        except BaseException as exc:
            if self._terminating:
                cancelled.set()  # out of the handler: no lock of it is held here
                raise
            return {"error": describe(exc)}
        finally:
            self._current = None


def _encoded(answer: dict[str, Any]) -> bytes:
    """An answer as the bytes sent, encoded once: a return value JSON cannot carry is sent as
    ``unencodable`` (why) instead."""
    try:
        return json.dumps(answer, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        if "ok" not in answer:  # an error's description: strings, save an odd Retry delay
            return json.dumps(answer, default=str).encode()
        return json.dumps({**answer, "ok": None, "unencodable": str(exc)}).encode()
