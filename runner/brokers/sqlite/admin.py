"""The BrokerAdmin half of SqliteBroker: the operator commands (dead letters, replay, purge,
queue ages, a pipeline's ``tasks_of`` and ``cancel``), and the broker's plain calls beside the
task path: its clock, the gates (set, cleared and listed here with the rate limits' buckets and
the circuit breakers' circuits, honoured inside every claim) and the values that settle
effects, ``put_if``, ``put_unique`` and ``set_values`` set. None of it is on the claim and
settle path, so it lives apart from that path's statements and group commit in broker.py.
Mixed into SqliteBroker, whose transactions and insert plumbing it uses (declared below); the
tables and row helpers are in schema.py, the gates' rows in gates.py, the pipelines' rows in
joins.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from runner.brokers.base import (
    UNIQUE_PREFIX,
    Bucket,
    Circuit,
    CircuitBreaker,
    DeadLetterFilter,
    Gate,
    Pause,
    Queued,
    RateLimit,
    SetValue,
)
from runner.brokers.sqlite.gates import GATE_TABLES, PAUSE, Gates, gates_at
from runner.brokers.sqlite.joins import cancel_queued, queued_of
from runner.brokers.sqlite.schema import (
    SET_VALUE_SQL,
    delete_values,
    dlq_where,
    held,
    read_values,
    replay_one,
    scan_values,
    to_dead_letter,
    write_values,
)
from runner.errors import QueueFull
from runner.model import DeadLetter, Task

_SET_PAUSE_SQL = f"INSERT OR REPLACE INTO gates (type, kind, until) VALUES (?, '{PAUSE}', ?)"
_CLEAR_PAUSE_SQL = f"DELETE FROM gates WHERE type = ? AND kind = '{PAUSE}' RETURNING until"
#: A new rate keeps the bucket's tokens (capped at the new burst when next refilled).
_SET_RATE_SQL = (
    "INSERT INTO buckets (type, rate, burst) VALUES (?, ?, ?)"
    " ON CONFLICT (type) DO UPDATE SET rate = excluded.rate, burst = excluded.burst"
)
_CLEAR_RATE_SQL = "DELETE FROM buckets WHERE type = ? RETURNING type"
#: A breaker set again keeps its circuit's state.
_SET_BREAKER_SQL = (
    "INSERT INTO circuits (type, failure_rate, min_calls, window_s, open_for_s, half_open_calls)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (type) DO UPDATE SET failure_rate = excluded.failure_rate,"
    " min_calls = excluded.min_calls, window_s = excluded.window_s,"
    " open_for_s = excluded.open_for_s, half_open_calls = excluded.half_open_calls"
)
_CLEAR_BREAKER_SQL = "DELETE FROM circuits WHERE type = ? RETURNING type"
#: The kinds of gate (``clear_gate`` refuses any other).
_KINDS = (Pause, RateLimit, CircuitBreaker)

_T = TypeVar("_T")
#: What SqliteBroker._insert_when_room runs in each try's write transaction: how many tasks
#: the insert puts (as read in that transaction), and the insert, run only when they fit.
InsertPlan = Callable[[sqlite3.Connection], tuple[int, Callable[[sqlite3.Connection], _T]]]


class SqliteAdmin:
    """BrokerAdmin on the SQLite file; SqliteBroker provides what is declared here."""

    _capacity: int
    _clock: Callable[[], float]
    _read_only: bool

    def _read(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _write(self, operation: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _open_connection(self, operation: str) -> sqlite3.Connection:
        raise NotImplementedError

    def _changed(self) -> None:
        raise NotImplementedError

    def _inserter(
        self, tasks: Sequence[Task], operation: str, skip_queued: bool = False
    ) -> Callable[[sqlite3.Connection], int]:
        raise NotImplementedError

    def _insert_when_room(self, plan: InsertPlan[_T], timeout: float | None, operation: str) -> _T:
        raise NotImplementedError

    def _queue_full(self, count: int, needed: int, operation: str) -> QueueFull:
        raise NotImplementedError

    def dead_letters(self, where: DeadLetterFilter) -> list[DeadLetter]:
        """Matching dead letters, oldest death first."""
        found: list[DeadLetter] = []
        with self._read("dead_letters") as conn:
            for clause, params in dlq_where(where):
                rows = conn.execute(
                    "SELECT id, type, error_type, dead_at, record FROM dead_letters"
                    f" WHERE {clause}",
                    params,
                ).fetchall()
                found.extend(to_dead_letter(*row) for row in rows)
        found.sort(key=lambda record: (record.dead_at, record.id))
        return found

    def dead_letter_count(self) -> int:
        with self._read("dead_letter_count") as conn:
            return int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def oldest_enqueued_at(self) -> dict[str, float]:
        """Per type, the earliest ``enqueued_at`` of its queued rows (one scan; operator use)."""
        with self._read("oldest_enqueued_at") as conn:
            rows = conn.execute("SELECT type, min(enqueued_at) FROM tasks GROUP BY type").fetchall()
        return {kind: float(at) for kind, at in rows}

    def replay(self, ids: Sequence[str]) -> int:
        """Move these dead letters back to the queue with attempt 0; returns how many moved.

        All-or-nothing like put_many: blocks for room up to enqueue_timeout, then QueueFull.
        Skipped: unknown ids, ids already queued, undecodable records, and tasks that were
        dead-lettered because their envelope could not be decoded (their payload is gone).
        """
        wanted = DeadLetterFilter(ids=frozenset(ids))
        needed = len(self.dead_letters(wanted))
        if needed == 0:
            return 0

        def insert(conn: sqlite3.Connection) -> int:
            moved = 0
            for clause, params in dlq_where(wanted):
                rows = conn.execute(
                    "SELECT id, type, error_type, dead_at, record, raw_envelope"
                    f" FROM dead_letters WHERE {clause}",
                    params,
                ).fetchall()
                for row in rows:
                    moved += replay_one(conn, row, self._clock())
            return moved

        return self._insert_when_room(lambda conn: (needed, insert), None, "replay")

    def purge(self, where: DeadLetterFilter) -> int:
        """Delete matching dead letters for good; returns how many."""
        purged = 0
        with self._write("purge") as conn:
            for clause, params in dlq_where(where):
                purged += conn.execute(f"DELETE FROM dead_letters WHERE {clause}", params).rowcount
        return purged

    def tasks_of(self, root_id: str) -> list[Queued]:
        """The queued tasks (ready, delayed or leased, as ``depth`` counts them) of the
        pipeline whose first task is ``root_id``, oldest put first."""
        now = self._clock()
        with self._read("tasks_of") as conn:
            return [Queued(task, state) for _, task, state, _ in queued_of(conn, root_id, now)]

    def cancel(self, root_id: str, message: str) -> list[str]:
        """Dead-letter the ready and delayed tasks of ``root_id``'s pipeline (reason
        ``cancelled``, ``message`` as the record's) in one transaction; answer their ids.
        Leased ones are left to their workers."""
        with self._write("cancel") as conn:
            cancelled = cancel_queued(conn, root_id, message, self._clock())
        if cancelled:
            self._changed()  # room for a put waiting
        return cancelled

    # -- clock, gates and values (runner.brokers.base) --------------------------------------

    def now(self) -> float:
        return self._clock()

    def set_gate(self, type_name: str, gate: Gate) -> None:
        """Hold ``type_name``'s tasks back from every claim (of every process) as ``gate``
        says; replaces the type's gate of the same kind (a rate limit keeps its bucket, a
        circuit breaker its circuit)."""
        with self._write("set_gate") as conn:
            if isinstance(gate, RateLimit):
                conn.execute(_SET_RATE_SQL, (type_name, gate.rate, gate.burst))
            elif isinstance(gate, CircuitBreaker):
                conn.execute(
                    _SET_BREAKER_SQL,
                    (
                        type_name,
                        gate.failure_rate,
                        gate.min_calls,
                        gate.window_s,
                        gate.open_for_s,
                        gate.half_open_calls,
                    ),
                )
            else:
                conn.execute(_SET_PAUSE_SQL, (type_name, gate.until))
        self._changed()  # a get of this process waiting for a token: it may come sooner

    def clear_gate(self, type_name: str, kind: type[Gate]) -> bool:
        """Remove ``type_name``'s gate of ``kind`` (a rate limit with its bucket, a circuit
        breaker with its circuit); True when one was in force."""
        if kind not in _KINDS:
            raise TypeError(f"unknown kind of gate: {kind!r}")
        with self._write("clear_gate") as conn:
            now = self._clock()
            if kind is RateLimit:
                in_force = bool(conn.execute(_CLEAR_RATE_SQL, (type_name,)).fetchall())
            elif kind is CircuitBreaker:
                in_force = bool(conn.execute(_CLEAR_BREAKER_SQL, (type_name,)).fetchall())
            else:
                ended = conn.execute(_CLEAR_PAUSE_SQL, (type_name,)).fetchall()
                in_force = any(until is None or until > now for (until,) in ended)
        self._changed()  # a get of this process held back by it claims at once
        return in_force

    def gates(self) -> dict[str, tuple[Gate, ...]]:
        """Per type, its gates in force: its pause, then its rate limit, then its breaker."""
        found = self._gates_at("gates")
        listed: dict[str, tuple[Gate, ...]] = {}
        for kind in sorted(found.paused.keys() | found.limited.keys() | found.broken.keys()):
            listed[kind] = (
                *((Pause(until=found.paused[kind]),) if kind in found.paused else ()),
                *((found.limited[kind][0],) if kind in found.limited else ()),
                *((found.broken[kind].breaker,) if kind in found.broken else ()),
            )
        return listed

    def buckets(self) -> dict[str, Bucket]:
        """Per rate-limited type, its bucket refilled to now (read only: nothing is written)."""
        limited = self._gates_at("buckets").limited
        return {kind: limited[kind][1] for kind in sorted(limited)}

    def circuits(self) -> dict[str, Circuit]:
        """Per type with a circuit breaker, its circuit as of now (read only: a change due by
        now, such as open to half-open, is reported but written by the next claim)."""
        broken = self._gates_at("circuits").broken
        return {kind: broken[kind].circuit for kind in sorted(broken)}

    def _gates_at(self, operation: str) -> Gates:
        """The gates in force now (gates.gates_at); an older file opened read-only reads as
        holding none of the kinds it has no table for."""
        now = self._clock()
        with self._read(operation) as conn:
            tables = [t for t in GATE_TABLES if not self._lacks_table(conn, t)]
            return gates_at(conn, now, tables)

    def read_values(self, keys: Sequence[str]) -> dict[str, str]:
        now = self._clock()
        with self._read("read_values") as conn:
            if not keys or self._lacks_table(conn, "values"):
                return {}
            return read_values(conn, keys, now)

    def put_if(self, key: str, expected: str | None, value: str, tasks: Sequence[Task]) -> bool:
        """When ``key`` holds ``expected`` (None: absent), set it to ``value`` (no ttl) and put
        ``tasks`` as ``put_many`` does, in one transaction, and answer True; else False.

        Never waits for room: raises QueueFull, having changed nothing, when the tasks do not
        fit.
        """
        insert = self._inserter(tasks, "put_if")
        with self._write("put_if") as conn:
            if read_values(conn, [key], self._clock()).get(key) != expected:
                return False
            if tasks:
                count = held(conn)
                if count + len(tasks) > self._capacity:
                    raise self._queue_full(count, len(tasks), "put_if")  # nothing written yet
                insert(conn)
            conn.execute(SET_VALUE_SQL, (key, value, None))
        if tasks:
            self._changed()
        return True

    def put_unique(self, tasks: Sequence[Task], timeout: float | None = None) -> list[str]:
        """``put_many`` of the tasks whose unique key is free, each key set to its task's id
        (no ttl) in the same transaction; answers each task's id, or its key's holder's.

        The keys are read in the transaction that inserts, and read again after each wait
        for room (the runner.brokers.base contract).
        """

        def plan(conn: sqlite3.Connection) -> tuple[int, Callable[[sqlite3.Connection], list[str]]]:
            answers, fresh = _unique_split(tasks, conn, self._clock())
            insert = self._inserter(fresh, "put_unique")
            holds = [(UNIQUE_PREFIX + t.unique_key, t.id, None) for t in fresh if t.unique_key]

            def put(conn: sqlite3.Connection) -> list[str]:
                insert(conn)
                conn.executemany(SET_VALUE_SQL, holds)
                return answers

            return len(fresh), put

        return self._insert_when_room(plan, timeout, "put_unique")

    def scan_values(self, prefix: str) -> dict[str, str]:
        now = self._clock()
        with self._read("scan_values") as conn:
            if self._lacks_table(conn, "values"):
                return {}
            return scan_values(conn, prefix, now)

    def delete_values(self, keys: Sequence[str]) -> int:
        """Delete ``keys``; how many of them were set (and not past their ttl)."""
        if not keys:
            self._open_connection("delete_values")  # still raise BrokerClosed after close
            return 0
        with self._write("delete_values") as conn:
            return delete_values(conn, keys, self._clock())

    def set_values(self, sets: Sequence[SetValue]) -> None:
        """Set each key to its value, one with a ttl expiring that long after now, all in one
        transaction (a key set again is replaced, ttl and all)."""
        if not sets:
            self._open_connection("set_values")  # still raise BrokerClosed after close
            return
        with self._write("set_values") as conn:
            write_values(conn, sets, self._clock())

    def _lacks_table(self, conn: sqlite3.Connection, name: str) -> bool:
        """Whether a read-only open found a file from before ``name`` was added (then empty)."""
        if not self._read_only:
            return False  # every writable open creates the tables missing
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return conn.execute(query, (name,)).fetchone() is None


def _unique_split(
    tasks: Sequence[Task], conn: sqlite3.Connection, now: float
) -> tuple[list[str], list[Task]]:
    """Each task's answer (its own id, or the id its unique key holds: in the file at ``now``
    or taken by an earlier task of ``tasks``) and the tasks to put."""
    keys = sorted({UNIQUE_PREFIX + t.unique_key for t in tasks if t.unique_key})
    holders = read_values(conn, keys, now) if keys else {}
    answers: list[str] = []
    fresh: list[Task] = []
    for task in tasks:
        key = UNIQUE_PREFIX + task.unique_key
        holder = holders.get(key) if task.unique_key else None
        if holder is not None:
            answers.append(holder)
            continue
        if task.unique_key:
            holders[key] = task.id  # a later task with this key answers this one
        answers.append(task.id)
        fresh.append(task)
    return answers, fresh
