"""SqliteBroker's settled receipts: how long they are remembered, by whom, and in older files.

The answers themselves (DONE, ALREADY_DONE, FENCED) are in the contract suite; these tests use
a fake clock to check the edges and the ``settled`` table to check that it stays bounded.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner.brokers.base import Answer, Settle
from runner.brokers.sqlite.broker import PRUNE_EVERY_S, SqliteBroker
from runner.brokers.sqlite.schema import IDS_PER_QUERY
from runner.model import Task
from tests.integration.test_sqlite_broker import VT, FakeClock, failure, one


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "queue.db")


@pytest.fixture
def make(db: str, clock: FakeClock) -> Iterator[Callable[[], SqliteBroker]]:
    opened: list[SqliteBroker] = []

    def factory() -> SqliteBroker:
        broker = SqliteBroker(db, 1000, 0.2, "block", VT, clock=clock)
        opened.append(broker)
        return broker

    yield factory
    for broker in opened:
        broker.close()


def settled_rows(db: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM settled").fetchone()[0])
    finally:
        conn.close()


def test_a_settled_receipt_answers_already_done_for_one_visibility_timeout(
    make: Callable[[], SqliteBroker], clock: FakeClock
) -> None:
    broker = make()
    broker.put_many([Task("a", 0), Task("a", 1)])
    acked, retried = broker.get({"a": 2}, 2, 0)
    assert broker.ack(acked) is Answer.DONE
    clock.advance(VT / 2)
    assert broker.retry(retried, 60, failure(1)) is Answer.DONE
    clock.advance(VT / 2 - 0.01)
    assert broker.ack(acked) is Answer.ALREADY_DONE
    assert broker.extend([acked, retried]) == [Answer.ALREADY_DONE] * 2
    clock.advance(0.01)  # one visibility timeout after the ack, half of one after the retry
    assert broker.ack(acked) is Answer.FENCED
    assert broker.extend([acked, retried]) == [Answer.FENCED, Answer.ALREADY_DONE]
    clock.advance(VT / 2)
    assert broker.settle_many([Settle(retried, "release")]) == [Answer.FENCED]


def test_another_connection_sees_the_settled_receipt(make: Callable[[], SqliteBroker]) -> None:
    """A resend may come from another process (the engine's, after a restart) or connection."""
    first, second = make(), make()
    first.put_many([Task("a", "x")])
    delivery = one(first)
    assert first.ack(delivery) is Answer.DONE
    assert second.ack(delivery) is Answer.ALREADY_DONE
    assert second.extend([delivery]) == [Answer.ALREADY_DONE]


def test_settled_receipts_a_visibility_timeout_old_are_pruned(
    make: Callable[[], SqliteBroker], clock: FakeClock, db: str
) -> None:
    broker = make()
    broker.put_many([Task("a", i) for i in range(52)])
    assert (
        broker.settle_many([Settle(d, "ack") for d in broker.get({"a": 50}, 50, 0)])
        == [Answer.DONE] * 50
    )
    assert settled_rows(db) == 50
    clock.advance(VT - 0.01)
    assert broker.ack(one(broker)) is Answer.DONE  # pruning is due, but nothing is old enough
    assert settled_rows(db) == 51
    clock.advance(max(PRUNE_EVERY_S, 0.01))
    last = one(broker)
    assert broker.ack(last) is Answer.DONE  # the first 50 are a visibility timeout old now
    assert settled_rows(db) == 2
    assert broker.ack(last) is Answer.ALREADY_DONE


def test_a_batch_larger_than_one_insert_is_remembered_whole(
    make: Callable[[], SqliteBroker], db: str
) -> None:
    broker = make()
    broker.put_many([Task("a", i) for i in range(IDS_PER_QUERY + 3)])
    held = broker.get({"a": IDS_PER_QUERY + 3}, IDS_PER_QUERY + 3, 0)
    acks = [Settle(d, "ack") for d in held]
    assert broker.settle_many(acks) == [Answer.DONE] * len(acks)
    assert settled_rows(db) == len(acks)
    assert broker.settle_many(acks) == [Answer.ALREADY_DONE] * len(acks)


def test_pruning_keeps_a_long_held_delivery_settled_lately(
    make: Callable[[], SqliteBroker], clock: FakeClock
) -> None:
    """Pruning reads the receipts claimed a visibility timeout ago; one of them may have been
    renewed until it was settled just now."""
    broker = make()
    broker.put_many([Task("a", "long"), Task("a", "other")])
    long_held = one(broker)
    for _ in range(6):
        clock.advance(VT / 2)
        assert broker.extend([long_held]) == [Answer.DONE]
    assert broker.ack(long_held) is Answer.DONE
    clock.advance(max(PRUNE_EVERY_S, 0.01))
    assert broker.ack(one(broker)) is Answer.DONE  # prunes: long_held was claimed 3 VT ago
    assert broker.ack(long_held) is Answer.ALREADY_DONE


def test_receipts_from_before_the_settled_table_are_pruned_too(
    make: Callable[[], SqliteBroker], clock: FakeClock, db: str
) -> None:
    """Receipts were random hex then: they must fall in the pruned range, or stay forever."""
    broker = make()
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO settled (receipt, settled_at) VALUES (?, ?)",
            [("0123abcd0-1", clock.now), ("fedc9876a-2", clock.now)],
        )
    conn.close()
    broker.put_many([Task("a", "x")])
    clock.advance(VT + PRUNE_EVERY_S)
    assert broker.ack(one(broker)) is Answer.DONE
    assert settled_rows(db) == 1


def test_a_file_from_before_the_settled_table_gains_it_on_open(
    make: Callable[[], SqliteBroker], db: str
) -> None:
    old = make()
    old.put_many([Task("a", "leased before the upgrade")])
    held = one(old)
    old.close()
    conn = sqlite3.connect(db)  # as the previous release left its files: no settled table
    conn.execute("DROP TABLE settled")
    conn.close()

    upgraded = make()
    assert upgraded.ack(held) is Answer.DONE
    assert upgraded.ack(held) is Answer.ALREADY_DONE
    assert settled_rows(db) == 1
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # still version 1
    finally:
        conn.close()
