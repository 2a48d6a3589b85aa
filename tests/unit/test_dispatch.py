"""The dispatcher's loop on real books with a fetcher that fakes the broker's answers."""

from __future__ import annotations

import threading

import pytest

from runner.brokers.base import Delivery
from runner.engine import dispatch
from runner.engine.books import Books, Fetch
from runner.engine.dispatch import Dispatcher
from runner.model import Task


class Clock:
    """The dispatcher's clock: it moves only when the fake broker says time passed, so the
    test does not depend on how fast this machine runs the fetch."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class OneFetch:
    """Answers the dispatcher's first fetch with one task after ``wait_s`` (of the fake
    clock), then stops it."""

    def __init__(
        self, books: Books, stopping: threading.Event, clock: Clock, wait_s: float
    ) -> None:
        self.books = books
        self.stopping = stopping
        self.clock = clock
        self.wait_s = wait_s
        self.fetches: list[Fetch] = []

    def run(self, fetch: Fetch, by_dispatcher: bool) -> int:
        self.fetches.append(fetch)
        self.clock.now += self.wait_s
        delivery = Delivery(Task("a", None), f"r{len(self.fetches)}")
        self.books.fetched(fetch.reservation, [delivery], by_dispatcher)
        self.stopping.set()
        return 1


@pytest.mark.parametrize(("wait_s", "yields"), [(0.05, 1), (0.0, 0)])
def test_after_a_get_that_waited_the_dispatcher_lets_the_woken_thread_run_first(
    wait_s: float, yields: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocking get that waited (the process was idle) is followed by one yield of the
    interpreter lock, so the worker thread it woke starts before the next poll; a get that
    found tasks at once (a busy process) is not."""
    yielded: list[float] = []
    clock = Clock()
    monkeypatch.setattr(dispatch, "time", clock)
    monkeypatch.setattr(dispatch, "yield_lock", lambda: yielded.append(clock.now))
    stopping = threading.Event()
    books = Books({"a": 2}, 2, 2, stopping, submit=lambda o: None, wake_broker=lambda: None)
    fetcher = OneFetch(books, stopping, clock, wait_s)
    dispatcher = Dispatcher(books, fetcher, None, stopping)  # type: ignore[arg-type]
    dispatcher.start()
    dispatcher.join(5)
    assert not dispatcher.is_alive()
    assert [f.block for f in fetcher.fetches] == [True]
    assert len(yielded) == yields
