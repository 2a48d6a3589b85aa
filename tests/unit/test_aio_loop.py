"""The async worker's loop plumbing (runner.engine.aio): launches from another thread start in
batches, one wake-up of the loop for all that wait, and the one-task wait that replaced
``asyncio.wait`` keeps its answers (done, timed out, cancelled) without leaving callbacks on
the task it watched."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from runner.engine.aio import LoopThread, _done_or_due


@pytest.fixture
def loop_thread() -> Any:
    thread = LoopThread("test-loop", lambda seconds, stack: None)
    thread.start()
    yield thread
    thread.stop(timeout=2.0)


def test_launches_made_while_the_loop_is_busy_wake_it_once(loop_thread: LoopThread) -> None:
    loop = loop_thread.loop
    assert loop is not None
    wakes = 0
    plain = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakes
        wakes += 1
        return plain(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    busy, go = threading.Event(), threading.Event()

    async def block() -> None:
        busy.set()
        go.wait(5)  # holds the loop: the launches below queue up meanwhile

    ended: list[int] = []
    all_ended = threading.Event()

    async def one(i: int) -> int:
        return i

    def on_done(task: asyncio.Task[Any]) -> None:
        ended.append(task.result())
        if len(ended) == 50:
            all_ended.set()

    loop_thread.launch(block(), lambda task: None)
    assert busy.wait(5)
    for i in range(50):
        loop_thread.launch(one(i), on_done)
    go.set()
    assert all_ended.wait(5)
    assert sorted(ended) == list(range(50))
    assert wakes == 2  # the blocking one's, then one for all fifty (one each before)


def test_a_launch_after_a_drain_wakes_the_loop_again(loop_thread: LoopThread) -> None:
    """The flag drops before a drain takes the queue: nothing launched later is left behind."""
    for round_ in range(200):
        done = threading.Event()

        async def one() -> None:
            return None

        loop_thread.launch(one(), lambda task, done=done: done.set())
        assert done.wait(5), f"launch {round_} never ran"


def test_done_or_due_returns_when_the_task_is_done() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(asyncio.sleep(0.01))
        started = loop.time()
        await _done_or_due(loop, task, 5.0)
        assert task.done()
        assert loop.time() - started < 2.0
        assert not task._callbacks  # type: ignore[attr-defined]  # ours is gone (None or [])

    asyncio.run(main())


def test_done_or_due_returns_at_the_time_and_leaves_the_task_running() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(asyncio.sleep(5))
        started = loop.time()
        await _done_or_due(loop, task, 0.05)
        assert 0.04 <= loop.time() - started < 2.0
        assert not task.done()
        assert not task._callbacks  # type: ignore[attr-defined]
        task.cancel()

    asyncio.run(main())


def test_cancelling_the_wait_leaves_the_task_running() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(asyncio.sleep(5))
        waiting = loop.create_task(_done_or_due(loop, task, 5.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not task.done()
        assert not task._callbacks  # type: ignore[attr-defined]
        task.cancel()

    asyncio.run(main())
