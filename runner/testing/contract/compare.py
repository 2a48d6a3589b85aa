"""Broker contract, compare-and-set with a put (``put_if``, what a schedule's tick fires by) and the
key reads and deletes beside it (``scan_values``, ``delete_values``).

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
``settle_effects``.
"""

from __future__ import annotations

import threading
import time

import pytest

from runner.brokers.base import Broker, Depth, Effects, Settle, SetValue
from runner.errors import QueueFull
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    PROMPTLY_S,
    get_one,
    put,
    task,
)


def _keyed(make_broker: BrokerMaker, **settings: object) -> Broker:
    broker = make_broker(**settings)
    if not broker.settle_effects:
        pytest.skip(f"{type(broker).__name__} declares settle_effects = False")
    return broker


def _set_by_settle(broker: Broker, *values: SetValue) -> None:
    put(broker, task("c", "carrier"))
    delivery = get_one(broker, "c", timeout=GET_TIMEOUT_S)
    assert broker.settle_many([Settle(delivery, "ack", effects=Effects(sets=values))])


def test_put_if_sets_and_puts_when_the_key_holds_what_is_expected(
    make_broker: BrokerMaker,
) -> None:
    broker = _keyed(make_broker)
    assert broker.put_if("tick", None, "t1", [task("a", 1), task("b", 2)]) is True
    assert broker.read_values(["tick"]) == {"tick": "t1"}
    assert broker.put_if("tick", "t1", "t2", [task("a", 3)]) is True
    assert broker.read_values(["tick"]) == {"tick": "t2"}
    got = broker.get(ALL, 10, GET_TIMEOUT_S)
    assert sorted((d.task.type, d.task.payload) for d in got) == [("a", 1), ("a", 3), ("b", 2)]


def test_put_if_changes_nothing_when_the_key_holds_something_else(
    make_broker: BrokerMaker,
) -> None:
    broker = _keyed(make_broker)
    assert broker.put_if("tick", None, "t1", []) is True  # a bare compare-and-set
    assert broker.put_if("tick", None, "t2", [task("a", 1)]) is False  # it is not absent
    assert broker.put_if("tick", "t0", "t2", [task("a", 1)]) is False  # nor t0
    assert broker.read_values(["tick"]) == {"tick": "t1"}
    assert broker.depth().get("a", Depth()) == Depth()
    assert broker.put_if("other", "t1", "x", [task("a", 1)]) is False  # absent is not t1
    assert broker.read_values(["other"]) == {}


def test_put_if_never_waits_for_room_and_a_full_broker_changes_nothing(
    make_broker: BrokerMaker,
) -> None:
    broker = _keyed(make_broker, capacity=2, overflow="block", enqueue_timeout=GET_TIMEOUT_S)
    put(broker, task("a", 0), task("a", 1))
    started = time.monotonic()
    with pytest.raises(QueueFull):
        broker.put_if("tick", None, "t1", [task("b", 2)])
    assert time.monotonic() - started < PROMPTLY_S  # not the 30 s enqueue_timeout
    assert broker.read_values(["tick"]) == {}
    assert broker.depth().get("b", Depth()) == Depth()

    assert broker.ack(get_one(broker, "a"))
    assert broker.put_if("tick", None, "t1", [task("b", 2)]) is True
    assert broker.depth()["b"] == Depth(ready=1)


def test_a_put_if_task_in_the_future_is_delayed(make_broker: BrokerMaker) -> None:
    broker = _keyed(make_broker)
    later = task("a", 1, not_before=broker.now() + 30)
    assert broker.put_if("tick", None, "t1", [later]) is True
    assert broker.depth()["a"] == Depth(delayed=1)


def test_concurrent_put_ifs_of_one_expected_value_have_one_winner(
    make_broker: BrokerMaker,
) -> None:
    broker = _keyed(make_broker)
    broker.put_if("tick", None, "t1", [])
    wins: list[int] = []
    start = threading.Barrier(8)

    def fire(n: int) -> None:
        start.wait()
        if broker.put_if("tick", "t1", "t2", [task("a", n)]):
            wins.append(n)

    threads = [threading.Thread(target=fire, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GET_TIMEOUT_S)
    assert len(wins) == 1
    assert broker.depth()["a"] == Depth(ready=1)
    assert get_one(broker, "a").task.payload == wins[0]


def test_a_key_whose_ttl_ran_out_is_absent_to_put_if(make_broker: BrokerMaker) -> None:
    broker = _keyed(make_broker)
    _set_by_settle(broker, SetValue("tick", "old", ttl_s=0.3))
    assert broker.put_if("tick", None, "new", []) is False  # still held
    deadline = time.monotonic() + GET_TIMEOUT_S
    while not broker.put_if("tick", None, "new", []):
        assert time.monotonic() < deadline, "a 0.3 s ttl never ran out"
        time.sleep(0.05)
    assert broker.read_values(["tick"]) == {"tick": "new"}
    # A value put_if set has no ttl: it outlives the one it replaced.
    time.sleep(0.4)
    assert broker.read_values(["tick"]) == {"tick": "new"}


def test_scan_values_reads_the_live_keys_under_a_prefix(make_broker: BrokerMaker) -> None:
    broker = _keyed(make_broker)
    assert broker.scan_values("schedule:") == {}
    broker.put_if("schedule:a", None, "1", [])
    broker.put_if("schedule:b-c", None, "2", [])
    broker.put_if("schedulex", None, "3", [])
    _set_by_settle(
        broker, SetValue("schedule:gone", "4", ttl_s=0.2), SetValue("result:x", "5", ttl_s=60)
    )
    time.sleep(0.4)
    assert broker.scan_values("schedule:") == {"schedule:a": "1", "schedule:b-c": "2"}
    # A prefix is matched as text: characters that are patterns elsewhere mean themselves.
    broker.put_if("glob*[x]?", None, "6", [])
    assert broker.scan_values("glob*[") == {"glob*[x]?": "6"}
    assert broker.scan_values("glob?") == {}


def test_delete_values_deletes_and_counts(make_broker: BrokerMaker) -> None:
    broker = _keyed(make_broker)
    broker.put_if("schedule:a", None, "1", [])
    broker.put_if("schedule:b", None, "2", [])
    assert broker.delete_values(["schedule:a", "schedule:never"]) == 1
    assert broker.delete_values([]) == 0
    assert broker.scan_values("schedule:") == {"schedule:b": "2"}
    assert broker.put_if("schedule:a", None, "again", []) is True  # absent once more


def test_set_values_sets_keys_with_their_own_ttls(make_broker: BrokerMaker) -> None:
    broker = _keyed(make_broker)
    broker.set_values([SetValue("process:a", "1", ttl_s=0.3), SetValue("process:b", "2")])
    assert broker.scan_values("process:") == {"process:a": "1", "process:b": "2"}
    broker.set_values([SetValue("process:b", "3", ttl_s=60)])  # set again: replaced
    assert broker.read_values(["process:b"]) == {"process:b": "3"}
    deadline = time.monotonic() + GET_TIMEOUT_S
    while "process:a" in broker.read_values(["process:a"]):
        assert time.monotonic() < deadline, "a 0.3 s ttl never ran out"
        time.sleep(0.05)
    assert broker.scan_values("process:") == {"process:b": "3"}
    broker.set_values([])  # nothing to set: no error
