"""SqliteBroker: a durable broker in one SQLite file, shared by the processes of one machine.

Guarantees (the contract in runner.brokers.base, plus durability):

- At-least-once. Every committed put, claim, ack, retry and dead-letter survives the crash of
  any process (WAL, ``synchronous=NORMAL``); a power cut may lose the last few commits.
- Each claim is one ``BEGIN IMMEDIATE`` transaction that leases its rows for
  ``visibility_timeout`` seconds under a fresh receipt, so two processes never hold the same
  delivery at once. A worker that dies leaves its lease to expire; the task is then handed out
  again with ``redelivered=True`` and one more attempt.
- ``ack``, ``retry``, ``dead``, ``release`` and ``extend`` match on (id, receipt), so a stale
  worker changes nothing. ``dead`` writes the DLQ row and deletes the task in one transaction.
  A settle that takes effect also writes its receipt to the ``settled`` table in that
  transaction; an op whose receipt no longer matches answers ALREADY_DONE when the table has it
  from less than a ``visibility_timeout`` ago, FENCED otherwise. Receipts begin with their
  claim time, so the rows that can be that old are the first ones in the table: at most once
  per ``PRUNE_EVERY_S``, a settle's transaction deletes the old ones among them.
- Group commit (sqlite_batch): claims, acks, retries, dead-letters and releases from this
  process's threads queue up and share the next transaction; each call returns its own fenced
  answer only after that COMMIT, so nothing is reported before it is durable.
- Promotion of due delayed tasks and expired leases is skipped while nothing can be due: the
  earliest due time is cached, lowered by this process's writes, and any other process's
  commit (``PRAGMA data_version``) forces a promotion at the next claim.
- Capacity is counted in the same transaction as the insert, so it holds across processes.
- Gates: a pause is a row of the ``gates`` table, a rate limit with its token bucket one of
  ``buckets``, a circuit breaker with its circuit one of ``circuits`` (gates.py). Every claim
  reads all three in its own transaction (one query, cheap while they are empty), skips the
  paused types, whose tasks stay READY with no attempt used and no lease, hands out at most as
  many of a rate-limited type as its bucket (refilled to now) has whole tokens, none of a type
  whose circuit is open and no more than the probes left of a half-open one, and writes back
  the bucket less those handed out and the circuit if it changed (runner.brokers.flow), in the
  same transaction, so the processes sharing the file share each bucket and circuit. The idle
  read before a claim does the same reading, so a get waiting on a held type polls with reads,
  never the write lock. It sees a gate cleared by this process at once, one cleared by another
  process at its next poll, and a pause's ``until``, a bucket's next token or the time a
  circuit may probe when it comes (the wait ends then).
- Effects: those of a settle op run in the same transaction, right after the settles of its
  batch (in op order), for the ops that answered DONE: an outcome is counted in the circuit of
  the task's type (when it has a breaker); then, unless the ``unless`` key is a live value,
  the hand-offs: puts are inserted as by ``put_many`` but never wait for or fail on capacity
  (a task id already queued is left out, uncounted: it is already there), the arrivals' parts
  are kept in ``joins`` and the task of a join whose parts are all there is put the same way
  (joins.py), and the dead letters are written; then sets (an upsert into ``values``, expiring
  at now + ttl), then deletes. Values whose ttl ran out read as absent; they and ended pauses
  are deleted by the prune of settled receipts.
- ``put_if`` reads its key, checks room and inserts in one ``BEGIN IMMEDIATE`` transaction, so
  of the processes comparing against one value exactly one wins; it checks room once and never
  waits. ``put_unique`` reads the keys of its tasks, checks room, inserts the tasks whose keys
  are free and sets those keys in one such transaction too, so of the processes putting one
  key exactly one puts its task; it waits for room as ``put_many`` does (the same loop,
  ``_insert_when_room``), reading the keys again in each try.
- WAL checkpoints run in a background thread (sqlite_checkpoint), not in the committing one.

Limits: one machine (SQLite file locking is not reliable on network filesystems); writes are
serialised by SQLite, so throughput is bounded by one writer at a time. Other processes'
puts are seen by polling (1 ms backing off to 50 ms); this process's own puts, acks and
``wake()`` end a wait at once. A process frozen inside a write transaction (SIGSTOP) blocks all
writers; after ``BUSY_TIMEOUT_MS`` they raise BrokerUnavailable, which callers may retry.

Ordering: FIFO by put within a type. Released tasks, expired leases and due retries keep their
original place (the row's ``seq``), so they come before tasks put after them.

Size: about 870 lines: the task path of the broker contract on one connection and its group
commit, gates and effects included (they live in its claim and settle statements). Schema,
opening and row codecs are in schema.py, batching in batch.py, checkpoints in checkpoint.py;
the operator commands, the clock, the gate calls and the value calls (``read_values``,
``put_if``, ``put_unique``, ``scan_values``, ``delete_values``) in admin.py; the joins' parts
and the pipeline rows of ``tasks_of`` and ``cancel`` in joins.py.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal, TypeVar

from runner.brokers.base import (
    Answer,
    BaseBroker,
    Bucket,
    Delivery,
    Depth,
    Effects,
    RateLimit,
    Settle,
    SetValue,
    settle_apart,
)
from runner.brokers.flow import circuit_allows, circuit_handed, taken, whole
from runner.brokers.sqlite.admin import InsertPlan, SqliteAdmin
from runner.brokers.sqlite.batch import GroupCommit, Pending
from runner.brokers.sqlite.checkpoint import Checkpointer
from runner.brokers.sqlite.gates import (
    CircuitAt,
    gates_at,
    record_outcome,
    save_bucket,
    save_circuit,
)
from runner.brokers.sqlite.joins import WRITE_DEAD_SQL, Joined, arriver, dead_row
from runner.brokers.sqlite.schema import (
    IDS_PER_QUERY,
    LEASED,
    READY,
    WAITING,
    anything_claimable,
    connect,
    held,
    insert_row,
    insert_tasks,
    next_due,
    read_values,
    rollback,
    sweep,
    to_delivery,
    unavailable,
    write_values,
)
from runner.codec import encode_dead_letter, encode_task
from runner.errors import BrokerClosed, BrokerUnavailable, QueueFull
from runner.model import AttemptRecord, DeadLetter, Task

#: The answers, read once: an Enum member lookup costs about 0.1 us on Python 3.11, per settle.
_DONE, _ALREADY_DONE, _FENCED = Answer.DONE, Answer.ALREADY_DONE, Answer.FENCED

_T = TypeVar("_T")

_MIN_POLL_S = 0.001
_MAX_POLL_S = 0.05
#: Settled receipts a visibility timeout old are deleted at most this often (per process).
PRUNE_EVERY_S = 1.0

#: The most types one claim statement asks for (SQLite refuses a compound SELECT of more than
#: 500); a claim over more asks in turns, each with what the turns before left of its limit.
_CLAIM_TYPES_PER_STATEMENT = 100
#: What a claim takes of one type: its oldest ready tasks, up to a bound.
_CLAIM_ONE_TYPE = f"SELECT seq FROM tasks WHERE type = ? AND state = {READY} ORDER BY seq LIMIT ?"
_PROMOTE_SQL = f"""
UPDATE tasks SET state = {READY}, redelivered = (redelivered OR state = {LEASED})
 WHERE state IN ({WAITING}, {LEASED}) AND due_at <= ?
"""
_ACK_SQL = "DELETE FROM tasks WHERE id = ? AND lease = ?"
#: Many acks at once. A lease names one claim of one row, so matching any of the ids and any of
#: the leases matches exactly the (id, lease) pairs asked for.
_ACK_MANY_SQL = "DELETE FROM tasks WHERE id IN ({0}) AND lease IN ({0}) RETURNING lease"
_RETRY_SQL = (
    "UPDATE tasks SET state = ?, due_at = ?, lease = NULL, redelivered = 0, envelope = ?"
    " WHERE id = ? AND lease = ?"
)
_DEAD_SQL = (
    "INSERT OR REPLACE INTO dead_letters (id, type, error_type, dead_at, record, raw_envelope)"
    " SELECT id, type, ?, ?, ?, CASE WHEN ? THEN envelope END FROM tasks WHERE id = ? AND lease = ?"
)
_RELEASE_SQL = (
    f"UPDATE tasks SET state = {READY}, due_at = 0, lease = NULL, attempt = max(attempt - 1, 0)"
    " WHERE id = ? AND lease = ?"
)
_EXTEND_SQL = f"UPDATE tasks SET state = {LEASED}, due_at = ? WHERE id = ? AND lease = ?"
#: One statement per batch: executemany costs about 2 us more per row.
_SETTLED_SQL = (
    "INSERT OR IGNORE INTO settled (receipt, settled_at) SELECT column1, ? FROM (VALUES {0})"
)
_WAS_SETTLED_SQL = "SELECT 1 FROM settled WHERE receipt = ? AND settled_at > ?"
#: Only rows claimed before the cutoff can have been settled before it: a range of the key.
_PRUNE_SQL = "DELETE FROM settled WHERE receipt < ? AND settled_at <= ?"
_DELETE_VALUE_SQL = 'DELETE FROM "values" WHERE key = ?'


def _at(operation: str) -> dict[str, str]:
    """Where a BrokerError of this broker was raised (its ``backend`` and ``operation``)."""
    return {"backend": "sqlite", "operation": operation}


@functools.cache
def _claim_sql(types: int) -> str:
    """A claim's statement over ``types`` types (at most _CLAIM_TYPES_PER_STATEMENT). Its
    parameters: the token, the leases' end, then each type with its bound, then (of more than
    one type) what is left of the claim's limit. The compound's LIMIT takes the types in
    turn: the second gets what the first left of the limit, and so on, as a statement per type
    did (at the cost of a statement each: a pipeline's claims span its stages). One type's
    bound is within the limit already."""
    # A compound's parts are subqueries: only its last SELECT may have ORDER BY and LIMIT.
    each = f"SELECT seq FROM ({_CLAIM_ONE_TYPE})"
    taken = _CLAIM_ONE_TYPE if types == 1 else f"{' UNION ALL '.join([each] * types)} LIMIT ?"
    return f"""
UPDATE tasks
   SET state = {LEASED}, lease = ? || '-' || seq, due_at = ?, attempt = attempt + 1
 WHERE seq IN ({taken})
RETURNING seq, id, type, attempt, redelivered, lease, envelope
"""


def _claim_mark(at: float) -> str:
    """How every receipt claimed at ``at`` begins: fixed-width ms, so receipts sort by claim
    time. The leading ``z`` sorts after the hex digits that began receipts before there was a
    ``settled`` table, so those fall in the pruned range too."""
    return f"z{max(int(at * 1000), 0):012x}"


class SqliteBroker(SqliteAdmin, BaseBroker):
    """A Broker and BrokerAdmin over the SQLite file at ``path`` (created with its parents).

    Raises BrokerUnavailable, naming the file, when the file cannot be opened, written
    (read-only, disk full) or is not a database. Every method raises BrokerClosed after close().
    """

    # Capability flags (runner.brokers.base): one file that outlives the process, shared by the
    # processes of this machine; every call is a transaction, so settles ride with the next
    # claim (carried apart, in a second transaction, the pipeline row measured 12% slower).
    durable = True
    shared = True
    batch_settles = True
    carry_settles = True
    gates_in_get = True
    settle_effects = True

    def __init__(
        self,
        path: str,
        capacity: int,
        enqueue_timeout: float,
        overflow: Literal["block", "reject"],
        visibility_timeout: float,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,  # operator reads only (stats, dlq list): the file is not written
        file_mode: int = 0o600,  # of the file when this call creates it
    ) -> None:
        self.path = path
        self._capacity = capacity
        self._enqueue_timeout = enqueue_timeout
        self._overflow = overflow
        self._visibility_timeout = visibility_timeout
        self._clock = clock
        self._conn = connect(path, read_only=read_only, file_mode=file_mode)
        self._read_only = read_only  # then an older file may lack the gates and values tables
        self._checkpoints = Checkpointer(path)  # WAL checkpoints off the commit path
        self._lock = threading.RLock()  # guards the one connection
        self._commits = GroupCommit()  # fenced writes waiting for the next transaction
        self._cond = threading.Condition()  # local changes, wake() and close()
        self._changes = 0
        self._woken = False
        self._closed = False
        self._rotation = itertools.count()
        self._token_prefix = os.urandom(8).hex()  # this broker's; a counter numbers its claims
        self._claims = itertools.count()
        self._busy = False  # the last claim handed something out: skip the read before the next
        self._settled = False  # a settle in the open transaction took: wake waiters after COMMIT
        # Promotion of due rows is skipped before this time unless another process wrote since
        # the last promotion (its data_version); -inf: promote at the next claim.
        self._promote_at = -math.inf
        self._seen_version: int | None = None
        self._prune_at = -math.inf  # when settled receipts are next pruned

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _write(self, operation: str) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed on success, rolled back on any error.

        Before its COMMIT it also runs every fenced write queued in the group commit, and
        hands each its answer once committed (or the error, if the transaction failed).
        """
        with self._lock:
            conn = self._open_connection(operation)
            taken: list[Pending] = []
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                taken = self._commits.take()
                results = [pending.statement(conn) for pending in taken]
                conn.execute("COMMIT")
                self._checkpoints.committed()
            except sqlite3.Error as exc:
                self._rolled_back(conn)
                error = unavailable(self.path, exc, operation)
                self._commits.finish(taken, error=error)
                raise error from exc
            except BaseException as exc:
                self._rolled_back(conn)
                self._commits.finish(taken, error=exc)
                raise
            settled, self._settled = self._settled, False
        self._commits.finish(taken, results)
        if settled:  # an ack, retry, dead or release took: room, or a task ready again
            self._changed()

    def _rolled_back(self, conn: sqlite3.Connection) -> None:
        rollback(conn)
        self._promote_at = -math.inf  # what the rolled-back work noted may not hold
        self._settled = False

    def _settle(self, ops: Sequence[Settle]) -> list[Answer]:
        """Run fenced writes in the next write transaction; their answers once committed."""
        if self._closed:
            raise BrokerClosed(f"sqlite broker {self.path} is closed", **_at("settle"))
        if not ops:
            return []
        answers: list[Answer] = self._commits.run(
            self._settle_statement(ops), self._flush, "settle"
        )
        return answers

    def _settle_statement(
        self, ops: Sequence[Settle]
    ) -> Callable[[sqlite3.Connection], list[Answer]]:
        """The fenced writes of ``ops`` as one statement for the group commit.

        Answers as if run one by one, in order: only the first op on a delivery can take effect
        (any write moves its lease on), so a later one answers unrun (ALREADY_DONE, or FENCED
        when the first was); the others touch different rows, so the acks among them run as one
        DELETE. The effects of the ops that answer DONE then run, in op order.
        """
        first: dict[str, int] = {}  # receipt (unique to one claim of one row) -> its first op
        repeats: list[tuple[int, int]] = []  # (op, the first op on the same receipt)
        acks: list[int] = []
        others: list[tuple[int, Callable[[sqlite3.Connection], bool]]] = []
        effects: list[tuple[int, Effects, str]] = []  # (op, its effects, its task's type)
        for i, op in enumerate(ops):
            receipt = op.delivery.receipt
            earlier = first.get(receipt)
            if earlier is not None:
                repeats.append((i, earlier))  # never DONE, so its effects never apply
                continue
            first[receipt] = i
            if op.kind == "ack":
                acks.append(i)
            else:
                others.append((i, self._statement(op)))
            if op.effects is not None:
                effects.append((i, op.effects, op.delivery.task.type))
        # Prepared here, outside the transaction: a part of a join that is not JSON fails its
        # own caller, not the transaction other callers' writes share.
        apply_effects = (
            self._effects_statement([(e, t) for _, e, t in effects]) if effects else None
        )

        def statement(conn: sqlite3.Connection) -> list[Answer]:
            answers = [_FENCED] * len(ops)
            now = self._clock()
            done: list[str] = []  # receipts for ``settled``
            if acks:
                ids = [ops[i].delivery.task.id for i in acks]
                leases = [ops[i].delivery.receipt for i in acks]
                sql = _ACK_MANY_SQL.format(", ".join("?" * len(acks)))
                gone = {row[0] for row in conn.execute(sql, (*ids, *leases))}
                for i, lease in zip(acks, leases, strict=True):
                    if lease in gone:
                        answers[i] = _DONE
                        done.append(lease)
            for i, run in others:
                if run(conn):
                    answers[i] = _DONE
                    done.append(ops[i].delivery.receipt)
            if len(done) < len(first):  # some found their lease gone: settled, or fenced?
                for receipt, i in first.items():
                    if answers[i] is _FENCED and self._was_settled(conn, receipt, now):
                        answers[i] = _ALREADY_DONE
            if done:
                self._remember(conn, done, now)
                if apply_effects is not None:
                    apply_effects(conn, now, [answers[i] is _DONE for i, _, _ in effects])
            for i, earlier in repeats:
                answers[i] = _ALREADY_DONE if answers[earlier] else _FENCED
            return answers

        return statement

    def _remember(self, conn: sqlite3.Connection, done: list[str], now: float) -> None:
        """Write the receipts ``done`` to ``settled`` as settled at ``now``; prune when due."""
        self._settled = True  # wake waiters after COMMIT
        for i in range(0, len(done), IDS_PER_QUERY):
            chunk = done[i : i + IDS_PER_QUERY]
            conn.execute(_SETTLED_SQL.format(", ".join(["(?)"] * len(chunk))), (now, *chunk))
        if now >= self._prune_at:
            cutoff = now - self._visibility_timeout
            conn.execute(_PRUNE_SQL, (_claim_mark(cutoff), cutoff))
            sweep(conn, now)  # values and pauses that ran out
            self._prune_at = now + PRUNE_EVERY_S

    def _was_settled(self, conn: sqlite3.Connection, receipt: str, now: float) -> bool:
        """Whether a settle under ``receipt`` took effect less than a visibility timeout ago."""
        since = now - self._visibility_timeout
        return conn.execute(_WAS_SETTLED_SQL, (receipt, since)).fetchone() is not None

    def _flush(self) -> None:
        with self._lock:
            if not self._commits.waiting():
                return  # another transaction (a claim or put) already ran them
            # The lock is reentrant: held across the check and the write. A failure reaches
            # each waiter naming its own operation (batch.Pending), not this "commit".
            with self._write("commit"):
                pass

    @contextmanager
    def _read(self, operation: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._open_connection(operation)
            try:
                yield conn
            except sqlite3.Error as exc:
                raise unavailable(self.path, exc, operation) from exc

    def _open_connection(self, operation: str) -> sqlite3.Connection:
        if self._closed:
            raise BrokerClosed(f"sqlite broker {self.path} is closed", **_at(operation))
        return self._conn

    def _changed(self) -> None:
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    def _pause(self, seen: int, seconds: float) -> None:
        """Sleep up to ``seconds`` unless this process changed something since ``seen``."""
        with self._cond:
            if self._changes == seen and not self._woken and not self._closed:
                self._cond.wait(seconds)

    # -- producer side ----------------------------------------------------------------------

    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None:
        """Enqueue all of ``tasks`` or none; blocks for room up to ``timeout``, then QueueFull."""
        if not tasks:
            self._open_connection("put")  # still raise BrokerClosed after close
            return
        needed, insert = len(tasks), self._inserter(tasks, "put")
        self._insert_when_room(lambda conn: (needed, insert), timeout, "put")

    def _inserter(
        self, tasks: Sequence[Task], operation: str, skip_queued: bool = False
    ) -> Callable[[sqlite3.Connection], int]:
        """The write that inserts ``tasks`` for the broker method ``operation``: stamped
        ``enqueued_at`` now, delayed when their not_before is later (``skip_queued``: as in
        insert_tasks). It checks no capacity."""
        now = self._clock()
        rows = [insert_row(task, now) for task in tasks]
        return lambda conn: self._insert_rows(conn, rows, operation, skip_queued)

    def _insert_rows(
        self,
        conn: sqlite3.Connection,
        rows: Sequence[tuple[Any, ...]],
        operation: str,
        skip_queued: bool = False,
    ) -> int:
        """``insert_tasks``, noting when the earliest delayed one of ``rows`` falls due."""
        # insert_row's (id, type, state, due_at, ...): only delayed rows fall due later
        self._due_by(min((row[3] for row in rows if row[2] == WAITING), default=math.inf))
        return insert_tasks(conn, rows, operation, skip_queued)

    def _insert_when_room(self, plan: InsertPlan[_T], timeout: float | None, operation: str) -> _T:
        """Run the insert ``plan`` gives in a transaction that has room for its tasks (for the
        broker method ``operation``: put, put_unique or replay), and answer what it answers.

        ``plan`` reads, in each try's transaction, how many tasks it would insert; while they
        do not fit, nothing is written and it is asked again after each wait, since what it
        reads may have changed. Blocks for room up to ``timeout`` (None: enqueue_timeout), then
        raises QueueFull; raises it at once with overflow reject, or when the tasks are more
        than the whole capacity.
        """
        if self._closed:
            raise BrokerClosed(f"sqlite broker {self.path} is closed", **_at(operation))
        wait_s = self._enqueue_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait_s
        pause = _MIN_POLL_S
        while True:
            seen = self._changes
            with self._write(operation) as conn:
                needed, insert = plan(conn)
                if needed > self._capacity:
                    raise QueueFull(
                        f"{needed} tasks cannot fit a queue of capacity {self._capacity}",
                        **_at(operation),
                    )
                # Nothing to put (every key held: put_unique answers the holders) needs no
                # room, even in a queue that retries and hand-offs took over its capacity.
                count = held(conn) if needed else 0
                if count + needed <= self._capacity:
                    answer = insert(conn)
                    break  # leaving the block commits
            remaining = deadline - time.monotonic()
            if self._overflow == "reject" or remaining <= 0:
                raise self._queue_full(count, needed, operation)
            self._pause(seen, min(pause, remaining))
            pause = min(pause * 2, _MAX_POLL_S)
            if self._closed:
                raise BrokerClosed(
                    f"sqlite broker {self.path} was closed while putting", **_at(operation)
                )
        if needed:
            self._changed()
        return answer

    def _queue_full(self, count: int, needed: int, operation: str) -> QueueFull:
        return QueueFull(
            f"sqlite broker {self.path}: queue full ({count} of {self._capacity} held, "
            f"{needed} more asked for)",
            **_at(operation),
        )

    # -- consumer side ----------------------------------------------------------------------

    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]:
        """Claim up to ``slots[type]`` due tasks per type (``limit`` in all), oldest first.

        Waits up to ``timeout`` for the first; returns [] on timeout, wake() or close().
        """
        if self._closed:
            raise BrokerClosed(f"sqlite broker {self.path} is closed", **_at("get"))
        deadline = time.monotonic() + max(timeout, 0.0)
        pause = _MIN_POLL_S
        while True:
            seen = self._changes
            try:
                deliveries, next_due = self._claim(slots, limit)
            except BrokerClosed:
                return []  # closed while we waited
            if deliveries:
                return deliveries
            with self._cond:
                if self._woken or self._closed:
                    self._woken = False
                    return []
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            wait = min(pause, remaining)
            if next_due is not None:
                wait = min(wait, max(next_due - self._clock(), _MIN_POLL_S))
            self._pause(seen, wait)
            pause = min(pause * 2, _MAX_POLL_S)

    def _claim(self, slots: Mapping[str, int], limit: int) -> tuple[list[Delivery], float | None]:
        """One claim transaction; returns the deliveries, or none and the next due time."""
        wanted = self._wanted(slots, limit)
        if not wanted:
            return [], None
        if not self._busy:
            # Idle: a read first, so idle pollers in other processes do not take the write lock.
            with self._read("get") as conn:
                now = self._clock()
                held = gates_at(conn, now).held()  # their ready tasks are not claimable
                free = [kind for kind, _ in wanted if kind not in held]
                if not anything_claimable(conn, free, now):
                    # Until a delayed task or an expired lease falls due, a pause ends or a
                    # held type's next token comes.
                    ends = [held.get(kind) for kind, _ in wanted]
                    due = [at for at in (next_due(conn), *ends) if at is not None]
                    return [], min(due, default=None)
        # Queued like an ack, so that a claim and the acks waiting beside it share one commit.
        rows: list[Any] = self._commits.run(
            self._claim_statement(wanted, limit), self._flush, "get"
        )
        self._busy = bool(rows)
        return [to_delivery(row) for row in rows], None

    def exchange(
        self, ops: Sequence[Settle], slots: Mapping[str, int], limit: int
    ) -> tuple[list[Answer], list[Delivery]]:
        """``settle_many(ops)`` and a claim (as ``get`` with timeout 0), in one transaction."""
        if self._closed:
            raise BrokerClosed(f"sqlite broker {self.path} is closed", **_at("exchange"))
        settle = self._settle_statement(ops)
        wanted = self._wanted(slots, limit)
        claim = self._claim_statement(wanted, limit) if wanted else None

        def statement(conn: sqlite3.Connection) -> tuple[list[Answer], list[Any]]:
            return settle(conn), claim(conn) if claim is not None else []

        answers, rows = self._commits.run(statement, self._flush, "exchange")
        self._busy = bool(rows)
        return answers, [to_delivery(row) for row in rows]

    def _wanted(self, slots: Mapping[str, int], limit: int) -> list[tuple[str, int]]:
        """The types to claim from, with their slots; the first one rotates."""
        wanted = [(kind, n) for kind, n in slots.items() if n > 0]
        if limit <= 0 or not wanted:
            return []
        # Rotate the starting type so that a small ``limit`` does not always favour the first.
        start = next(self._rotation) % len(wanted)
        return wanted[start:] + wanted[:start]

    def _claim_statement(
        self, wanted: list[tuple[str, int]], limit: int
    ) -> Callable[[sqlite3.Connection], list[Any]]:
        unique = f"{self._token_prefix}{next(self._claims):x}"  # per claim, with no syscall

        def statement(conn: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            now = self._clock()  # inside the transaction, which may have waited for the lock
            token = _claim_mark(now) + unique
            self._promote_due(conn, now)
            until = now + self._visibility_timeout
            self._due_by(until)
            gates = gates_at(conn, now)  # read in the claim's own transaction
            held = gates.held()
            # Each type asked, its bound, and its rate limit and bucket and its breaker if any.
            asked: list[tuple[str, int, tuple[RateLimit, Bucket] | None, CircuitAt | None]] = []
            for kind, n in wanted:
                if kind in held:
                    continue  # left ready: no attempt used, no lease
                # A type held back is skipped above, so each bound here is at least one.
                take = min(n, limit)
                rated = gates.limited.get(kind)
                if rated is not None:
                    take = min(take, whole(rated[1]))
                broken = gates.broken.get(kind)
                if broken is not None:
                    allowed = circuit_allows(broken.breaker, broken.circuit)
                    take = take if allowed is None else min(take, allowed)
                asked.append((kind, take, rated, broken))
            by_type: dict[str, list[Any]] = {}
            claimed = 0
            for start in range(0, len(asked), _CLAIM_TYPES_PER_STATEMENT):
                turn, left = asked[start : start + _CLAIM_TYPES_PER_STATEMENT], limit - claimed
                if left <= 0:
                    break
                bounds = [x for kind, take, _, _ in turn for x in (kind, min(take, left))]
                more = [left] if len(turn) > 1 else []
                sql = _claim_sql(len(turn))
                for row in conn.execute(sql, [token, until, *bounds, *more]):
                    by_type.setdefault(row[2], []).append(row)
                    claimed += 1
            for kind, _, rated, broken in asked:
                if len(rows) >= limit:
                    break  # the limit was reached before this type: it took nothing
                got = by_type.get(kind, [])
                rows.extend(sorted(got))  # RETURNING order is unspecified; seq is FIFO
                if rated is not None and got:
                    save_bucket(conn, kind, taken(rated[1], len(got)))
                if broken is not None:
                    # Probes handed out, or a change as of now (say open to half-open).
                    circuit = circuit_handed(broken.circuit, len(got))
                    if circuit != broken.stored:
                        save_circuit(conn, kind, circuit)
            return rows

        return statement

    def _promote_due(self, conn: sqlite3.Connection, now: float) -> None:
        """Make due delayed tasks and expired leases claimable, unless none can be due yet.

        Skipped while ``now`` is before the earliest due time known (taken from the whole
        table at the last promotion, lowered by this process's own writes since) and no other
        process has committed since (``PRAGMA data_version``): then nothing can be due.
        """
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._seen_version and now < self._promote_at:
            return
        conn.execute(_PROMOTE_SQL, (now,))
        upcoming = next_due(conn)
        self._promote_at = math.inf if upcoming is None else upcoming
        self._seen_version = version

    def _due_by(self, when: float) -> None:
        """Note a row this process wrote that falls due at ``when`` (connection lock held)."""
        self._promote_at = min(self._promote_at, when)

    def ack(self, delivery: Delivery) -> Answer:
        return self._settle([Settle(delivery, "ack")])[0]

    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer:
        return self._settle([Settle(delivery, "retry", delay_s, failure)])[0]

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer:
        return self._settle([Settle(delivery, "dead", record=record)])[0]

    def release(self, delivery: Delivery) -> Answer:
        return self._settle([Settle(delivery, "release")])[0]

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        """All of ``ops`` in one transaction (with whatever else is queued for it). When the
        disk is full (SQLITE_FULL), each op is tried in a transaction of its own: an ack, which
        frees room, is not held back by a dead letter that needs more than is left
        (SettleIncomplete carries the answers of those that took)."""
        try:
            return self._settle(ops)
        except BrokerUnavailable as exc:
            if len(ops) < 2 or not _disk_full(exc):
                raise
        return settle_apart(lambda op: self._settle([op])[0], ops, "sqlite")

    def _statement(self, op: Settle) -> Callable[[sqlite3.Connection], bool]:
        """The fenced write for a release, retry or dead ``op`` (acks run together, in
        ``_settle_statement``); True when the delivery's lease was still current."""
        delivery = op.delivery
        key = (delivery.task.id, delivery.receipt)
        if op.kind == "release":
            return lambda conn: conn.execute(_RELEASE_SQL, key).rowcount == 1
        if op.kind == "retry":
            assert op.failure is not None
            due = self._clock() + max(op.delay_s, 0.0)
            task = replace(delivery.task.with_failure(op.failure), not_before=due)
            state, due_at = (WAITING, due) if op.delay_s > 0 else (READY, 0.0)
            params = (state, due_at, encode_task(task), *key)

            def retry(conn: sqlite3.Connection) -> bool:
                self._due_by(due)
                return bool(conn.execute(_RETRY_SQL, params).rowcount == 1)

            return retry
        record = op.record
        assert record is not None
        keep_raw = delivery.decode_error is not None
        encoded = encode_dead_letter(record)
        dead_params = (record.error_type, record.dead_at, encoded, keep_raw, *key)

        def dead(conn: sqlite3.Connection) -> bool:
            if conn.execute(_DEAD_SQL, dead_params).rowcount != 1:
                return False
            conn.execute(_ACK_SQL, key)
            return True

        return dead

    def _effects_statement(
        self, ops: Sequence[tuple[Effects, str]]
    ) -> Callable[[sqlite3.Connection, float, Sequence[bool]], None]:
        """The effects of settles (each of a task of the type named with it), as one write to
        run at ``now`` for those whose settle answered DONE (``took``), with the statements of
        all of them batched: the
        outcomes for the types' circuits (of those with a breaker); then, for each op whose
        ``unless`` key is not a live value, the puts (a task id already queued is left out;
        capacity is not checked), the arrivals (with the puts of the joins they complete) and
        the dead letters; then the sets, then the deletes (op by op when a key is both set and
        deleted among them, so that the last op's word on it stands).

        The rows of the puts and the sets are made here, before the transaction: the write
        lock every thread of the process waits for is not held while tasks are encoded. (A put
        task not yet due is written as waiting and promoted when due, as any delayed task.)
        """
        made = self._clock()
        # One pass over the ops, each list made only when the op has some (a pipeline task's
        # ack has a child or two and a trace line; most have no arrivals or dead letters).
        puts: list[list[tuple[Any, ...]]] = []
        arrivals: list[Callable[[sqlite3.Connection, float], Joined] | None] = []
        dead: list[list[tuple[Any, ...]]] = []
        guards: list[str] = []
        set_keys: set[str] = set()
        for effects, _ in ops:
            puts.append([insert_row(task, made) for task in effects.puts] if effects.puts else [])
            arrivals.append(arriver(effects.arrivals) if effects.arrivals else None)
            records = effects.dead_letters
            dead.append([dead_row(record) for record in records] if records else [])
            if effects.unless is not None and _hands_off(effects):
                guards.append(effects.unless)
            for item in effects.sets:
                set_keys.add(item.key)
        apart = any(key in set_keys for effects, _ in ops for key in effects.deletes)

        def apply(conn: sqlite3.Connection, now: float, took: Sequence[bool]) -> None:
            ops_took = [op for op, done in zip(ops, took, strict=True) if done]
            for effects, type_name in ops_took:
                if effects.circuit is not None:
                    # A settle that took wakes this process's waiting gets after COMMIT
                    # (_remember): a circuit that closed lets them take the type.
                    record_outcome(conn, type_name, effects.circuit, now)
            live = read_values(conn, guards, now) if guards else {}
            rows: list[tuple[Any, ...]] = []
            dead_rows: list[tuple[Any, ...]] = []
            for (effects, _), put, arrive, records, done in zip(
                ops, puts, arrivals, dead, took, strict=True
            ):
                if not done or (effects.unless is not None and effects.unless in live):
                    continue
                rows += put
                if arrive is not None:
                    rows.extend(arrive(conn, now))
                dead_rows.extend(records)
            if rows:
                self._insert_rows(conn, rows, "settle", skip_queued=True)
            if dead_rows:
                conn.executemany(WRITE_DEAD_SQL, dead_rows)
            batches = [(e.sets, e.deletes) for e, _ in ops_took] if apart else [_flat(ops_took)]
            for sets, deletes in batches:
                if sets:
                    write_values(conn, sets, now)
                if deletes:
                    conn.executemany(_DELETE_VALUE_SQL, [(key,) for key in deletes])

        return apply

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]:
        if not deliveries:
            self._open_connection("extend")  # still raise BrokerClosed after close
            return []
        now = self._clock()
        until = now + self._visibility_timeout
        answers: list[Answer] = []
        with self._write("extend") as conn:
            self._due_by(until)  # a lease that expired but was not yet claimed is leased again
            for d in deliveries:
                if conn.execute(_EXTEND_SQL, (until, d.task.id, d.receipt)).rowcount == 1:
                    answers.append(_DONE)
                elif self._was_settled(conn, d.receipt, now):
                    answers.append(_ALREADY_DONE)  # a renewal racing the settle
                else:
                    answers.append(_FENCED)
        return answers

    def wake(self) -> None:
        """End the blocked get() with [].

        If no get() is waiting, the next one returns [] as soon as it finds nothing to claim: a
        wake that races with a dispatcher about to call get() must not be lost.
        """
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def depth(self) -> dict[str, Depth]:
        now = self._clock()
        with self._read("depth") as conn:
            rows = conn.execute(
                f"SELECT type, total(state = {READY} OR due_at <= :now),"
                f" total(state = {WAITING} AND due_at > :now),"
                f" total(state = {LEASED} AND due_at > :now)"
                " FROM tasks GROUP BY type ORDER BY type",
                {"now": now},
            ).fetchall()
        return {kind: Depth(int(r), int(d), int(le)) for kind, r, d, le in rows}

    def close(self) -> None:
        """Close the file; idempotent. Blocked get() calls return [], blocked puts raise."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._checkpoints.close()
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _hands_off(effects: Effects) -> bool:
    """Whether ``effects`` start anything (what ``unless`` can skip)."""
    return bool(effects.puts or effects.arrivals or effects.dead_letters)


def _flat(ops: Sequence[tuple[Effects, str]]) -> tuple[list[SetValue], list[str]]:
    """Every set and every delete of ``ops``, each in op order."""
    sets = [item for effects, _ in ops for item in effects.sets]
    return sets, [key for effects, _ in ops for key in effects.deletes]


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (a broker error raised from SQLite's, maybe through the group commit's
    own error for each of its callers) is SQLITE_FULL."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, sqlite3.Error):
        cause = cause.__cause__
    return cause is not None and str(getattr(cause, "sqlite_errorname", "")).startswith(
        "SQLITE_FULL"
    )
