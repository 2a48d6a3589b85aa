"""SqliteBroker and its file: reopening, corrupt rows, and files it cannot use."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner.brokers.base import Broker, BrokerAdmin, DeadLetterFilter, Depth
from runner.brokers.sqlite.broker import SqliteBroker
from runner.brokers.sqlite.checkpoint import Checkpointer
from runner.errors import BrokerError, BrokerUnavailable
from runner.model import Task
from tests.integration.test_sqlite_broker import VT, FakeClock, dead_record, one


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "nested" / "dir" / "queue.db")


@pytest.fixture
def make(db: str, clock: FakeClock) -> Iterator[Callable[..., SqliteBroker]]:
    opened: list[SqliteBroker] = []

    def factory() -> SqliteBroker:
        broker = SqliteBroker(db, 100, 0.2, "block", VT, clock=clock)
        opened.append(broker)
        return broker

    yield factory
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(make: Callable[..., SqliteBroker]) -> SqliteBroker:
    return make()


def test_open_creates_parents_schema_and_wal(broker: SqliteBroker, db: str) -> None:
    assert isinstance(broker, Broker)
    assert isinstance(broker, BrokerAdmin)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_commits_reach_the_database_file_by_a_background_checkpoint(
    broker: SqliteBroker, db: str
) -> None:
    # ~100 pages: far below the 1,000 at which the commit path checkpoints, so only the
    # background thread copies them from the WAL into the database file meanwhile.
    before = os.path.getsize(db)
    for _ in range(10):
        broker.put_many([Task("a", "x" * 4000) for _ in range(10)])
    deadline = time.monotonic() + 10  # nominally 20 ms; generous for a loaded machine
    while os.path.getsize(db) < before + 300_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.getsize(db) >= before + 300_000
    broker.close()
    assert not broker._checkpoints._thread.is_alive()


def test_a_failing_background_checkpoint_is_logged_once_per_spell(tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("runner.broker")  # whatever an earlier test configured
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # setLevel: it clears the loggers' level caches
    checkpoints = Checkpointer(str(tmp_path / "missing" / "queue.db"), every_s=0.001)
    try:
        deadline = time.monotonic() + 10  # nominally milliseconds; generous for a loaded machine
        while checkpoints.failures < 3 and time.monotonic() < deadline:
            checkpoints.committed()
            time.sleep(0.005)
        assert checkpoints.failures >= 3
    finally:
        checkpoints.close()
        logger.removeHandler(handler)
        logger.setLevel(level)
    failures = [r for r in records if "background checkpoint failed" in r.getMessage()]
    assert len(failures) == 1
    assert checkpoints.runs == 0


def test_tasks_leases_and_dead_letters_survive_reopening(
    make: Callable[..., SqliteBroker], clock: FakeClock
) -> None:
    first = make()
    first.put_many([Task("a", "queued"), Task("a", "leased"), Task("a", "dead")])
    first.put_many([Task("a", "delayed", not_before=clock.now + 3)])
    queued, leased, doomed = first.get({"a": 3}, 3, 0)
    assert first.release(queued)
    assert first.dead(doomed, dead_record(doomed))
    first.close()

    second = make()
    assert second.depth()["a"] == Depth(ready=1, delayed=1, leased=1)
    assert [r.task.payload for r in second.dead_letters(DeadLetterFilter())] == ["dead"]
    assert one(second).task.payload == "queued"
    assert second.ack(leased)  # the receipt is stored, not held in memory
    clock.advance(3)
    assert one(second).task.payload == "delayed"


def test_a_corrupt_envelope_becomes_a_decode_error_delivery(broker: SqliteBroker, db: str) -> None:
    broker.put_many([Task("a", "bad", id="bad"), Task("a", "good", id="good")])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE tasks SET envelope = ? WHERE id = 'bad'", (b"{not json",))
    conn.close()
    bad, good = broker.get({"a": 2}, 2, 0)
    assert bad.decode_error and "undecodable" in bad.decode_error
    assert (bad.task.id, bad.task.type, bad.task.payload, bad.task.attempt) == ("bad", "a", None, 1)
    assert good.decode_error is None and good.task.payload == "good"
    assert broker.dead(bad, dead_record(bad))
    conn = sqlite3.connect(db)
    raw = conn.execute("SELECT raw_envelope FROM dead_letters WHERE id = 'bad'").fetchone()[0]
    conn.close()
    assert raw == b"{not json"  # kept for forensics
    assert broker.replay(["bad"]) == 0  # a stub without its payload must not run again


def test_a_corrupt_dead_letter_is_listed_and_can_be_purged(broker: SqliteBroker, db: str) -> None:
    broker.put_many([Task("a", "p", id="t1")])
    held = one(broker)
    assert broker.dead(held, dead_record(held))
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE dead_letters SET record = 'garbage'")
    conn.close()
    (record,) = broker.dead_letters(DeadLetterFilter())
    assert record.id == "t1" and record.reason == "corrupt record"
    assert broker.replay(["t1"]) == 0
    assert broker.purge(DeadLetterFilter(ids=frozenset({"t1"}))) == 1


def test_a_duplicate_task_id_is_rejected_whole(broker: SqliteBroker) -> None:
    broker.put_many([Task("a", 1, id="same")])
    with pytest.raises(BrokerError, match="already queued"):
        broker.put_many([Task("a", 2, id="other"), Task("a", 3, id="same")])
    assert broker.depth()["a"].total == 1


def test_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(BrokerUnavailable, match=r"junk\.db.*not a"):
        SqliteBroker(str(path), 10, 0.1, "block", VT)


def test_a_newer_schema_is_refused(db: str, make: Callable[..., SqliteBroker]) -> None:
    make().close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(BrokerUnavailable, match="schema version 99"):
        make()


def test_a_full_disk_gives_a_clear_error_and_loses_nothing(broker: SqliteBroker, db: str) -> None:
    broker.put_many([Task("a", "kept")])
    # Simulate a full disk: cap the file at its current size for this connection.
    pages = broker._conn.execute("PRAGMA page_count").fetchone()[0]
    broker._conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(BrokerUnavailable, match=r"queue\.db.*full"):
        broker.put_many([Task("a", "x" * 50_000) for _ in range(5)])
    assert broker.depth()["a"].total == 1
    assert one(broker).task.payload == "kept"


def test_a_read_only_file_gives_a_clear_error(db: str, make: Callable[..., SqliteBroker]) -> None:
    make().close()
    immutable = False
    if os.geteuid() == 0:
        # root ignores file modes; the immutable attribute still stops writes.
        done = subprocess.run(["chattr", "+i", db], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip("running as root without chattr: cannot make a file read-only")
        immutable = True
    else:
        os.chmod(db, 0o444)
    try:
        with pytest.raises(BrokerUnavailable, match=r"queue\.db.*read"):
            make()
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", db], check=True)
