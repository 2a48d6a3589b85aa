"""RedisBroker against a real, throwaway redis-server (never the machine's own Redis).

Timing checks: lower bounds strict, upper bounds loose (PROMPTLY_S), as the machine may be loaded.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

import pytest

from runner.brokers.base import Answer, Broker, BrokerAdmin, DeadLetterFilter, Delivery, Settle
from runner.brokers.redis.broker import RedisBroker
from runner.errors import BrokerClosed, BrokerUnavailable, QueueFull
from runner.model import AttemptRecord, DeadLetter, Task
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis

MakeBroker = Callable[..., RedisBroker]

#: Timeout of a get that must be handed a task: it returns as soon as one comes.
GET_TIMEOUT_S = 30.0
#: Upper bound for what takes well under a second when the broker works: room for a loaded
#: machine, far short of the 30 s timeouts a missed wake-up would run out.
PROMPTLY_S = 5.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def failure(attempt: int, message: str = "boom") -> AttemptRecord:
    return AttemptRecord(attempt, "RuntimeError", message, "tb", time.time(), 0.01, "test:1")


def dead_letter(delivery: Delivery, reason: str = "error") -> DeadLetter:
    task = delivery.task.with_failure(failure(delivery.task.attempt))
    now = time.time()
    return DeadLetter(task, reason, "RuntimeError", "boom", "tb", task.attempt, now, now, now)


def test_implements_both_protocols(make_broker: MakeBroker) -> None:
    broker = make_broker()
    assert isinstance(broker, Broker)
    assert isinstance(broker, BrokerAdmin)


def test_fifo_per_type_and_slots_and_limit(make_broker: MakeBroker) -> None:
    broker = make_broker()
    broker.put_many([Task("a", i) for i in range(5)] + [Task("b", i) for i in range(5)])
    got = broker.get({"a": 2, "b": 3}, limit=4, timeout=0.5)
    assert len(got) == 4
    assert [d.task.payload for d in got if d.task.type == "a"] == [0, 1]
    assert [d.task.payload for d in got if d.task.type == "b"] == [0, 1]
    assert all(d.task.attempt == 1 and not d.redelivered for d in got)
    rest = broker.get({"a": 10, "c": 1}, limit=10, timeout=0.2)
    assert [d.task.payload for d in rest] == [2, 3, 4]
    assert broker.get({"a": 0, "b": 0}, limit=10, timeout=0.05) == []


def test_get_times_out_empty(make_broker: MakeBroker) -> None:
    broker = make_broker()
    start = time.monotonic()
    assert broker.get({"a": 1}, limit=1, timeout=0.3) == []
    waited = time.monotonic() - start
    assert waited >= 0.3
    assert waited < PROMPTLY_S  # ends at its timeout, not at some longer wait of its own


def test_keys_live_under_the_namespace_hash_tag(
    make_broker: MakeBroker, redis_server: RedisServer, redis_namespace: str
) -> None:
    broker = make_broker()
    broker.put_many([Task("a", 1), Task("a", 2, not_before=time.time() + 60)])
    broker.ack(broker.get({"a": 1}, 1, 1.0)[0])
    client = redis_server.client()
    keys = [k.decode() for k in client.keys(f"*{redis_namespace}*")]
    assert keys
    assert all(k.startswith("{" + redis_namespace + "}:") for k in keys)
    client.close()


def test_connection_settings_are_pinned(make_broker: MakeBroker) -> None:
    broker = make_broker(socket_timeout=7.0)
    kwargs = broker._client.connection_pool.connection_kwargs
    assert kwargs["protocol"] == 2
    assert kwargs["socket_timeout"] == 7.0
    assert kwargs["socket_connect_timeout"] == 5.0
    assert kwargs["health_check_interval"] > 0


def test_unreachable_redis_raises_broker_unavailable() -> None:
    with pytest.raises(BrokerUnavailable):
        RedisBroker(f"redis://127.0.0.1:{free_port()}/0", "x", 10, 0.1, "block", 5.0)


def test_consumer_names_are_unique(make_broker: MakeBroker) -> None:
    first, second = make_broker(), make_broker()
    assert first.consumer != second.consumer


def test_ack_removes_task_and_frees_capacity(make_broker: MakeBroker) -> None:
    broker = make_broker(capacity=1)
    broker.put_many([Task("a", 1)])
    with pytest.raises(QueueFull):
        broker.put_many([Task("a", 2)], timeout=0.05)
    (delivery,) = broker.get({"a": 1}, 1, 1.0)
    assert broker.depth()["a"].leased == 1
    assert broker.ack(delivery) is Answer.DONE
    assert broker.ack(delivery) is Answer.ALREADY_DONE  # a second ack changes nothing
    assert broker.depth()["a"].total == 0
    broker.put_many([Task("a", 2)])


def test_put_blocks_then_fails_and_reject_fails_at_once(make_broker: MakeBroker) -> None:
    blocking = make_broker(capacity=2, enqueue_timeout=0.3)
    blocking.put_many([Task("a", 1), Task("a", 2)])
    start = time.monotonic()
    with pytest.raises(QueueFull):
        blocking.put_many([Task("a", 3)])
    waited = time.monotonic() - start
    assert waited >= 0.3
    assert waited < PROMPTLY_S  # gives up at its timeout, not at some longer wait of its own
    rejecting = make_broker(capacity=2, enqueue_timeout=30.0, overflow="reject")
    start = time.monotonic()
    with pytest.raises(QueueFull):
        rejecting.put_many([Task("a", 3)])
    assert time.monotonic() - start < PROMPTLY_S  # not after waiting out the 30 s


def test_put_many_is_all_or_nothing(make_broker: MakeBroker) -> None:
    broker = make_broker(capacity=3)
    broker.put_many([Task("a", 1), Task("a", 2)])
    with pytest.raises(QueueFull):
        broker.put_many([Task("a", 3), Task("b", 4)], timeout=0.05)
    assert sum(d.total for d in broker.depth().values()) == 2


def test_blocked_put_succeeds_when_capacity_frees(make_broker: MakeBroker) -> None:
    broker = make_broker(capacity=1, enqueue_timeout=30.0)
    broker.put_many([Task("a", 1)])
    (delivery,) = broker.get({"a": 1}, 1, 1.0)
    start = time.monotonic()  # before the timer starts: the ack comes 0.2 s after this at least
    timer = threading.Timer(0.2, broker.ack, args=(delivery,))
    timer.start()
    broker.put_many([Task("a", 2)])
    assert time.monotonic() - start >= 0.2
    timer.join()


def test_retry_is_delayed_keeps_history_and_never_blocks(make_broker: MakeBroker) -> None:
    broker = make_broker(capacity=1)
    broker.put_many([Task("a", "x")])
    (first,) = broker.get({"a": 1}, 1, 1.0)
    delay = 1.0  # the two checks while it is delayed take milliseconds; a loaded machine, more
    # On the broker's clock (the wall clock it schedules by), not the monotonic one: the two
    # may be stepped apart by a few milliseconds (seen: a retry "0.995 s" after a 1 s delay).
    start = time.time()
    assert broker.retry(first, delay, failure(1)) is Answer.DONE  # capacity full: no blocking
    assert broker.depth()["a"].delayed == 1
    assert broker.get({"a": 1}, 1, 0) == []
    (second,) = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    waited = time.time() - start
    assert waited >= delay
    assert waited < PROMPTLY_S  # the get woke when it fell due, not at its 30 s timeout
    assert second.task.attempt == 2
    assert not second.redelivered
    assert [h.message for h in second.task.history] == ["boom"]
    assert broker.retry(first, 0.0, failure(1)) is Answer.ALREADY_DONE  # settled receipt


def test_delayed_put_is_not_handed_out_early(make_broker: MakeBroker) -> None:
    broker = make_broker()
    start = time.time()  # the broker's clock, as above
    broker.put_many([Task("a", 1, not_before=start + 0.4)])
    (delivery,) = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    waited = time.time() - start
    assert waited >= 0.4
    assert waited < PROMPTLY_S  # the get woke when it fell due, not at its 30 s timeout
    assert delivery.task.attempt == 1


def test_release_gives_the_task_back_at_once_with_its_attempt(make_broker: MakeBroker) -> None:
    first, second = make_broker(capacity=1), make_broker(capacity=1)
    first.put_many([Task("a", 1)])
    (delivery,) = first.get({"a": 1}, 1, 1.0)
    assert first.release(delivery) is Answer.DONE  # full capacity: must not block
    assert first.release(delivery) is Answer.ALREADY_DONE
    (again,) = second.get({"a": 1}, 1, 1.0)
    assert again.task.attempt == 1
    assert not again.redelivered
    assert second.ack(again)
    assert second.depth()["a"].total == 0


def test_dead_letters_filter_replay_and_purge(make_broker: MakeBroker) -> None:
    broker = make_broker(capacity=2)
    broker.put_many([Task("a", 1), Task("b", 2)])
    deliveries = broker.get({"a": 1, "b": 1}, 2, 1.0)
    for delivery in deliveries:
        assert broker.dead(delivery, dead_letter(delivery)) is Answer.DONE
        assert broker.dead(delivery, dead_letter(delivery)) is Answer.ALREADY_DONE
    assert sum(d.total for d in broker.depth().values()) == 0
    records = broker.dead_letters(DeadLetterFilter())
    assert broker.dead_letter_count() == 2
    assert sorted(r.task.payload for r in records) == [1, 2]
    assert records[0].task.history[0].message == "boom"
    only_b = broker.dead_letters(DeadLetterFilter(type="b"))
    assert [r.task.type for r in only_b] == ["b"]

    assert broker.replay([only_b[0].id, "missing"]) == 1
    (replayed,) = broker.get({"b": 1}, 1, 1.0)
    assert replayed.task.attempt == 1  # attempts reset
    assert replayed.task.history  # the history stays readable
    assert broker.dead_letters(DeadLetterFilter(type="b")) == []

    assert broker.purge(DeadLetterFilter(error="NoSuchError")) == 0
    assert broker.purge(DeadLetterFilter()) == 1
    assert broker.dead_letters(DeadLetterFilter()) == []


def test_replay_respects_capacity(make_broker: MakeBroker) -> None:
    broker = make_broker(capacity=1, enqueue_timeout=0.1)
    broker.put_many([Task("a", 1)])
    (delivery,) = broker.get({"a": 1}, 1, 1.0)
    broker.dead(delivery, dead_letter(delivery))
    broker.put_many([Task("a", 2)])
    with pytest.raises(QueueFull):
        broker.replay([delivery.task.id])
    assert len(broker.dead_letters(DeadLetterFilter())) == 1


def test_lease_expiry_redelivers_and_fences_the_stale_receipt(make_broker: MakeBroker) -> None:
    dying = make_broker(visibility_timeout=0.3)
    alive = make_broker(visibility_timeout=0.3)
    dying.put_many([Task("a", "x")])
    (lost,) = dying.get({"a": 1}, 1, 1.0)
    # The dying consumer never acks; the live one reclaims it once the lease expires.
    start = time.monotonic()
    (reclaimed,) = alive.get({"a": 1}, 1, GET_TIMEOUT_S)
    assert time.monotonic() - start >= 0.2
    assert reclaimed.task.id == lost.task.id
    assert reclaimed.task.attempt == 2
    assert reclaimed.redelivered
    assert dying.ack(lost) is Answer.FENCED
    assert dying.retry(lost, 0, failure(1)) is Answer.FENCED
    assert dying.dead(lost, dead_letter(lost)) is Answer.FENCED
    assert dying.release(lost) is Answer.FENCED
    assert dying.extend([lost]) == [Answer.FENCED]
    assert alive.depth()["a"].leased == 1
    assert alive.ack(reclaimed) is Answer.DONE
    assert alive.depth()["a"].total == 0
    assert alive.dead_letters(DeadLetterFilter()) == []


def test_reclaim_by_the_same_consumer_is_fenced_too(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.2)
    broker.put_many([Task("a", 1)])
    (old,) = broker.get({"a": 1}, 1, 1.0)
    (new,) = broker.get({"a": 1}, 1, GET_TIMEOUT_S)
    assert new.task.attempt == 2
    assert broker.ack(old) is Answer.FENCED
    assert broker.ack(new) is Answer.DONE


def test_extend_keeps_a_long_delivery(make_broker: MakeBroker) -> None:
    lease_s = 1.0
    holder = make_broker(visibility_timeout=lease_s)
    other = make_broker(visibility_timeout=lease_s)
    holder.put_many([Task("a", 1)])
    (held,) = holder.get({"a": 1}, 1, 1.0)
    deadline = time.monotonic() + 2.5 * lease_s
    while time.monotonic() < deadline:
        assert holder.extend([held]) == [Answer.DONE]
        # Renewed every tenth of a lease: nine tenths left for a loaded machine's stalls (a
        # 0.4 s lease renewed every 0.12 s has lapsed under load).
        assert other.get({"a": 1}, 1, lease_s / 10) == []
    assert holder.ack(held) is Answer.DONE


def test_attempts_count_every_hand_out(make_broker: MakeBroker) -> None:
    broker = make_broker(visibility_timeout=0.15)
    broker.put_many([Task("a", 1)])
    attempts = [broker.get({"a": 1}, 1, GET_TIMEOUT_S)[0].task.attempt for _ in range(3)]
    assert attempts == [1, 2, 3]


def test_wake_and_close_end_a_blocked_get(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    broker = make_broker()
    client = redis_server.client()
    ended = threading.Event()
    result: list[list[Delivery]] = []

    def blocked_get() -> None:
        result.append(broker.get({"a": 1}, 1, 30.0))
        ended.set()

    def blocked() -> bool:  # the get's XREAD, as Redis sees it
        return int(client.info("clients")["blocked_clients"]) >= 1

    thread = threading.Thread(target=blocked_get)
    thread.start()
    wait_until(blocked, "the get blocks")
    broker.wake()
    assert ended.wait(PROMPTLY_S)  # the wake ended it, not the 30 s timeout
    assert result == [[]]
    thread.join()

    ended.clear()
    thread = threading.Thread(target=blocked_get)
    thread.start()
    # Blocked, not about to start: a get that began after close would raise BrokerClosed.
    wait_until(blocked, "the get blocks")
    broker.close()
    assert ended.wait(PROMPTLY_S)  # close ended it, not the 30 s timeout
    thread.join()
    assert result[-1] == []
    with pytest.raises(BrokerClosed):
        broker.get({"a": 1}, 1, 0.1)
    broker.close()  # idempotent


def test_undecodable_entry_yields_decode_error(
    make_broker: MakeBroker, redis_server: RedisServer, redis_namespace: str
) -> None:
    broker = make_broker()
    broker.put_many([Task("a", 1)])
    client = redis_server.client()
    client.xadd("{" + redis_namespace + "}:q:a", {"a": "0", "t": b"\xff not json"})
    client.incr("{" + redis_namespace + "}:count")
    client.close()
    good, bad = broker.get({"a": 2}, 2, 1.0)
    assert good.decode_error is None
    assert bad.decode_error is not None
    assert bad.task.type == "a"
    assert bad.task.attempt == 1
    assert broker.dead(bad, dead_letter(bad)) is Answer.DONE


def test_two_consumers_never_hold_the_same_task(make_broker: MakeBroker) -> None:
    producer = make_broker(capacity=1000)
    producer.put_many([Task("a", i) for i in range(300)])
    held: set[str] = set()
    done: list[str] = []
    overlaps: list[str] = []
    lock = threading.Lock()

    def consume(broker: RedisBroker) -> None:
        while True:
            batch = broker.get({"a": 5}, 5, 0.3)
            if not batch:
                return
            with lock:
                for d in batch:
                    if d.task.id in held:
                        overlaps.append(d.task.id)
                    held.add(d.task.id)
            for d in batch:
                with lock:
                    held.discard(d.task.id)
                    done.append(d.task.id)
                assert broker.ack(d)

    consumers = [make_broker(visibility_timeout=30.0) for _ in range(2)]
    threads = [threading.Thread(target=consume, args=(b,)) for b in consumers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert len(done) == 300
    assert len(set(done)) == 300
    assert producer.depth()["a"].total == 0


def test_warns_when_eviction_is_on(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(options={"maxmemory-policy": "allkeys-lru"})
    with caplog.at_level("WARNING", logger="runner.broker"):
        RedisBroker(server.url, "ns", 10, 0.1, "block", 5.0).close()
    assert any("noeviction" in r.getMessage() for r in caplog.records)
    caplog.clear()
    server.client().config_set("maxmemory-policy", "noeviction")
    with caplog.at_level("WARNING", logger="runner.broker"):
        RedisBroker(server.url, "ns", 10, 0.1, "block", 5.0).close()
    assert not [r for r in caplog.records if "noeviction" in r.getMessage()]


def test_scripts_flushed_from_redis_are_loaded_again(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    """A restarted Redis has no scripts: every hot path (get, exchange, settle) loads its own
    again instead of failing with NOSCRIPT."""
    broker = make_broker()
    broker.put_many([Task("a", i) for i in range(3)])
    redis_server.client().script_flush()
    first = broker.get({"a": 1}, limit=1, timeout=0.5)
    redis_server.client().script_flush()
    answers, second = broker.exchange([Settle(first[0], "ack")], {"a": 1}, 1)
    assert answers == [Answer.DONE] and len(second) == 1
    redis_server.client().script_flush()
    assert broker.settle_many([Settle(second[0], "ack")]) == [Answer.DONE]
    assert [d.task.payload for d in broker.get({"a": 5}, limit=5, timeout=0.5)] == [2]


def test_dedicated_connections_never_go_back_to_the_pool(make_broker: MakeBroker) -> None:
    """The dispatcher's and the Settler's connections stay theirs: were one handed back to the
    pool, another caller's replies could interleave with theirs."""
    broker = make_broker()
    gc.collect()
    pool = broker._client.connection_pool
    taken = [pool.get_connection() for _ in range(4)]
    try:
        dedicated = {id(broker._get_line._conn), id(broker._settle_line._conn)}
        assert not dedicated & {id(conn) for conn in taken}
    finally:
        for conn in taken:
            pool.release(conn)


def test_polls_look_for_expired_leases_a_few_times_per_visibility_timeout(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    """XAUTOCLAIM scans the pending entries: not on every poll (ten times per visibility
    timeout, at most once a second), yet a dead worker's delivery still comes back."""
    lease_s, look_every_s = 2.0, 0.2
    broker = make_broker(visibility_timeout=lease_s)
    broker.put_many([Task("a", i) for i in range(30)])
    client = redis_server.client()
    client.config_resetstat()
    start = time.monotonic()
    [held] = broker.get({"a": 1}, limit=1, timeout=0.5)  # never settled: its worker "died"
    got = broker.get({"a": 1}, limit=1, timeout=0.5)
    for _ in range(20):
        _, got = broker.exchange([Settle(got[0], "ack")], {"a": 1}, 1)
    polling_s = time.monotonic() - start
    claims = client.info("commandstats").get("cmdstat_xautoclaim", {}).get("calls", 0)
    # A look at the first poll, then at most one per 0.2 s of however long the polls took on
    # this machine (and one to spare); a look on every poll would make 22. (The polls take
    # milliseconds: well within the lease, so the held delivery stays where it is.)
    assert 1 <= claims <= 2 + polling_s / look_every_s
    time.sleep(lease_s + 0.1)  # the held lease has expired, and the next poll may look
    _, again = broker.exchange([Settle(got[0], "ack")], {"a": 5}, 5)
    assert held.task.id in [d.task.id for d in again]
    assert [d.redelivered for d in again if d.task.id == held.task.id] == [True]


def test_a_poll_costs_an_idle_type_one_look(
    make_broker: MakeBroker, redis_server: RedisServer
) -> None:
    """A type with nothing in its stream (or no stream yet) is not asked for released,
    expired or new entries: with many idle types in a config (and one fetch per task without
    prefetch) those calls were most of a poll. A delayed task falling due still makes its
    type's stream, group and all, and is handed out."""
    broker = make_broker()
    idle = {f"idle{i}": 4 for i in range(5)}
    broker.put_many([Task("busy", i) for i in range(3)])
    client = redis_server.client()
    for payload in (0, 1):  # the second poll's calls are counted
        client.config_resetstat()
        got = broker.exchange([], {"busy": 1, **idle}, 10)[1]
        assert [d.task.payload for d in got] == [payload]
    stats = client.info("commandstats")
    assert stats["cmdstat_xreadgroup"]["calls"] == 1  # the busy type's only
    assert stats["cmdstat_xpending"]["calls"] == 1
    assert stats["cmdstat_xlen"]["calls"] == 6  # the look: one per type
    assert "cmdstat_exists" not in stats  # no group to make: the busy type's stream has one
    # A delayed task of a type that never had a stream: the poll that finds it due makes both.
    broker.put_many([Task("idle0", "late", not_before=time.time() + 0.2)])
    time.sleep(0.3)
    got = broker.get({"idle0": 1}, 1, GET_TIMEOUT_S)
    assert [d.task.payload for d in got] == ["late"]
    # And a task put to an idle type while a get blocks on it is handed out at once.
    found: list[Delivery] = []
    blocked = threading.Thread(target=lambda: found.extend(broker.get(idle, 1, GET_TIMEOUT_S)))
    blocked.start()
    time.sleep(0.2)
    broker.put_many([Task("idle3", "now")])
    blocked.join(PROMPTLY_S)
    assert [d.task.payload for d in found] == ["now"]
