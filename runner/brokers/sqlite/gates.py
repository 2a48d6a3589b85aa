"""The SQLite broker's gates as rows: pauses, rate limits with their buckets, circuit breakers
with their circuits, read by every claim in one query.

Three tables (created in schema.py) hold them:

- ``gates``: at most one row per (type, kind), today only pauses, ``until`` NULL for one that
  lasts until cleared.
- ``buckets``: a rate-limited type's ``RateLimit`` and its token bucket in one row, so clearing
  the limit drops the bucket with it and a new rate keeps the tokens (``tokens`` NULL: no task
  taken yet, a full bucket).
- ``circuits``: a type's ``CircuitBreaker`` and its circuit in one row, likewise: clearing the
  breaker forgets the circuit, setting it again keeps it (``state`` NULL: not used yet, a new
  closed circuit).

``gates_at`` reads all three as one UNION ALL (one row shape, padded with NULLs, tagged with
its table), so a claim pays one query for its gates however many kinds there are, about 1 us
while the tables are empty; it reports each bucket refilled to now and each circuit as of now
(runner.brokers.flow), and the claim writes back a bucket less the tasks it handed out and a
circuit that changed. A settle's outcome for a circuit is recorded by ``record_outcome``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

from runner.brokers.base import Bucket, Circuit, CircuitBreaker, RateLimit
from runner.brokers.flow import (
    circuit_allows,
    circuit_at,
    circuit_recorded,
    circuit_reopens_at,
    next_token_at,
    refilled,
    whole,
)

#: ``gates.kind`` of a Pause, the one kind of gate in that table.
PAUSE = "pause"

#: A circuits row's breaker and circuit columns, in ``CircuitBreaker`` and ``Circuit`` order.
_BREAKER_COLUMNS = ("failure_rate", "min_calls", "window_s", "open_for_s", "half_open_calls")
_CIRCUIT_COLUMNS = (
    "state",
    "since",
    "window_start",
    "calls",
    "failures",
    "prev_calls",
    "prev_failures",
    "probes",
)
#: Each gate table's columns in the one row shape of ``gates_at`` (after the table and type).
_COLUMNS = {
    "gates": ("until",),
    "buckets": ("rate", "burst", "tokens", "at", "limited_s"),
    "circuits": _BREAKER_COLUMNS + _CIRCUIT_COLUMNS,
}
_WIDTH = max(len(columns) for columns in _COLUMNS.values())
#: Only the pauses in force at ``:now``.
_WHERE = {"gates": f" WHERE kind = '{PAUSE}' AND (until IS NULL OR until > :now)"}
#: Each table's rows in the one shape: (table, type, its columns, NULLs up to ``_WIDTH``).
_GATE_ROWS = {
    table: f"SELECT '{table}', type, {', '.join(columns)}"
    + ", NULL" * (_WIDTH - len(columns))
    + f" FROM {table}{_WHERE.get(table, '')}"
    for table, columns in _COLUMNS.items()
}
_ALL_GATES_SQL = " UNION ALL ".join(_GATE_ROWS.values())
#: The tables that hold gates.
GATE_TABLES = tuple(_GATE_ROWS)

_CIRCUIT_OF_SQL = (
    f"SELECT {', '.join(_BREAKER_COLUMNS + _CIRCUIT_COLUMNS)} FROM circuits WHERE type = ?"
)
_SAVE_CIRCUIT_SQL = (
    f"UPDATE circuits SET {', '.join(f'{c} = ?' for c in _CIRCUIT_COLUMNS)} WHERE type = ?"
)


class CircuitAt(NamedTuple):
    """A circuit-broken type's breaker, its circuit as of a time, and the circuit as stored
    (None: not used yet): the claim writes the circuit back when it differs from that."""

    breaker: CircuitBreaker
    circuit: Circuit
    stored: Circuit | None


class Gates(NamedTuple):
    """The gates in force at a time ``now`` (``gates_at``)."""

    paused: dict[str, float | None]  # type -> when its pause ends (None: when cleared)
    limited: dict[str, tuple[RateLimit, Bucket]]  # type -> its limit and bucket, refilled to now
    broken: dict[str, CircuitAt]  # type -> its breaker and circuit, as of now

    def held(self) -> dict[str, float | None]:
        """The types of which no task can be handed out now (paused, no whole token, or an
        open circuit, or a half-open one with all its probes out), each with when that may
        change (None: when cleared)."""
        if not self.limited and not self.broken:
            return self.paused
        held = dict(self.paused)
        for kind, (limit, bucket) in self.limited.items():
            if kind not in held and whole(bucket) == 0:
                held[kind] = next_token_at(limit, bucket)
        for kind, (breaker, circuit, _) in self.broken.items():
            if kind not in held and circuit_allows(breaker, circuit) == 0:
                held[kind] = circuit_reopens_at(breaker, circuit)
        return held


def gates_at(conn: sqlite3.Connection, now: float, tables: Sequence[str] | None = None) -> Gates:
    """The gates in force at ``now``, in one query: a claim's only read of them; ``tables``:
    only those of ``GATE_TABLES`` (an older file opened read-only may lack some)."""
    if tables is None:
        sql = _ALL_GATES_SQL
    else:
        sql = " UNION ALL ".join(_GATE_ROWS[table] for table in tables)
    gates = Gates({}, {}, {})
    if not sql:
        return gates
    for table, kind, *columns in conn.execute(sql, {"now": now}):
        if table == "gates":
            gates.paused[kind] = columns[0]
        elif table == "buckets":
            rate, burst, tokens, at, limited_s = columns[:5]
            limit = RateLimit(rate=rate, burst=burst)
            stored = None if tokens is None else Bucket(tokens=tokens, at=at, limited_s=limited_s)
            gates.limited[kind] = (limit, refilled(limit, stored, now))
        else:
            breaker, circuit = _circuit_row(columns)
            gates.broken[kind] = CircuitAt(breaker, circuit_at(breaker, circuit, now), circuit)
    return gates


def save_bucket(conn: sqlite3.Connection, type_name: str, bucket: Bucket) -> None:
    """Write ``type_name``'s bucket (its row exists: its rate limit)."""
    conn.execute(
        "UPDATE buckets SET tokens = ?, at = ?, limited_s = ? WHERE type = ?",
        (bucket.tokens, bucket.at, bucket.limited_s, type_name),
    )


def save_circuit(conn: sqlite3.Connection, type_name: str, circuit: Circuit) -> None:
    """Write ``type_name``'s circuit (its row exists: its breaker)."""
    conn.execute(
        _SAVE_CIRCUIT_SQL,
        (
            circuit.state,
            circuit.since,
            circuit.window_start,
            circuit.calls,
            circuit.failures,
            circuit.prev_calls,
            circuit.prev_failures,
            circuit.probes,
            type_name,
        ),
    )


def record_outcome(conn: sqlite3.Connection, type_name: str, succeeded: bool, now: float) -> None:
    """Count one outcome of ``type_name`` at ``now`` in its circuit; nothing when the type has
    no breaker (its outcomes are not kept)."""
    row = conn.execute(_CIRCUIT_OF_SQL, (type_name,)).fetchone()
    if row is None:
        return
    breaker, stored = _circuit_row(row)
    circuit = circuit_recorded(breaker, circuit_at(breaker, stored, now), succeeded, now)
    if circuit != stored:
        save_circuit(conn, type_name, circuit)


def _circuit_row(columns: Sequence[Any]) -> tuple[CircuitBreaker, Circuit | None]:
    """A circuits row's breaker and stored circuit (None: not used yet), from its columns in
    ``_BREAKER_COLUMNS + _CIRCUIT_COLUMNS`` order."""
    breaker = CircuitBreaker(*columns[: len(_BREAKER_COLUMNS)])
    state = columns[len(_BREAKER_COLUMNS)]
    if state is None:
        return breaker, None
    return breaker, Circuit(*columns[len(_BREAKER_COLUMNS) : len(_COLUMNS["circuits"])])
