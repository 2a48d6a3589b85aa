"""The SQLite broker's file: schema, connection settings, error translation and row helpers.

One file holds every table. ``tasks`` keeps every task from put until ack or dead-letter, in
one of three states, so that each claim is an index lookup rather than a scan:

- ``READY``   claimable now; handed out in ``seq`` order (the rowid, so FIFO within a type).
- ``WAITING`` a delayed put or a retry; ``due_at`` is its not_before.
- ``LEASED``  handed out; ``due_at`` is leased_until and ``lease`` the receipt that fences it.

A claim first promotes WAITING and LEASED rows whose ``due_at`` has passed to READY (an expired
lease also sets ``redelivered``, and keeps its token until the next claim replaces it, so a
late-but-unchallenged worker may still ack). Two indexes serve this: ``(type, state)`` (with the
implicit rowid, so "READY rows of a type in seq order" needs no sort) and
``(state, due_at)`` for the promotion. ``meta.count`` is kept by triggers and is the capacity
counter, so a put does not count the table.

``settled`` remembers the receipts whose ack, retry, dead or release took effect, written in the
settle's own transaction, so that the same call sent again answers ALREADY_DONE rather than
FENCED. It is read only for an op whose receipt no longer matches its row. Receipts begin with
their claim time, so new rows go at the end of the key and the rows old enough to prune are at
its start (see ``SqliteBroker``): one B-tree, no index to keep, and pruning never scans the
rest.

``gates`` (pauses), ``buckets`` (rate limits with their token buckets) and ``circuits``
(circuit breakers with their circuits) hold the gates; gates.py reads and writes their rows,
all three in one query for every claim. ``values`` holds the keys settle effects and
``put_if`` set, with ``expires_at`` (NULL: no ttl); reads skip expired rows, and ``sweep``
deletes them (and ended pauses) through the partial index on ``expires_at``, which keys
without a ttl stay out of. ``scan_values`` reads the keys with a prefix as one range of the
primary key, never as a LIKE or GLOB pattern. ``joins`` keeps the parts of pipelines' joins
that have arrived, keyed (key, idx) (joins.py); ``delete_values`` drops a key's parts too.

``settled``, ``gates``, ``values``, ``buckets``, ``circuits`` and ``joins`` came after schema
version 1 and are created when missing, so an older runner's file opens, still at version 1,
and gains them (older runners ignore them: one sharing the file with a newer one would not
honour its gates). A read-only open creates nothing: there an older file reads as holding no
gates and no values.

Which files are queues: only a path that does not exist is created (with mode 0600 unless
``file_mode`` widens it; SQLite gives its ``-wal`` and ``-shm`` files the same mode). The new
file is stamped ``PRAGMA application_id = APPLICATION_ID`` and ``user_version =
SCHEMA_VERSION``; an existing file must carry both, so a file truncated to 0 bytes, or any
other database, is refused instead of being taken for a new, empty queue. A file from before
the stamp (application_id 0, version 1, our tables) is recognised by its tables and stamped on
open. A process that finds a file with no queue in it (0 bytes, or only SQLite's header) waits
up to ``CREATE_WAIT_S`` for its creator to write the schema before refusing it.

Durability: WAL with ``synchronous=NORMAL``. A committed transaction survives the crash of any
process; the last transactions before a power cut or kernel crash may be lost (never corrupted).

Size: about 660 lines, over our 400: the file's whole life (schema, stamps, migration, the
wait for a creator, error translation) and the row codecs and helpers the broker and its admin
side share; the gates' rows are in gates.py, and splitting the task and value helpers out is
the next step.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from runner.brokers.base import DeadLetterFilter, Delivery, SetValue
from runner.codec import decode_dead_letter, decode_task, encode_task
from runner.errors import BrokerError, BrokerUnavailable
from runner.model import DeadLetter, DeadReason, Task

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a queue file: the bytes "dq-q".
APPLICATION_ID = 0x64712D71
#: How long an open waits for a file another process has just created to get its schema.
CREATE_WAIT_S = 2.0
_TABLES = frozenset({"tasks", "dead_letters", "meta"})

IDS_PER_QUERY = 500  # well under SQLite's bound-parameter limit

READY = 0
WAITING = 1
LEASED = 2

#: How long a statement waits for another process's write lock before failing, in ms.
#: Write transactions here last microseconds; reaching this means a process is stuck holding it.
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE tasks (
    seq          INTEGER PRIMARY KEY,     -- rowid: FIFO order within a type
    id           TEXT    NOT NULL UNIQUE,
    type         TEXT    NOT NULL,
    state        INTEGER NOT NULL,        -- 0 ready, 1 waiting, 2 leased
    due_at       REAL    NOT NULL,        -- waiting: not_before; leased: leased_until
    attempt      INTEGER NOT NULL,        -- deliveries so far (counted at hand-out)
    redelivered  INTEGER NOT NULL DEFAULT 0,
    lease        TEXT,                    -- receipt of the latest claim
    enqueued_at  REAL    NOT NULL,
    envelope     BLOB    NOT NULL         -- runner.codec.encode_task
);
CREATE INDEX tasks_claim ON tasks (type, state);
CREATE INDEX tasks_due ON tasks (state, due_at);

CREATE TABLE dead_letters (
    id           TEXT PRIMARY KEY,
    type         TEXT NOT NULL,
    error_type   TEXT NOT NULL,
    dead_at      REAL NOT NULL,
    record       BLOB NOT NULL,           -- runner.codec.encode_dead_letter
    raw_envelope BLOB                     -- the stored envelope when it could not be decoded
);
CREATE INDEX dead_letters_at ON dead_letters (dead_at);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('count', 0);
CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    BEGIN UPDATE meta SET value = value + 1 WHERE key = 'count'; END;
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks
    BEGIN UPDATE meta SET value = value - 1 WHERE key = 'count'; END;
"""

#: Added to version 1 files when missing (see the module docstring), hence IF NOT EXISTS.
#: ``values`` is an SQL keyword: the table's name is always quoted.
_ADDED_SCHEMA = """
CREATE TABLE IF NOT EXISTS settled (
    receipt    TEXT PRIMARY KEY,          -- the lease of a claim whose settle took effect
    settled_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gates (
    type  TEXT NOT NULL,
    kind  TEXT NOT NULL,                  -- 'pause', the one kind so far
    until REAL,                           -- epoch seconds; NULL: until cleared
    PRIMARY KEY (type, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buckets (
    type      TEXT PRIMARY KEY,           -- a rate-limited type
    rate      REAL NOT NULL,              -- its RateLimit: tokens per second
    burst     REAL NOT NULL,              -- and the bucket's size
    tokens    REAL,                       -- as of ``at``; NULL: no task taken yet (a full bucket)
    at        REAL,                       -- epoch seconds, broker's clock
    limited_s REAL NOT NULL DEFAULT 0     -- seconds in all it held less than one token
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS circuits (
    type            TEXT PRIMARY KEY,     -- a type with a circuit breaker
    failure_rate    REAL    NOT NULL,     -- its CircuitBreaker
    min_calls       INTEGER NOT NULL,
    window_s        REAL    NOT NULL,
    open_for_s      REAL    NOT NULL,
    half_open_calls INTEGER NOT NULL,
    state           TEXT,                 -- its Circuit; NULL: not used yet (a new closed one)
    since           REAL,                 -- epoch seconds, broker's clock
    window_start    REAL,
    calls           INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    prev_calls      INTEGER NOT NULL DEFAULT 0,
    prev_failures   INTEGER NOT NULL DEFAULT 0,
    probes          INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS "values" (
    key        TEXT PRIMARY KEY,          -- set by settle effects and put_if
    value      TEXT NOT NULL,
    expires_at REAL                       -- epoch seconds; NULL: no ttl
);
CREATE INDEX IF NOT EXISTS values_expiry ON "values" (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS joins (
    key   TEXT    NOT NULL,               -- an Arrival's: the join
    idx   INTEGER NOT NULL,               -- the part's place in the joined task's payload
    value TEXT    NOT NULL,               -- the part: JSON text
    PRIMARY KEY (key, idx)
) WITHOUT ROWID;
"""


def describe(path: str, exc: sqlite3.Error) -> str:
    """A message naming the file and SQLite's error code, e.g. ``SQLITE_FULL``."""
    code = getattr(exc, "sqlite_errorname", None)
    hint = ""
    if code and code.startswith("SQLITE_READONLY"):
        hint = " (is the file or its directory read-only?)"
    elif code and code.startswith("SQLITE_FULL"):
        hint = " (is the disk full?)"
    elif code and code.startswith("SQLITE_NOTADB"):
        hint = " (the file is not a SQLite database)"
    elif code and code.startswith("SQLITE_BUSY"):
        hint = " (another process holds the write lock)"
    suffix = f" [{code}]" if code else ""
    return f"sqlite broker {path}: {exc}{suffix}{hint}"


def unavailable(path: str, exc: sqlite3.Error, operation: str) -> BrokerUnavailable:
    """``exc``, raised by SQLite during ``operation`` (a broker method), as BrokerUnavailable."""
    return BrokerUnavailable(describe(path, exc), backend="sqlite", operation=operation)


def _cannot_open(message: str) -> BrokerUnavailable:
    return BrokerUnavailable(message, backend="sqlite", operation="open")


def connect(path: str, read_only: bool = False, file_mode: int = 0o600) -> sqlite3.Connection:
    """Open (creating if needed) the broker file at ``path`` and bring its schema up to date.

    ``read_only`` (operator reads: stats, dlq list/show) opens an existing queue file without
    writing anything, so it works on a file that cannot be written; a missing one is created.
    ``file_mode``: of a file this call creates (exactly, whatever the umask). Raises
    BrokerUnavailable, naming the file, when it cannot be opened, written or understood.
    """
    if read_only and os.path.exists(path):  # a missing file is created: an empty queue
        return _connect_read_only(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_open(f"sqlite broker {path}: cannot create its directory: {exc}") from exc
    created = _create(path, file_mode)
    if not created:
        _wait_for_content(path)

    def prepare(conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _cannot_open(f"sqlite broker {path}: could not switch to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn, path, created)

    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; check_same_thread=False: the
    # one connection is shared by this process's threads behind the broker's lock.
    return _open(
        path,
        lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0),
        prepare,
    )


def _open(
    path: str,
    make: Callable[[], sqlite3.Connection],
    prepare: Callable[[sqlite3.Connection], None],
) -> sqlite3.Connection:
    """``make()`` a connection and ``prepare`` it; on any failure close it, and raise a
    sqlite3.Error as BrokerUnavailable naming ``path``."""
    conn: sqlite3.Connection | None = None
    try:
        conn = make()
        prepare(conn)
    except BaseException as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, sqlite3.Error):
            raise unavailable(path, exc, "open") from exc
        raise
    return conn


class _BeingCreated(Exception):
    """A read-only open found a file with no schema yet: its creator may be writing it now."""


def _connect_read_only(path: str) -> sqlite3.Connection:
    """A read-only connection to an existing queue file. A file whose creator has written its
    first page but not yet committed the schema (another process starting on it right now) is
    waited for, up to CREATE_WAIT_S, rather than refused."""
    _wait_for_content(path)
    deadline = time.monotonic() + CREATE_WAIT_S
    while True:
        try:
            return _try_read_only(path)
        except _BeingCreated:
            if time.monotonic() >= deadline:
                raise _cannot_open(
                    f"sqlite broker {path}: the file exists but holds no queue (only SQLite's "
                    f"header, still after {CREATE_WAIT_S:g}s); refusing to use it"
                ) from None
            time.sleep(0.02)


def _try_read_only(path: str) -> sqlite3.Connection:
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"

    def check(conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        stamp = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if stamp == 0 and version == 0 and not tables:
            raise _BeingCreated(path)
        if stamp not in (0, APPLICATION_ID) or not tables >= _TABLES:
            raise _cannot_open(
                f"sqlite broker {path}: the file is not a distributed-queue database "
                f"(application_id {stamp:#x}, user_version {version}); refusing to use it"
            )
        if version != SCHEMA_VERSION:
            raise _cannot_open(
                f"sqlite broker {path}: schema version {version} is not supported "
                f"(this runner reads version {SCHEMA_VERSION})"
            )

    return _open(
        path,
        lambda: sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False),
        check,
    )


def _create(path: str, mode: int) -> bool:
    """Create ``path`` with ``mode`` if it does not exist; True if this call created it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.fchmod(fd, mode)  # exactly: a umask would otherwise narrow a widened mode
        finally:
            os.close(fd)
    except FileExistsError:
        return False
    except OSError as exc:
        raise _cannot_open(f"sqlite broker {path}: cannot create it: {exc}") from exc
    return True


def _wait_for_content(path: str) -> None:
    """Refuse a 0-byte file, unless it gains content soon (its creator's first write)."""
    deadline = time.monotonic() + CREATE_WAIT_S
    while _size(path) == 0:
        if time.monotonic() >= deadline:
            raise _cannot_open(
                f"sqlite broker {path}: the file exists but holds no queue (0 bytes: truncated?); "
                "refusing to start a new, empty queue in it: move it away first"
            )
        time.sleep(0.02)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1  # gone or unreadable: let the open report it


def _migrate(conn: sqlite3.Connection, path: str, created: bool) -> None:
    """Check the file's stamp and bring its schema up to date (creating it in a new file)."""
    # BEGIN IMMEDIATE so two processes opening a new file at once create the schema once.
    version, stamp, tables = _begin_with_stamp(conn, path, created)
    try:
        if version == 0 and stamp == 0 and not tables:
            # Not executescript: it would COMMIT first, outside our BEGIN IMMEDIATE.
            for statement in _statements(_SCHEMA):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        elif stamp == 0 and version == SCHEMA_VERSION and tables >= _TABLES:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # from before the stamp
        elif stamp != APPLICATION_ID:
            raise _cannot_open(
                f"sqlite broker {path}: the file is not a distributed-queue database "
                f"(application_id {stamp:#x}, user_version {version}); refusing to use it"
            )
        elif version != SCHEMA_VERSION:
            raise _cannot_open(
                f"sqlite broker {path}: schema version {version} is not supported "
                f"(this runner reads version {SCHEMA_VERSION})"
            )
        for statement in _statements(_ADDED_SCHEMA):
            conn.execute(statement)
        # A file that cannot be written (read-only, immutable) still opens, read-only: one
        # harmless write now turns that into a clear error at start-up, not at the first put.
        conn.execute("UPDATE meta SET value = value WHERE key = 'count'")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def _begin_with_stamp(
    conn: sqlite3.Connection, path: str, created: bool
) -> tuple[int, int, set[str]]:
    """BEGIN IMMEDIATE and read the file's (user_version, application_id, tables).

    A file another process has just created gets its SQLite header (switching to WAL) before
    its creator's transaction writes the schema: one that holds no queue yet is read again
    until ``CREATE_WAIT_S`` has passed, then refused (a truncated file, or someone else's).
    """
    deadline = time.monotonic() + CREATE_WAIT_S
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            stamp = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        except BaseException:
            rollback(conn)
            raise
        if created or version or stamp or tables:
            return version, stamp, tables
        rollback(conn)
        if time.monotonic() >= deadline:
            raise _cannot_open(
                f"sqlite broker {path}: the file exists but holds no queue (truncated?); "
                "refusing to start a new, empty queue in it: move it away first"
            )
        time.sleep(0.02)


def _statements(script: str) -> list[str]:
    """Split a script into statements; triggers contain ';' so complete_statement decides."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        stripped = line.split("--", 1)[0]
        current += stripped
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


def rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (SQLITE_FULL); then there is nothing to undo.
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


_INSERT_SQL = (
    "INSERT {}INTO tasks (id, type, state, due_at, attempt, enqueued_at, envelope)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def insert_row(task: Task, now: float) -> tuple[Any, ...]:
    if not task.enqueued_at:
        task = replace(task, enqueued_at=now)
    state, due_at = (WAITING, task.not_before) if task.not_before > now else (READY, 0.0)
    return (task.id, task.type, state, due_at, task.attempt, task.enqueued_at, encode_task(task))


def insert_tasks(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[Any, ...]],
    operation: str,
    skip_queued: bool = False,
) -> int:
    """Insert ``rows`` (``insert_row``'s) for the broker method ``operation``. A task id already
    queued raises BrokerError, or with ``skip_queued`` leaves that row out (a settle effect
    must not fail the shared transaction)."""
    if skip_queued:
        conn.executemany(_INSERT_SQL.format("OR IGNORE "), rows)
        return len(rows)
    try:
        conn.executemany(_INSERT_SQL.format(""), rows)
    except sqlite3.IntegrityError as exc:
        message = f"a task id in this batch is already queued: {exc}"
        raise BrokerError(message, backend="sqlite", operation=operation) from exc
    return len(rows)


def held(conn: sqlite3.Connection) -> int:
    """How many tasks the file holds (``meta.count``, the capacity counter)."""
    return int(conn.execute("SELECT value FROM meta WHERE key = 'count'").fetchone()[0])


def replay_one(conn: sqlite3.Connection, row: tuple[Any, ...], now: float) -> int:
    """Queue one dead letter's task again (attempt 0); ``row`` ends with its raw_envelope."""
    *fields, raw_envelope = row
    record = to_dead_letter(*fields)
    if record.reason == DeadReason.CORRUPT_RECORD or raw_envelope is not None:
        return 0  # the original task cannot be rebuilt; replaying a stub would lose its payload
    task = replace(record.task, attempt=0, not_before=0.0)
    inserted = conn.execute(
        "INSERT OR IGNORE INTO tasks (id, type, state, due_at, attempt, enqueued_at, envelope)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        insert_row(task, now),
    ).rowcount
    if inserted:
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (record.id,))
    return inserted


def anything_claimable(conn: sqlite3.Connection, types: Sequence[str], now: float) -> bool:
    # A read first, so idle pollers in other processes do not take the write lock.
    if types:
        marks = ",".join("?" * len(types))
        ready = conn.execute(
            f"SELECT 1 FROM tasks WHERE type IN ({marks}) AND state = {READY} LIMIT 1", types
        ).fetchone()
        if ready:
            return True
    due = conn.execute(
        f"SELECT 1 FROM tasks WHERE state IN ({WAITING}, {LEASED}) AND due_at <= ? LIMIT 1",
        (now,),
    ).fetchone()
    return due is not None


def next_due(conn: sqlite3.Connection) -> float | None:
    times = [
        conn.execute(f"SELECT min(due_at) FROM tasks WHERE state = {state}").fetchone()[0]
        for state in (WAITING, LEASED)
    ]
    present = [t for t in times if t is not None]
    return min(present) if present else None


def sweep(conn: sqlite3.Connection, now: float) -> None:
    """Delete the values whose ttl ran out and the pauses that ended by ``now``: reads skip
    them already; this keeps keys that are never read again from piling up."""
    conn.execute('DELETE FROM "values" WHERE expires_at <= ?', (now,))
    conn.execute("DELETE FROM gates WHERE until <= ?", (now,))


#: A value is live while it has no ttl or its ttl runs past the parameter ``now``.
_LIVE = "(expires_at IS NULL OR expires_at > :now)"
#: Set a value: (key, value, expires_at), expires_at NULL for no ttl.
SET_VALUE_SQL = 'INSERT OR REPLACE INTO "values" (key, value, expires_at) VALUES (?, ?, ?)'


def write_values(conn: sqlite3.Connection, sets: Sequence[SetValue], now: float) -> None:
    """Set each of ``sets`` (replacing a key set before, ttl and all), one with a ttl
    expiring that long after ``now``. The rows are made in one comprehension, not a call each:
    a pipeline's settles set one per task."""
    rows = [(s.key, s.value, None if s.ttl_s is None else now + s.ttl_s) for s in sets]
    conn.executemany(SET_VALUE_SQL, rows)


#: Whether any key, live or not, lies in [?, ?].
_ANY_IN_RANGE_SQL = 'SELECT 1 FROM "values" WHERE key BETWEEN ? AND ? LIMIT 1'


def read_values(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> dict[str, str]:
    """The values of those of ``keys`` that are set and whose ttl, if any, runs past ``now``.

    Several keys are first probed as one range of the primary key (least to greatest): a
    settle's cancel guards (``cancel:<root>``, one per pipeline task in the batch) are almost
    never set, and one probe of an empty range costs what one key's lookup does."""
    if len(keys) > 1 and conn.execute(_ANY_IN_RANGE_SQL, (min(keys), max(keys))).fetchone() is None:
        return {}
    found: dict[str, str] = {}
    for marks, chunk in _in_chunks(keys):
        rows = conn.execute(
            f'SELECT key, value FROM "values" WHERE key IN ({marks}) AND {_LIVE}',
            {**chunk, "now": now},
        )
        found.update(rows)
    return found


def scan_values(conn: sqlite3.Connection, prefix: str, now: float) -> dict[str, str]:
    """The live values (as ``read_values``) of the keys that start with ``prefix``, as text."""
    end = _prefix_end(prefix)
    bounds = "key >= :prefix" if end is None else "key >= :prefix AND key < :end"
    rows = conn.execute(
        f'SELECT key, value FROM "values" WHERE {bounds} AND {_LIVE} ORDER BY key',
        {"prefix": prefix, "end": end, "now": now},
    )
    return dict(rows)


def _prefix_end(prefix: str) -> str | None:
    """The least text after every text that starts with ``prefix`` (None: there is none).

    The keys with a prefix are then one range of the primary key, which no character of it can
    turn into a pattern (as LIKE and GLOB would). Text compares by code point (BINARY collation
    on UTF-8, as in Python), so the end is the prefix with its last character raised by one,
    once trailing U+10FFFF (the greatest) are dropped; surrogates, which SQLite cannot store,
    are stepped over.
    """
    stem = prefix.rstrip(chr(0x10FFFF))
    if not stem:
        return None
    after = ord(stem[-1]) + 1
    if 0xD800 <= after <= 0xDFFF:
        after = 0xE000
    return stem[:-1] + chr(after)


def delete_values(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> int:
    """Delete ``keys`` and the join parts kept under them; how many of them were live (as
    ``read_values``) at ``now`` or kept parts."""
    deleted: set[str] = set()
    for marks, chunk in _in_chunks(keys):
        rows = conn.execute(
            f'DELETE FROM "values" WHERE key IN ({marks}) RETURNING key, {_LIVE}',
            {**chunk, "now": now},
        )
        deleted.update(key for key, live in rows if live)
        parts = conn.execute(f"DELETE FROM joins WHERE key IN ({marks}) RETURNING key", chunk)
        deleted.update(key for (key,) in parts)
    return len(deleted)


def _in_chunks(keys: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """``keys`` in chunks that fit a query: each as its placeholders (``:k0, :k1``, ...) and
    their parameters."""
    for i in range(0, len(keys), IDS_PER_QUERY):
        chunk = keys[i : i + IDS_PER_QUERY]
        params = {f"k{n}": key for n, key in enumerate(chunk)}
        yield ", ".join(f":{name}" for name in params), params


def to_delivery(row: tuple[Any, ...]) -> Delivery:
    _seq, task_id, kind, attempt, redelivered, receipt, envelope = row
    try:
        task = decode_task(envelope, attempt)
        if task.id != task_id or task.type != kind:
            raise ValueError(f"envelope is for {task.type}/{task.id}, row is {kind}/{task_id}")
    except Exception as exc:  # anything undecodable must reach the DLQ, never crash the worker
        stub = Task(type=kind, payload=None, id=task_id, attempt=attempt)
        error = f"undecodable task envelope: {type(exc).__name__}: {exc}"
        return Delivery(stub, receipt, bool(redelivered), decode_error=error)
    return Delivery(task, receipt, bool(redelivered))


def to_dead_letter(
    task_id: str, kind: str, error_type: str, dead_at: float, record: bytes
) -> DeadLetter:
    try:
        return decode_dead_letter(record)
    except Exception as exc:  # an operator must still see (and can purge) a damaged record
        return DeadLetter(
            task=Task(type=kind, payload=None, id=task_id),
            reason=DeadReason.CORRUPT_RECORD,  # it can still be listed and purged
            error_type=error_type,
            message=f"undecodable dead-letter record: {type(exc).__name__}: {exc}",
            traceback="",
            attempts=0,
            first_attempt_at=0.0,
            last_attempt_at=0.0,
            dead_at=dead_at,
        )


def dlq_where(where: DeadLetterFilter) -> Iterator[tuple[str, list[Any]]]:
    """SQL conditions (one per chunk of ids) matching ``where``, with their parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    if where.type is not None:
        clauses.append("type = ?")
        params.append(where.type)
    if where.error is not None:
        clauses.append("error_type = ?")
        params.append(where.error)
    if where.since is not None:
        clauses.append("dead_at >= ?")
        params.append(where.since)
    base = " AND ".join(clauses) or "1"
    if where.ids is None:
        yield base, params
        return
    ids = sorted(where.ids)
    for i in range(0, len(ids), IDS_PER_QUERY):
        chunk = ids[i : i + IDS_PER_QUERY]
        yield f"{base} AND id IN ({','.join('?' * len(chunk))})", [*params, *chunk]
