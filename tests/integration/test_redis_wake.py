"""RedisBroker: wake() and close() end a get blocked in XREAD at once, not at its next slice.

The engine wakes the dispatcher's get whenever a slot of a type that get is not asking for
frees (issue 13 item 4: with one busy type among idle ones, a wake that waited for the end
of a 100 ms blocking read cut the rate fourfold). The broker here blocks in slices of 10 s, so
a wake that only took effect between slices would take up to 10 s, and about that long when
the read has just begun (the tests wake it once Redis reports it blocked): far more than the
PROMPT_S a loaded machine needs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from runner.brokers.base import Delivery
from runner.brokers.redis.broker import RedisBroker
from runner.model import Task
from tests.integration.conftest import MakeBroker
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

SLICE_S = 10.0
#: Nominally a round trip or two; generous for a loaded 2-core machine, far short of SLICE_S.
PROMPT_S = 2.0
#: A get's timeout here: longer than a slice, so only a slice or a wake can end its read.
GET_TIMEOUT_S = 30.0
#: The broker's settings here; every socket timeout must exceed the slice.
SLOW_SLICES = {"block_slice": SLICE_S, "socket_timeout": 3 * SLICE_S}


class BlockedGet:
    """A get on an idle type in a thread of its own; ``wait_blocked`` returns once it reads."""

    def __init__(self, broker: RedisBroker, timeout: float = GET_TIMEOUT_S) -> None:
        self.broker = broker
        self.result: list[Delivery] | None = None
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self._thread.start()

    def _run(self, timeout: float) -> None:
        self.result = self.broker.get({"idle": 1}, 1, timeout)
        self.ended_at = time.monotonic()

    def wait_blocked(self, client: Any) -> None:
        """Until Redis reports a client blocked (the get's XREAD) or the get ended."""
        deadline = time.monotonic() + 10
        while client.info("clients")["blocked_clients"] < 1 and self._thread.is_alive():
            assert time.monotonic() < deadline, "the get never blocked"
            time.sleep(0.005)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the get did not end"


def test_wake_ends_a_blocked_read_at_once_every_time(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    broker = make_broker(**SLOW_SLICES)
    client = redis_server.client()
    took = []
    for _ in range(5):
        get = BlockedGet(broker)
        get.wait_blocked(client)
        woken_at = time.monotonic()
        broker.wake()
        get.join(SLICE_S + 5)
        took.append(get.ended_at - woken_at)
        assert get.result == []
    print(f"\nwake -> get returned: {', '.join(f'{t * 1000:.1f}' for t in took)} ms")
    assert max(took) < PROMPT_S


def test_a_wake_landing_just_before_the_read_starts_still_ends_it(
    make_broker: MakeBroker,
) -> None:
    """The race the sticky wake must survive: the get has found nothing and checked for a wake,
    then the wake lands, then the XREAD starts (a wake that only ends reads already blocked
    would leave this one to run its whole slice)."""
    broker = make_broker(**SLOW_SLICES)
    line = broker._get_line
    real_read = line.read_then_run  # the XREAD BLOCK (and the poll sent behind it)
    woke: list[float] = []

    def read_after_a_wake(*args: Any, **kwargs: Any) -> Any:
        if not woke:
            woke.append(time.monotonic())
            broker.wake()
        return real_read(*args, **kwargs)

    line.read_then_run = read_after_a_wake  # type: ignore[method-assign]
    start = time.monotonic()
    assert broker.get({"idle": 1}, 1, GET_TIMEOUT_S) == []
    took = time.monotonic() - start
    assert woke, "the get never read"
    assert took < PROMPT_S, f"the get ran {took:.2f}s: the wake was lost until the slice ended"


def test_close_ends_a_blocked_read_at_once_and_leaves_no_key(
    make_broker: MakeBroker, redis_server: RedisServer, redis_namespace: str
) -> None:
    broker = make_broker(**SLOW_SLICES)
    client = redis_server.client()
    get = BlockedGet(broker)
    get.wait_blocked(client)
    closing = time.monotonic()
    broker.close()
    closed = time.monotonic() - closing
    get.join(5)
    assert get.result == []
    assert closed < PROMPT_S
    assert get.ended_at - closing < PROMPT_S
    assert not client.keys(f"{{{redis_namespace}}}:wake:*")


def test_a_wake_with_no_get_waiting_costs_no_round_trip(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    """The engine calls wake() often, under its own lock: only a blocked read needs Redis."""
    broker = make_broker(**SLOW_SLICES)
    client = redis_server.client()
    client.config_resetstat()
    for _ in range(100):
        broker.wake()
    stats = client.info("commandstats")
    assert "cmdstat_xadd" not in stats
    start = time.monotonic()
    assert broker.get({"idle": 1}, 1, GET_TIMEOUT_S) == []
    assert time.monotonic() - start < PROMPT_S  # still sticky: this get ends at once


def test_a_task_put_while_a_get_blocks_is_claimed_by_the_poll_sent_behind_the_read(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    """The get sends a POLL right behind its XREAD BLOCK, which Redis runs as the read
    returns: the new task comes back with no further poll call (one round trip less between
    a publish and the claim; publish -> start p50 on Redis, docs/performance.md)."""
    broker = make_broker(**SLOW_SLICES)
    polls_after_block: list[str] = []
    real_run = broker._run
    blocked = threading.Event()

    def counting_run(name: str, *args: Any, **kwargs: Any) -> Any:
        if blocked.is_set() and name == "POLL":
            polls_after_block.append(name)
        return real_run(name, *args, **kwargs)

    broker._run = counting_run  # type: ignore[method-assign]
    get = BlockedGet(broker)
    get.wait_blocked(redis_server.client())
    blocked.set()
    put_at = time.monotonic()
    broker.put_many([Task("idle", {"n": 1})])
    get.join(SLICE_S + 5)
    assert get.result is not None and [d.task.payload for d in get.result] == [{"n": 1}]
    assert get.ended_at - put_at < PROMPT_S
    assert polls_after_block == []  # claimed by the pipelined poll, not a poll of its own
