"""RedisBroker: expired leases are found by every type's polls, behind any number of live ones.

Issue 13 item 5 asks that a dead worker's deliveries come back within about one visibility
timeout. Ways they could wait longer: the look for expired leases (throttled to ten per
visibility timeout) used up by polls for other types; XAUTOCLAIM giving up after COUNT x 10
pending entries when the expired ones sit behind live ones; and a dead worker's many leases
found a few per look, one look per tenth of a visibility timeout.
"""

from __future__ import annotations

import time

import pytest

from runner.model import Task
from tests.integration.conftest import MakeBroker

pytestmark = pytest.mark.redis


def test_a_poll_for_other_types_does_not_use_up_a_types_look_for_expired_leases(
    make_broker: MakeBroker,
) -> None:
    """The engine's blocking get asks only for types with free slots, ten times a second: the
    look for expired leases it makes must not stand for the types it did not ask for."""
    lease_s = 2.0  # looks every 0.2 s
    broker, dead = make_broker(visibility_timeout=lease_s), make_broker(visibility_timeout=lease_s)
    dead.put_many([Task("busy", "orphan")])
    (orphan,) = dead.get({"busy": 1}, 1, 1.0)  # its worker dies
    time.sleep(lease_s + 0.1)
    assert broker.get({"idle": 1}, 1, 0) == []  # a poll that cannot take "busy" looks first
    _, got = broker.exchange([], {"busy": 1}, 1)  # well within 0.2 s of that look
    assert [(d.task.id, d.redelivered) for d in got] == [(orphan.task.id, True)]


def test_expired_leases_behind_many_live_ones_are_found(make_broker: MakeBroker) -> None:
    lease_s = 1.0
    live, dead = make_broker(visibility_timeout=lease_s), make_broker(visibility_timeout=lease_s)
    live.put_many([Task("a", i) for i in range(60)])
    held = live.get({"a": 40}, 40, 0)  # the 40 oldest entries, leases kept alive below
    (orphan,) = dead.get({"a": 1}, 1, 0)  # the 41st: its worker dies
    time.sleep(lease_s + 0.1)
    assert all(live.extend(held))  # renewed: only the orphan's lease has expired
    _, got = live.exchange([], {"a": 1}, 1)  # one slot: XAUTOCLAIM COUNT 1 looks at 10
    assert [(d.task.payload, d.redelivered) for d in got] == [(orphan.task.payload, True)]
    assert got[0].task.attempt == 2


def test_after_finding_an_expired_lease_the_next_poll_looks_again(make_broker: MakeBroker) -> None:
    """A dead worker held several tasks: they all come back together, not one look (a tenth
    of a visibility timeout) apart, with the fresh tasks behind them."""
    lease_s = 2.0  # looks every 0.2 s
    live, dead = make_broker(visibility_timeout=lease_s), make_broker(visibility_timeout=lease_s)
    live.put_many([Task("a", i) for i in range(3)])
    orphans = dead.get({"a": 3}, 3, 0)  # their worker dies
    live.put_many([Task("a", "fresh")])
    time.sleep(lease_s + 0.1)
    got = [d for _ in range(3) for d in live.exchange([], {"a": 1}, 1)[1]]  # within 0.2 s
    assert [(d.task.payload, d.redelivered) for d in got] == [(0, True), (1, True), (2, True)]
    assert {d.task.id for d in got} == {d.task.id for d in orphans}
