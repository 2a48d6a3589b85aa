"""The pipeline parts of the SQLite broker's file: a join's kept parts (the ``joins`` table,
keyed (key, idx)), the dead letters a settle's effects write, and the queued rows of one
pipeline that the admin's ``tasks_of`` lists and ``cancel`` dead-letters.

Each function runs inside its caller's transaction: the hand-offs in the settle's (broker.py),
the admin calls in their own (admin.py). A put of a held task id is left out by the caller's
insert (``insert_tasks`` with ``skip_queued``), so a join whose task is already queued does not
put it twice. ``tasks_of`` and ``cancel`` decode every queued envelope to read its ``root_id``
header: a full scan, fine for an operator command; ``cancel`` holds the write lock through it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

from runner.brokers.base import Arrival, cancelled_record, of_root
from runner.brokers.sqlite.schema import LEASED, READY, WAITING, insert_row
from runner.codec import decode_task, encode_dead_letter, from_json_bytes
from runner.model import DeadLetter, Task

#: A dead letter as a row: (id, type, error_type, dead_at, record, raw_envelope), replacing
#: the record of the same id.
WRITE_DEAD_SQL = (
    "INSERT OR REPLACE INTO dead_letters (id, type, error_type, dead_at, record, raw_envelope)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_KEEP_PART_SQL = "INSERT OR IGNORE INTO joins (key, idx, value) VALUES (?, ?, ?)"
_COUNT_PARTS_SQL = "SELECT count(*) FROM joins WHERE key = ?"
_TAKE_PARTS_SQL = "DELETE FROM joins WHERE key = ? RETURNING idx, value"
_DELETE_DEAD_SQL = "DELETE FROM dead_letters WHERE id = ?"
_QUEUED_SQL = "SELECT seq, id, type, state, due_at, attempt, envelope FROM tasks ORDER BY seq"
_DELETE_TASK_SQL = "DELETE FROM tasks WHERE seq = ?"

State = Literal["ready", "delayed", "leased"]
#: What a row not yet due is (one due by now is ready, as ``depth`` counts it).
_NOT_DUE: dict[int, State] = {WAITING: "delayed", LEASED: "leased"}

#: The rows (``insert_row``'s) of the joined tasks to put.
Joined = list[tuple[Any, ...]]


def arriver(arrivals: Sequence[Arrival]) -> Callable[[sqlite3.Connection, float], Joined]:
    """The write that keeps ``arrivals``' parts, to run at ``now`` in a settle's transaction.

    A part already kept at its (key, index) stays as it was. Once ``size`` parts of a key are
    kept, they are dropped, the dead-letter record of the join's task is deleted, and the task
    comes back as a row to put, its payload the parts' values in index order. Each value is
    read here, before the transaction: one that is not JSON fails its caller, not the
    transaction other callers' writes share.
    """
    for arrival in arrivals:
        from_json_bytes(arrival.value)

    def arrive(conn: sqlite3.Connection, now: float) -> Joined:
        joined: Joined = []
        for arrival in arrivals:
            conn.execute(_KEEP_PART_SQL, (arrival.key, arrival.index, arrival.value))
            if conn.execute(_COUNT_PARTS_SQL, (arrival.key,)).fetchone()[0] < arrival.size:
                continue
            parts = sorted(conn.execute(_TAKE_PARTS_SQL, (arrival.key,)).fetchall())
            conn.execute(_DELETE_DEAD_SQL, (arrival.task.id,))
            payload = [from_json_bytes(value) for _, value in parts]
            joined.append(insert_row(replace(arrival.task, payload=payload), now))
        return joined

    return arrive


def dead_row(record: DeadLetter, raw_envelope: bytes | None = None) -> tuple[Any, ...]:
    """``record`` as ``WRITE_DEAD_SQL``'s parameters."""
    encoded = encode_dead_letter(record)
    return (record.id, record.task.type, record.error_type, record.dead_at, encoded, raw_envelope)


def queued_of(
    conn: sqlite3.Connection, root_id: str, now: float
) -> list[tuple[int, Task, State, bytes | None]]:
    """The queued rows of ``root_id``'s pipeline (``of_root``), oldest put first: each one's
    seq, task (with its attempt count), state as of ``now`` and, when its envelope cannot be
    decoded, that envelope (the task is then a stub with its id and type)."""
    found: list[tuple[int, Task, State, bytes | None]] = []
    for seq, task_id, kind, state, due_at, attempt, envelope in conn.execute(_QUEUED_SQL):
        raw: bytes | None = None
        try:
            task = decode_task(envelope, attempt)
        except Exception:  # a damaged row is still listed, and cancelled by its id
            task, raw = Task(type=kind, payload=None, id=task_id, attempt=attempt), envelope
        if of_root(task, root_id):
            due = state == READY or due_at <= now
            found.append((seq, task, "ready" if due else _NOT_DUE[state], raw))
    return found


def cancel_queued(conn: sqlite3.Connection, root_id: str, message: str, now: float) -> list[str]:
    """Dead-letter (reason ``cancelled``) the ready and delayed tasks of ``root_id``'s
    pipeline and delete their rows (which gives back their places in the capacity count);
    answer their ids. Leased ones are left to their workers."""
    cancelled: list[str] = []
    for seq, task, state, raw in queued_of(conn, root_id, now):
        if state == "leased":
            continue
        conn.execute(WRITE_DEAD_SQL, dead_row(cancelled_record(task, message, now), raw))
        conn.execute(_DELETE_TASK_SQL, (seq,))
        cancelled.append(task.id)
    return cancelled
