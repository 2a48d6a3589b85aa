"""`dq-run run`'s signal handler (runner.ops.service.serve): a handler runs on the main thread
between two of its bytecodes, maybe while that thread holds a lock, so the first signal's
handler must wait for none; the main loop still stops on it. (A SIGTERM that landed while the
main thread sat in ``stop.wait()`` once hung a worker for good: the handler's ``stop.set()``
waited for the Event's lock, which its own thread held.) The second signal's steps that need
locks are bounded."""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import time
from typing import Any

from runner import PipelineConfig
from runner.ops.service import RunOptions, serve


class _Events:
    """``threading`` for runner.ops.service, with every Event it makes kept (in order)."""

    def __init__(self) -> None:
        self.made: list[threading.Event] = []

    def Event(self) -> threading.Event:  # threading's name for it
        event = threading.Event()
        self.made.append(event)
        return event

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)


def _config() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "task_types": {"t": {"handler": "tests.unit.aio_handlers:plain"}},
            "metrics": {"enabled": False},
            "logging": {"level": "WARNING"},
        }
    )


def _installed(before: Any, timeout: float = 20.0) -> Any:
    """serve()'s SIGTERM handler, once it is installed (and the run up a moment)."""
    deadline = time.monotonic() + timeout
    while signal.getsignal(signal.SIGTERM) is before:
        assert time.monotonic() < deadline, "serve() never installed its handler"
        time.sleep(0.01)
    time.sleep(0.2)
    return signal.getsignal(signal.SIGTERM)


def test_the_first_signal_needs_no_lock_the_main_thread_holds(monkeypatch: Any) -> None:
    """The signal is played as it lands in ``stop.wait()``: ``stop``'s lock held while the
    handler runs. Before, the handler's ``stop.set()`` waited for that lock for good."""
    from runner.ops import service

    events = _Events()
    monkeypatch.setattr(service, "threading", events)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    returned: list[bool] = []

    def signal_it() -> None:
        handler = _installed(before[signal.SIGTERM])
        stop = events.made[0]  # serve()'s first Event: the main loop waits on it
        with stop._cond:  # type: ignore[attr-defined]  # where the signal lands
            landing = threading.Thread(target=handler, args=(signal.SIGTERM, None))
            landing.start()
            landing.join(2.0)
            returned.append(not landing.is_alive())

    helper = threading.Thread(target=signal_it, daemon=True)
    helper.start()
    t0 = time.monotonic()
    try:
        code = serve(_config(), RunOptions(simulate=False), out=io.StringIO())
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    helper.join(5)
    assert returned == [True], "the handler waited for the lock its thread would hold"
    assert code == 0
    assert time.monotonic() - t0 < 15


def test_a_second_signal_exits_even_when_the_flush_hangs(monkeypatch: Any) -> None:
    """The second signal's flush of the logs runs on a helper thread, waited for at most
    FLUSH_WAIT_S: the main thread may hold the logs' locks where the signal landed."""
    from runner.ops import service

    release = threading.Event()
    exits: list[tuple[int, float]] = []

    def stuck_flush(self: Any) -> None:
        release.wait(30)  # as a flush waiting for a lock its own thread holds

    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        exits.append((code, time.monotonic()))
        raise Exited  # out of the handler, as os._exit would leave it

    monkeypatch.setattr(service.Runner, "close_observers", stuck_flush)
    monkeypatch.setattr(service.os, "_exit", fake_exit)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    asked: list[float] = []

    def signal_twice() -> None:
        try:
            handler = _installed(before[signal.SIGTERM])
            handler(signal.SIGTERM, None)  # type: ignore[operator]
            asked.append(time.monotonic())
            with contextlib.suppress(Exited):
                handler(signal.SIGTERM, None)  # type: ignore[operator]
        finally:
            release.set()  # the stop that follows flushes too

    helper = threading.Thread(target=signal_twice, daemon=True)
    helper.start()
    try:
        serve(_config(), RunOptions(simulate=False), out=io.StringIO())
    finally:
        release.set()
        for sig, handler in before.items():
            signal.signal(sig, handler)
    helper.join(5)
    assert exits, "the second signal never reached the exit"
    ((code, at),) = exits
    assert code == 130
    assert at - asked[0] < service.FLUSH_WAIT_S + 2.0
