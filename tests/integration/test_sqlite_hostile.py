"""SQLite files the broker must not take for its own, and the modes of the files it makes."""

from __future__ import annotations

import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from runner.backends import create_broker, create_dead_letter_store
from runner.brokers.base import Answer, DeadLetterFilter, Depth, Settle, SettleIncomplete
from runner.brokers.sqlite import schema as sqlite_schema
from runner.brokers.sqlite.broker import SqliteBroker
from runner.brokers.sqlite.schema import APPLICATION_ID, CREATE_WAIT_S
from runner.config.models import PipelineConfig
from runner.deadletter.file import FileDeadLetters
from runner.errors import BrokerUnavailable
from runner.model import DeadLetter, Task

VT = 30.0


def _open(path: Path) -> SqliteBroker:
    return SqliteBroker(str(path), 100, 0.2, "block", VT)


def _pragma(path: Path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        value: int = conn.execute(f"PRAGMA {name}").fetchone()[0]
        return value
    finally:
        conn.close()


def test_a_new_file_carries_the_queue_stamp(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    _open(path).close()
    assert _pragma(path, "application_id") == APPLICATION_ID
    assert _pragma(path, "user_version") == 1


def test_a_file_truncated_to_nothing_is_refused_not_recreated(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    broker = _open(path)
    broker.put_many([Task("a", i) for i in range(20)])
    broker.close()
    path.write_bytes(b"")
    Path(f"{path}-wal").unlink(missing_ok=True)
    Path(f"{path}-shm").unlink(missing_ok=True)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"q\.db: the file exists but holds no queue"):
        _open(path)
    assert time.monotonic() - start >= CREATE_WAIT_S  # it waited for a creator first
    assert path.stat().st_size == 0  # left as found


def _header_only(path: Path) -> None:
    """What a creator has written when it has switched to WAL but not yet made the schema."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()


def test_a_file_whose_creator_is_still_writing_the_schema_is_waited_for(tmp_path: Path) -> None:
    """The race of processes opening a new file at once, made certain: the file holds SQLite's
    header (its creator switched to WAL) and the creator writes the schema 0.3 s later. An open
    in between waits for it instead of refusing the file as one that holds no queue."""
    path = tmp_path / "q.db"
    _header_only(path)

    def creator_writes_the_schema() -> None:
        time.sleep(0.3)  # an open that does not wait has refused the file by now
        creator = sqlite3.connect(path, isolation_level=None)
        creator.execute(f"PRAGMA busy_timeout = {sqlite_schema.BUSY_TIMEOUT_MS}")
        sqlite_schema._migrate(creator, str(path), created=True)
        creator.close()

    creator = threading.Thread(target=creator_writes_the_schema)
    creator.start()
    try:
        _open(path).close()
    finally:
        creator.join()
    assert _pragma(path, "application_id") == APPLICATION_ID


@pytest.mark.parametrize("creator", [True, False])
def test_a_read_only_open_waits_for_the_schema_too(tmp_path: Path, creator: bool) -> None:
    """``dq-run stats`` racing the first ``dq-run run`` on a new file: the read-only open finds
    only SQLite's header, and waits for the schema (refused only when none comes)."""
    path = tmp_path / "q.db"
    _header_only(path)

    def creator_writes_the_schema() -> None:
        time.sleep(0.3)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {sqlite_schema.BUSY_TIMEOUT_MS}")
        sqlite_schema._migrate(conn, str(path), created=True)
        conn.close()

    thread = threading.Thread(target=creator_writes_the_schema)
    if creator:
        thread.start()
        try:
            sqlite_schema.connect(str(path), read_only=True).close()
        finally:
            thread.join()
        return
    with pytest.raises(BrokerUnavailable, match=r"q\.db: the file exists but holds no queue"):
        sqlite_schema.connect(str(path), read_only=True)
    assert _pragma(path, "application_id") == 0  # left as found


def test_a_file_with_only_a_header_and_no_creator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    _header_only(path)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"q\.db: the file exists but holds no queue"):
        _open(path)
    assert time.monotonic() - start >= CREATE_WAIT_S  # it waited for a creator first
    assert _pragma(path, "application_id") == 0  # left as found


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    with pytest.raises(BrokerUnavailable, match="not a distributed-queue database"):
        _open(path)
    conn = sqlite3.connect(path)
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert names == {"notes"}


def test_a_file_from_before_the_stamp_opens_and_is_stamped(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    broker = _open(path)
    broker.put_many([Task("a", "kept")])
    broker.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 0")  # as files were before the stamp
    conn.close()
    broker = _open(path)
    try:
        assert broker.depth()["a"].total == 1
    finally:
        broker.close()
    assert _pragma(path, "application_id") == APPLICATION_ID


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    errors: list[BaseException] = []
    opened: list[SqliteBroker] = []
    lock = threading.Lock()

    def open_one() -> None:
        try:
            broker = _open(path)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)
            return
        with lock:
            opened.append(broker)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for broker in opened:
        broker.close()
    assert errors == []
    assert len(opened) == 6


def test_the_database_and_its_wal_are_private(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    broker = _open(path)
    try:
        broker.put_many([Task("a", 1)])
        for name in (path, Path(f"{path}-wal")):
            assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
    finally:
        broker.close()


def test_the_file_dead_letter_queue_is_private(tmp_path: Path) -> None:
    store = FileDeadLetters(tmp_path / "dlq.jsonl")
    records = [
        DeadLetter(Task("a", {"secret": i}), "error", "E", "m", "", 1, 1.0, 1.0, 1.0)
        for i in range(2)
    ]
    store.add_many(records)
    assert store.take([records[0].id])  # rewrites the file through a temporary file
    for name in ("dlq.jsonl", "dlq.jsonl.lock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_file_mode_widens_the_files_it_creates(tmp_path: Path) -> None:
    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": "sqlite", "path": str(tmp_path / "q.db"), "file_mode": "0640"},
            "dead_letter": {"kind": "file", "path": str(tmp_path / "d.jsonl"), "file_mode": 0o640},
            "task_types": {"a": {"handler": "handlers.demo:send_email"}},
        }
    )
    create_broker(config).close()
    store = create_dead_letter_store(config)
    assert isinstance(store, FileDeadLetters)
    store.add(DeadLetter(Task("a", 1), "error", "E", "m", "", 1, 1.0, 1.0, 1.0))
    for name in ("q.db", "d.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_a_full_disk_holds_back_no_ack_for_a_dead_letter_beside_it(tmp_path: Path) -> None:
    """SQLITE_FULL (a disk full; played by a cap on the file's pages): a batch whose dead letter
    needs more room than is left is tried op by op, so its acks take effect (they free room)
    and only the dead letter waits, its task still leased; the error says the disk is full."""
    broker = _open(tmp_path / "q.db")
    broker.put_many([Task("a", i, id=f"t{i}") for i in range(3)])
    first, second, third = broker.get({"a": 3}, 3, 0)
    pages = broker._conn.execute("PRAGMA page_count").fetchone()[0]
    broker._conn.execute(f"PRAGMA max_page_count = {pages + 1}")
    huge = DeadLetter(second.task, "exhausted", "E", "m" * 20_000, "tb" * 20_000, 1, 0, 0, 0)
    batch = [Settle(first, "ack"), Settle(second, "dead", record=huge), Settle(third, "ack")]
    with pytest.raises(SettleIncomplete, match=r"\[SQLITE_FULL\] \(is the disk full\?\)") as caught:
        broker.settle_many(batch)
    assert caught.value.answers == (Answer.DONE, None, Answer.DONE)
    assert broker.depth()["a"] == Depth(leased=1)
    broker._conn.execute("PRAGMA max_page_count = 1073741823")  # room again
    assert broker.settle_many([batch[1]]) == [Answer.DONE]
    assert [r.id for r in broker.dead_letters(DeadLetterFilter())] == ["t1"]
    broker.close()
