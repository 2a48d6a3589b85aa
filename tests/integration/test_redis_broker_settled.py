"""The Redis broker's memory of settled receipts: *already done* versus *fenced*.

A settle or renewal under a receipt that already settled answers ALREADY_DONE (a call resent
because its reply was lost, a renewal racing the ack), for at least one visibility timeout;
only a lease that moved on answers FENCED. The memory lives in two rotating sets per namespace
and visibility timeout (runner/brokers/redis/scripts.py), which must not grow without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from runner.brokers.base import Answer, Delivery, Settle
from runner.brokers.redis.broker import RedisBroker
from runner.model import AttemptRecord, Task
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

MakeBroker = Callable[..., RedisBroker]


def failure(attempt: int) -> AttemptRecord:
    return AttemptRecord(attempt, "RuntimeError", "boom", "tb", time.time(), 0.01, "test:1")


def token(delivery: Delivery) -> str:
    return delivery.receipt.split("|")[1]


def texts(values: Any) -> set[str]:
    return {value.decode() for value in values}


def settled_keys(namespace: str, visibility_ms: int) -> list[str]:
    return [f"{{{namespace}}}:settled:{visibility_ms}:{parity}" for parity in "01"]


def lose_next_script_reply(conn: Any) -> list[str]:
    """The reply to the next script call (EVALSHA) on ``conn`` is read, so the script surely
    ran, then the connection drops before the caller sees it: a reply lost in an outage.
    Returns the list of replies lost (at most one)."""
    send, read = conn.send_packed_command, conn.read_response
    sent: list[str] = []
    lost: list[str] = []

    def send_packed_command(command: Any, *args: Any, **kwargs: Any) -> None:
        # Every command goes out this way, packed (a health check's PING too).
        first = command[0] if isinstance(command, list) else command
        sent.append("EVALSHA" if b"\r\nEVALSHA\r\n" in bytes(first[:24]) else "other")
        send(command, *args, **kwargs)

    def read_response(*args: Any, **kwargs: Any) -> Any:
        reply = read(*args, **kwargs)
        if not lost and sent and sent[-1] == "EVALSHA":  # not a health check's PING
            lost.append("EVALSHA")
            conn.disconnect()
            raise redis.ConnectionError("reply lost")
        return reply

    conn.send_packed_command, conn.read_response = send_packed_command, read_response
    return lost


def test_an_ack_whose_reply_was_lost_answers_already_done_on_the_resend(
    make_broker: MakeBroker, redis_server: RedisServer, redis_namespace: str
) -> None:
    reconnects: list[int] = []
    broker = make_broker(capacity=2, on_reconnect=lambda attempt, exc: reconnects.append(attempt))
    broker.put_many([Task("a", 1), Task("a", 2)])
    first, second = broker.get({"a": 2}, 2, 1.0)
    lost = lose_next_script_reply(broker._settle_line._conn)
    assert broker.ack(first) is Answer.ALREADY_DONE  # the resend, after the first call acked
    assert lost == ["EVALSHA"] and reconnects  # the reply really was lost, and the call sent again
    assert broker.ack(second) is Answer.DONE
    client = redis_server.client()
    assert client.get(f"{{{redis_namespace}}}:count") == b"0"  # each slot freed once
    broker.put_many([Task("a", 3), Task("a", 4)], timeout=0.1)  # so both fit again


def test_an_exchange_whose_reply_was_lost_settles_each_op_once(make_broker: MakeBroker) -> None:
    broker = make_broker(on_reconnect=lambda attempt, exc: None)
    broker.put_many([Task("a", 1), Task("a", 2)])
    acked, retried = broker.get({"a": 2}, 2, 1.0)
    lost = lose_next_script_reply(broker._line_here()._conn)
    answers, _ = broker.exchange(
        [Settle(acked, "ack"), Settle(retried, "retry", 0.0, failure(1))], {"b": 1}, 1
    )
    assert lost == ["EVALSHA"]
    assert answers == [Answer.ALREADY_DONE, Answer.ALREADY_DONE]
    again = broker.get({"a": 5}, 5, 10.0)  # returns with the retried task, due at once
    assert [d.task.payload for d in again] == [2]  # retried once, not twice
    assert again[0].task.attempt == 2
    assert broker.depth()["a"].total == 1


def test_a_renewal_racing_the_settle_answers_already_done(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.put_many([Task("a", i) for i in range(4)])
    acked, retried, dead, released = broker.get({"a": 4}, 4, 1.0)
    assert broker.ack(acked) is Answer.DONE
    assert broker.retry(retried, 10.0, failure(1)) is Answer.DONE
    assert broker.release(released) is Answer.DONE
    answers = broker.extend([acked, retried, dead, released])
    assert answers == [Answer.ALREADY_DONE, Answer.ALREADY_DONE, Answer.DONE, Answer.ALREADY_DONE]


def test_a_second_op_on_a_receipt_in_one_settle_call_answers_already_done(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()
    broker.put_many([Task("a", 1), Task("a", 2)])
    first, second = broker.get({"a": 2}, 2, 1.0)
    ops = [Settle(first, "ack"), Settle(first, "release"), Settle(second, "release")]
    ops.append(Settle(second, "ack"))
    assert broker.settle_many(ops) == [
        Answer.DONE,
        Answer.ALREADY_DONE,
        Answer.DONE,
        Answer.ALREADY_DONE,
    ]
    (back,) = broker.get({"a": 5}, 5, 0.3)  # the first stays acked, the second released
    assert back.task.payload == 2 and back.task.attempt == 1
    assert broker.settle_many([Settle(first, "ack"), Settle(second, "ack")]) == [
        Answer.ALREADY_DONE,
        Answer.ALREADY_DONE,  # its release settled it, though the task was handed out again
    ]


def test_a_stale_receipt_is_fenced_though_its_task_settled_since(make_broker: MakeBroker) -> None:
    # The ack of "new" must be remembered (for at least one visibility timeout) until the last
    # line: three calls, which a loaded machine can stretch past a 0.2 s timeout.
    broker = make_broker(visibility_timeout=1.0)
    broker.put_many([Task("a", 1)])
    (old,) = broker.get({"a": 1}, 1, 1.0)
    (new,) = broker.get({"a": 1}, 1, 30.0)  # reclaimed after its lease expired
    assert broker.ack(new) is Answer.DONE
    assert broker.ack(old) is Answer.FENCED
    assert broker.extend([old, new]) == [Answer.FENCED, Answer.ALREADY_DONE]


def test_settled_receipts_are_remembered_one_to_two_visibility_timeouts(
    make_broker: MakeBroker, redis_server: RedisServer, redis_namespace: str
) -> None:
    """Tokens settled within the last visibility timeout are all remembered; none settled more
    than two ago is (the sets rotate instead of growing); idle sets expire."""
    visibility = 0.5
    broker = make_broker(visibility_timeout=visibility, capacity=1000)
    client = redis_server.client()
    keys = settled_keys(redis_namespace, 500)
    sent_at: dict[str, float] = {}  # token -> when its ack was sent (before Redis ran it)
    replied_at: dict[str, float] = {}  # token -> when its ack's reply came (after)
    checks = 0
    end = time.time() + 6 * visibility
    while time.time() < end:
        broker.put_many([Task("a", i) for i in range(5)])
        for delivery in broker.get({"a": 5}, 5, 1.0):
            sent_at[token(delivery)] = time.time()
            assert broker.ack(delivery) is Answer.DONE
            replied_at[token(delivery)] = time.time()
        before = time.time()
        members = {m for m in texts(client.sunion(keys)) if not m.startswith("#")}  # no marks
        after = time.time()
        recent = {t for t, at in sent_at.items() if at >= after - visibility}
        assert recent <= members  # settled within one visibility timeout: remembered
        # None settled more than two ago (give or take Redis' millisecond expiry).
        assert all(replied_at[t] >= before - 2 * visibility - 0.01 for t in members)
        for key in keys:
            ttl = client.pttl(key)
            assert ttl == -2 or 0 <= ttl <= 2 * visibility * 1000  # absent, or expiring soon
        checks += 1
        time.sleep(0.05)
    assert len(sent_at) > len(members) and checks > 10  # old tokens were dropped
    oldest = min(sent_at, key=sent_at.__getitem__)
    assert client.sismember(keys[0], oldest) + client.sismember(keys[1], oldest) == 0
    time.sleep(2 * visibility + 0.3)  # idle: both sets expire
    assert client.exists(*keys) == 0


def test_a_set_left_from_another_bucket_is_emptied_before_it_is_written(
    make_broker: MakeBroker, redis_server: RedisServer, redis_namespace: str
) -> None:
    """A set still holding an older bucket's tokens when its parity comes round again (a
    script that began just before the old set's expiry, a clock step) starts afresh, with
    its expiry, rather than carrying the old tokens on."""
    client = redis_server.client()
    keys = settled_keys(redis_namespace, 500)
    for key in keys:
        client.sadd(key, "#0", "stale-token")  # another bucket's mark, and no expiry
    broker = make_broker(visibility_timeout=0.5)
    broker.put_many([Task("a", 1)])
    (delivery,) = broker.get({"a": 1}, 1, 1.0)
    assert broker.ack(delivery) is Answer.DONE
    written = [key for key in keys if client.sismember(key, token(delivery))]
    assert len(written) == 1
    assert not client.sismember(written[0], "stale-token")
    assert 0 < client.pttl(written[0]) <= 1000


def test_a_resend_within_the_visibility_timeout_is_already_done_later_fenced(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker(visibility_timeout=1.0)
    broker.put_many([Task("a", 1)])
    (delivery,) = broker.get({"a": 1}, 1, 1.0)
    assert broker.ack(delivery) is Answer.DONE
    # Remembered for a while, not only at once: 0.1 s leaves the resends 0.9 s of the (at least)
    # one visibility timeout for a loaded machine's stalls.
    time.sleep(0.1)
    assert broker.ack(delivery) is Answer.ALREADY_DONE
    assert broker.extend([delivery]) == [Answer.ALREADY_DONE]
    time.sleep(2.0)  # over two visibility timeouts after the settle: forgotten
    assert broker.ack(delivery) is Answer.FENCED
    assert broker.extend([delivery]) == [Answer.FENCED]


def test_brokers_with_different_visibility_timeouts_keep_separate_memories(
    make_broker: MakeBroker,
) -> None:
    """A short-timeout broker rotating its sets often must not empty a long-timeout one's."""
    short, long_ = make_broker(visibility_timeout=0.2), make_broker(visibility_timeout=5.0)
    long_.put_many([Task("a", 0)])
    (held,) = long_.get({"a": 1}, 1, 1.0)
    assert long_.ack(held) is Answer.DONE
    end = time.monotonic() + 1.0  # five of the short broker's buckets
    while time.monotonic() < end:
        short.put_many([Task("b", 1)])
        for delivery in short.get({"b": 1}, 1, 1.0):
            assert short.ack(delivery) is Answer.DONE
        time.sleep(0.02)
    assert long_.ack(held) is Answer.ALREADY_DONE


def test_the_memory_runs_on_redis_clock_not_the_clients(make_broker: MakeBroker) -> None:
    """A broker whose own clock is an hour off still remembers what it settled."""
    broker = make_broker(clock=lambda: time.time() - 3600, visibility_timeout=1.0)
    broker.put_many([Task("a", 1)])
    (delivery,) = broker.get({"a": 1}, 1, 1.0)
    assert broker.ack(delivery) is Answer.DONE
    assert broker.ack(delivery) is Answer.ALREADY_DONE
