"""`dq-run run`'s signal handler (runner.ops.service.serve): a handler runs on the main thread
between two of its bytecodes, maybe while that thread holds a lock, so the first signal's
handler must take none; the main loop still stops on it. (A SIGTERM that landed while the
main thread sat in ``stop.wait()`` once hung a worker for good: the handler's ``stop.set()``
waited for the Event's lock, which its own thread held.)"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from runner import PipelineConfig
from runner.ops.service import RunOptions, serve

_LOCKS = {"lock", "RLock"}


def _config() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "task_types": {"t": {"handler": "tests.unit.aio_handlers:plain"}},
            "metrics": {"enabled": False},
            "logging": {"level": "WARNING"},
        }
    )


def _lock_calls(handler: Any) -> list[str]:
    """Call ``handler`` as a SIGTERM would; the lock acquisitions it made."""
    taken: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") in {"acquire", "__enter__"}:
            owner = type(getattr(arg, "__self__", None)).__name__
            if owner in _LOCKS:
                taken.append(f"{owner}.{arg.__name__} in {frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        handler(signal.SIGTERM, None)
    finally:
        sys.setprofile(None)
    return taken


def test_the_first_signal_takes_no_lock_and_stops_the_run() -> None:
    config = _config()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    taken: list[list[str]] = []

    def signal_it() -> None:
        deadline = time.monotonic() + 20
        while signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]:
            assert time.monotonic() < deadline, "serve() never installed its handler"
            time.sleep(0.01)
        time.sleep(0.2)  # the run is up, its main thread in its loop
        taken.append(_lock_calls(signal.getsignal(signal.SIGTERM)))

    helper = threading.Thread(target=signal_it, daemon=True)
    helper.start()
    t0 = time.monotonic()
    try:
        code = serve(config, RunOptions(simulate=False), out=io.StringIO())
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    helper.join(5)
    assert taken == [[]]
    assert code == 0
    assert time.monotonic() - t0 < 15


def test_a_second_signal_exits_even_when_the_flush_hangs(monkeypatch: Any) -> None:
    """The second signal's flush of the logs runs on a helper thread, waited for at most
    FLUSH_WAIT_S: the main thread may hold the logs' locks where the signal landed."""
    from runner.ops import service

    config = _config()
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
            while signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]:
                time.sleep(0.01)
            time.sleep(0.2)
            handler = signal.getsignal(signal.SIGTERM)
            handler(signal.SIGTERM, None)  # type: ignore[operator]
            asked.append(time.monotonic())
            with contextlib.suppress(Exited):
                handler(signal.SIGTERM, None)  # type: ignore[operator]
        finally:
            release.set()  # the stop that follows flushes too

    helper = threading.Thread(target=signal_twice, daemon=True)
    helper.start()
    try:
        serve(config, RunOptions(simulate=False), out=io.StringIO())
    finally:
        release.set()
        for sig, handler in before.items():
            signal.signal(sig, handler)
    helper.join(5)
    assert exits, "the second signal never reached the exit"
    ((code, at),) = exits
    assert code == 130
    assert at - asked[0] < service.FLUSH_WAIT_S + 2.0
