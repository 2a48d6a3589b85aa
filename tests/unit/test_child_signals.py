"""A process type's child on SIGTERM (its parent's hard timeout; runner.engine.child): the
handler runs on the child's main thread between two of its bytecodes, maybe while that thread
holds ``ctx.cancelled``'s own lock (inside ``ctx.cancelled.wait()``), so it must wait for no
lock: it marks ``ctx.cancelled`` and raises SystemExit at once. The threads a handler started
that wait on ``ctx.cancelled`` are woken once that SystemExit has left the handler."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from runner.engine.child import TERMINATED_EXIT, _Child
from runner.model import Cancellation, TaskContext


def _task(type_name: str = "t") -> dict[str, Any]:
    return {"id": "t1", "type": type_name, "attempt": 1, "max_attempts": 1, "left_s": 30.0,
            "headers": None, "payload": None}  # fmt: skip


def test_sigterm_needs_no_lock_the_main_thread_holds() -> None:
    """The signal landing while the handler's thread holds ``ctx.cancelled``'s lock: the
    handler still raises SystemExit at once (before, it waited for that lock: the child hung
    until its parent's SIGKILL), and ``is_set()`` already answers True."""
    child = _Child(conn=None)  # type: ignore[arg-type]  # the handler never touches it
    cancelled = Cancellation()
    assert cancelled.wait(0) is False  # its Event now exists, as in a handler that waited
    child._current = cancelled
    event = cancelled._box["event"]
    raised: list[BaseException] = []

    def land() -> None:
        try:
            child.terminated(signal.SIGTERM, None)
        except BaseException as exc:  # what it raises is the point
            raised.append(exc)

    with event._cond:  # type: ignore[attr-defined]  # what Event.wait() holds between its steps
        lander = threading.Thread(target=land, daemon=True)
        lander.start()
        lander.join(2.0)
        returned = not lander.is_alive()
    assert returned, "the SIGTERM handler waited for a lock the interrupted thread holds"
    assert len(raised) == 1 and isinstance(raised[0], SystemExit)
    assert raised[0].code == TERMINATED_EXIT
    assert cancelled.is_set()


def test_a_handlers_waiting_thread_wakes_once_sigterm_has_left_the_handler() -> None:
    """A handler that started a thread blocked in ``ctx.cancelled.wait()``: the SIGTERM (played
    here as the handler's own call of the signal handler) ends the task with SystemExit, and
    that thread is woken, not left waiting out its timeout."""
    child = _Child(conn=None)  # type: ignore[arg-type]
    woke: list[float] = []
    started = threading.Event()

    def handler(payload: Any, ctx: TaskContext) -> None:
        def waiter() -> None:
            started.set()
            ctx.cancelled.wait(30)
            woke.append(time.monotonic())

        threading.Thread(target=waiter, daemon=True).start()
        started.wait(5)
        time.sleep(0.05)  # the waiter is inside wait()
        child.terminated(signal.SIGTERM, None)

    child.handlers["t"] = (handler, None)
    with pytest.raises(SystemExit):
        child._run(_task())
    ended = time.monotonic()
    deadline = ended + 5
    while not woke and time.monotonic() < deadline:
        time.sleep(0.01)
    assert woke and woke[0] - ended < 1.0
