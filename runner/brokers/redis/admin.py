"""The BrokerAdmin half of RedisBroker: the operator commands (dead letters, replay, purge,
queue ages), and the broker's plain calls beside the task path: its clock, the gates (set,
cleared and listed here, with the rate limits' buckets and the circuit breakers' circuits;
evaluated inside POLL, circuits also moved by SETTLE) and the values settle effects,
``put_if``, ``put_unique`` and ``set_values`` set. Mixed into RedisBroker, whose client and
call plumbing it uses (declared below); the data model is in runner/brokers/redis/scripts.py.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from runner.brokers.base import (
    UNIQUE_PREFIX,
    Bucket,
    Circuit,
    CircuitBreaker,
    CircuitState,
    DeadLetterFilter,
    Gate,
    Pause,
    RateLimit,
    SetValue,
)
from runner.brokers.flow import circuit_at, refilled
from runner.brokers.redis.scripts import GROUP
from runner.codec import decode_dead_letter, encode_task
from runner.errors import QueueFull
from runner.model import DeadLetter, Task

log = logging.getLogger("runner.broker")

T = TypeVar("T")


class RedisAdmin:
    """BrokerAdmin on the Redis data model; RedisBroker provides what is declared here."""

    _client: Any
    _capacity: int

    def _key(self, *parts: str) -> str:
        raise NotImplementedError

    def _stream(self, type_: str) -> str:
        raise NotImplementedError

    def _delayed(self, type_: str) -> str:
        raise NotImplementedError

    def _call(self, fn: Callable[[], T], operation: str) -> T:
        raise NotImplementedError

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
        raise NotImplementedError

    def _put_call(self, tasks: Sequence[Task]) -> tuple[list[str], list[Any]]:
        raise NotImplementedError

    def _line_here(self) -> Any:
        raise NotImplementedError

    def _with_capacity(
        self, attempt: Callable[[], bool], timeout: float | None, message: str, operation: str
    ) -> None:
        raise NotImplementedError

    def _all_dead(self) -> list[tuple[str, bytes]]:
        ids = self._call(lambda: self._client.zrange(self._key("dlq:idx"), 0, -1), "dead_letters")
        if not ids:
            return []
        raws = self._call(lambda: self._client.hmget(self._key("dlq"), ids), "dead_letters")
        return [(i.decode(), raw) for i, raw in zip(ids, raws, strict=True) if raw is not None]

    def dead_letter_count(self) -> int:
        count = self._call(lambda: self._client.zcard(self._key("dlq:idx")), "dead_letter_count")
        return int(count)

    def oldest_enqueued_at(self) -> dict[str, float]:
        """Per type, the earliest ``enqueued_at`` of its queued tasks (streams hold only unacked
        entries, delayed sets only waiting ones). Reads every envelope: an operator command."""
        oldest: dict[str, float] = {}
        operation = "oldest_enqueued_at"
        for raw in self._call(lambda: self._client.smembers(self._key("types")), operation):
            name = raw.decode()
            for envelope in self._call(partial(self._queued_envelopes, name), operation):
                try:
                    at = float(json.loads(envelope)["enqueued_at"])
                except (ValueError, KeyError, TypeError):
                    continue  # undecodable: it reaches the DLQ at hand-out
                oldest[name] = min(at, oldest.get(name, at))
        return oldest

    def _queued_envelopes(self, type_: str) -> list[bytes]:
        entries = self._client.xrange(self._stream(type_), "-", "+")
        envelopes = [fields.get(b"t", b"") for _, fields in entries]
        members = self._client.zscan_iter(self._delayed(type_))
        return envelopes + [member.split(b" ", 2)[-1] for member, _ in members]

    def dead_letters(self, where: DeadLetterFilter) -> list[DeadLetter]:
        records = []
        for task_id, raw in self._all_dead():
            try:
                record = decode_dead_letter(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("broker.dlq_undecodable: %s: %s", task_id, exc)
                continue
            if where.matches(record):
                records.append(record)
        return records

    def replay(self, ids: Sequence[str]) -> int:
        wanted = set(ids)
        records = self.dead_letters(DeadLetterFilter(ids=frozenset(wanted)))
        if not records:
            return 0
        types = list(dict.fromkeys(r.task.type for r in records))
        index = {name: i + 1 for i, name in enumerate(types)}
        keys = [self._key(k) for k in ("count", "dlq", "dlq:idx", "types", "held")]
        keys += [self._stream(name) for name in types]
        args: list[Any] = [self._capacity, GROUP, len(types), *types]
        for record in records:
            task = replace(record.task, attempt=0, not_before=0.0)
            args += [index[task.type], record.id, encode_task(task)]
        moved = 0

        def attempt() -> bool:
            nonlocal moved
            moved = int(self._run("REPLAY", keys, args))
            return moved >= 0

        full = f"queue full: cannot replay {len(records)} task(s)"
        self._with_capacity(attempt, None, full, "replay")
        return moved

    def purge(self, where: DeadLetterFilter) -> int:
        doomed = [r.id for r in self.dead_letters(where)]
        if not doomed:
            return 0

        def remove() -> int:
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(self._key("dlq"), *doomed)
            pipe.zrem(self._key("dlq:idx"), *doomed)
            return int(pipe.execute()[0])

        return self._call(remove, "purge")

    # -- clock, gates and values (runner.brokers.base) --------------------------------------

    def now(self) -> float:
        """Redis' clock (TIME), the one POLL evaluates gates by and values expire by."""
        seconds, micros = self._call(self._client.time, "now")
        return _seconds(seconds, micros)

    def _circuit_keys(self) -> list[str]:
        """The ``breakers`` and ``circuits`` hashes, as POLL and SETTLE take them."""
        return [self._key("breakers"), self._key("circuits")]

    def set_gate(self, type_name: str, gate: Gate) -> None:
        """A pause goes to ``gates``, a rate limit to ``rates`` (its bucket keeps its tokens), a
        circuit breaker to ``breakers`` (its circuit keeps its state)."""
        if isinstance(gate, RateLimit):
            key, value = self._key("rates"), f"{float(gate.rate)!r} {float(gate.burst)!r}"
        elif isinstance(gate, CircuitBreaker):
            key, value = self._key("breakers"), _breaker_field(gate)
        else:
            key, value = self._key("gates"), "" if gate.until is None else repr(float(gate.until))
        self._call(lambda: self._client.hset(key, type_name, value), "set_gate")

    def clear_gate(self, type_name: str, kind: type[Gate]) -> bool:
        if kind is RateLimit:
            return self._clear_with_state(type_name, "rates", "buckets")
        if kind is CircuitBreaker:
            return self._clear_with_state(type_name, "breakers", "circuits")
        key = self._key("gates")

        def clear() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.hget(key, type_name)
            pipe.hdel(key, type_name)
            pipe.time()
            return list(pipe.execute())

        pause, _, (seconds, micros) = self._call(clear, "clear_gate")
        return pause is not None and _in_force(pause, _seconds(seconds, micros))

    def _clear_with_state(self, type_name: str, gates: str, states: str) -> bool:
        """Delete the type's field in the hash ``gates`` (``rates``, ``breakers``) and in the
        hash of the state it keeps (``buckets``, ``circuits``); True when it had the gate."""

        def clear() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(self._key(gates), type_name)
            pipe.hdel(self._key(states), type_name)
            return list(pipe.execute())

        deleted, _ = self._call(clear, "clear_gate")
        return bool(deleted)

    def gates(self) -> dict[str, tuple[Gate, ...]]:
        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(self._key("gates"))
            pipe.hgetall(self._key("rates"))
            pipe.hgetall(self._key("breakers"))
            pipe.time()
            return list(pipe.execute())

        pauses, rates, breakers, (seconds, micros) = self._call(read, "gates")
        now = _seconds(seconds, micros)
        held: dict[str, list[Gate]] = {}
        for name, until in pauses.items():
            if _in_force(until, now):
                held.setdefault(name.decode(), []).append(Pause(float(until) if until else None))
        for name, rate in rates.items():
            held.setdefault(name.decode(), []).append(_rate_limit(rate))
        for name, breaker in breakers.items():
            held.setdefault(name.decode(), []).append(_breaker(breaker))
        return {name: tuple(found) for name, found in sorted(held.items())}

    def buckets(self) -> dict[str, Bucket]:
        """Each rate-limited type's bucket refilled to Redis' TIME (read only: POLL alone
        writes buckets, so the report changes nothing)."""

        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(self._key("rates"))
            pipe.hgetall(self._key("buckets"))
            pipe.time()
            return list(pipe.execute())

        rates, stored, (seconds, micros) = self._call(read, "buckets")
        now = _seconds(seconds, micros)
        return {
            name.decode(): refilled(_rate_limit(rate), _bucket(stored.get(name)), now)
            for name, rate in sorted(rates.items())
        }

    def circuits(self) -> dict[str, Circuit]:
        """Each circuit-broken type's circuit as of Redis' TIME (read only, as ``buckets``: a
        circuit only POLL and SETTLE move on is stored as they left it)."""

        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(self._key("breakers"))
            pipe.hgetall(self._key("circuits"))
            pipe.time()
            return list(pipe.execute())

        breakers, stored, (seconds, micros) = self._call(read, "circuits")
        now = _seconds(seconds, micros)
        return {
            name.decode(): circuit_at(_breaker(breaker), _circuit(stored.get(name)), now)
            for name, breaker in sorted(breakers.items())
        }

    def read_values(self, keys: Sequence[str]) -> dict[str, str]:
        if not keys:
            self._call(lambda: None, "read_values")  # raises BrokerClosed once closed
            return {}
        names = [self._key("v", key) for key in keys]
        raws = self._call(lambda: self._client.mget(names), "read_values")
        return {key: raw.decode() for key, raw in zip(keys, raws, strict=True) if raw is not None}

    def put_if(self, key: str, expected: str | None, value: str, tasks: Sequence[Task]) -> bool:
        """PUT_IF (put_if.lua): the compare-and-set and PUT in one script call. Never waits
        for room: tasks that do not fit raise QueueFull at once."""
        keys, args = self._put_call(tasks) if tasks else ([], [])
        cas = ["1" if expected is not None else "0", expected or "", value]
        done = int(self._run("PUT_IF", [self._key("v", key), *keys], [*cas, *args]))
        if done < 0:
            message = f"queue full: {len(tasks)} task(s) do not fit in capacity {self._capacity}"
            raise QueueFull(message, backend="redis", operation="put_if")
        return done == 1

    def put_unique(self, tasks: Sequence[Task], timeout: float | None = None) -> list[str]:
        """PUT_UNIQUE (put_unique.lua): the keys read, the fresh tasks put and their keys
        held, in one script call; waits for room as ``put_many`` does, calling it again (the
        keys may have changed meanwhile). Answers one id per task."""
        if not tasks:
            self._call(lambda: None, "put_unique")  # raises BrokerClosed once closed
            return []
        put_keys, put_args = self._put_call(tasks)
        values: dict[str, int] = {}  # unique key -> its value key's index in KEYS
        per_task: list[Any] = []
        for task in tasks:
            key = task.unique_key
            per_task += [values.setdefault(key, len(values) + 1) if key else 0, task.id]
        keys = [*(self._key("v", UNIQUE_PREFIX + key) for key in values), *put_keys]
        args = [len(values), len(tasks), *per_task, *put_args]
        line = self._line_here()  # this thread's own connection, as put_many
        answers: list[str] = []

        def attempt() -> bool:
            reply = self._run("PUT_UNIQUE", keys, args, line)
            if isinstance(reply, int):  # this many fresh tasks do not fit: nothing changed
                if reply > self._capacity:  # could never fit: do not wait for it
                    message = f"{reply} tasks exceed the capacity of {self._capacity}"
                    raise QueueFull(message, backend="redis", operation="put_unique")
                return False
            answers[:] = [raw.decode() for raw in reply]
            return True

        full = (
            f"queue full: of {len(tasks)} task(s), those whose unique key is free do not fit "
            f"in capacity {self._capacity}"
        )
        self._with_capacity(attempt, timeout, full, "put_unique")
        return answers

    def scan_values(self, prefix: str) -> dict[str, str]:
        """SCAN for the value keys under ``prefix`` (matched as text: its glob characters are
        escaped), then one MGET; a key that expired in between is left out."""
        start = self._key("v", "")
        pattern = _glob_escape(start + prefix) + "*"

        def scan() -> list[bytes]:
            return list(self._client.scan_iter(match=pattern, count=1000))

        # SCAN may return a key twice (the keyspace can be rehashed while it runs).
        found = sorted(
            {
                name
                for raw in self._call(scan, "scan_values")
                if (name := raw.decode()).startswith(start + prefix)
            }
        )
        if not found:
            return {}
        raws = self._call(lambda: self._client.mget(found), "scan_values")
        return {
            name.removeprefix(start): raw.decode()
            for name, raw in zip(found, raws, strict=True)
            if raw is not None
        }

    def delete_values(self, keys: Sequence[str]) -> int:
        if not keys:
            self._call(lambda: None, "delete_values")  # raises BrokerClosed once closed
            return 0
        names = [self._key("v", key) for key in keys]
        return int(self._call(lambda: self._client.delete(*names), "delete_values"))

    def set_values(self, sets: Sequence[SetValue]) -> None:
        """One MULTI of SETs, a ttl as PX (the value expires by Redis' clock, as a settle's
        effect does); a ttl already run out deletes the key instead."""
        if not sets:
            self._call(lambda: None, "set_values")  # raises BrokerClosed once closed
            return

        def write() -> None:
            pipe = self._client.pipeline(transaction=True)
            for item in sets:
                name = self._key("v", item.key)
                if item.ttl_s is None:
                    pipe.set(name, item.value)
                elif item.ttl_s > 0:
                    # Rounded up, so the value never reads as absent before its ttl has run out.
                    pipe.set(name, item.value, px=math.ceil(item.ttl_s * 1000))
                else:  # run out already (and PX takes only a positive ttl)
                    pipe.delete(name)
            pipe.execute()

        self._call(write, "set_values")


def _glob_escape(text: str) -> str:
    """``text`` as a SCAN MATCH pattern that matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _seconds(seconds: int, micros: int) -> float:
    """A TIME reply as epoch seconds, computed as POLL computes it."""
    return seconds + micros / 1_000_000


def _in_force(until: bytes, now: float) -> bool:
    """Whether a ``gates`` field (b"" or the pause's end) still holds its type back."""
    return until == b"" or float(until) > now


def _rate_limit(field: bytes) -> RateLimit:
    """A ``rates`` field (``"<rate> <burst>"``) as the RateLimit it stores."""
    rate, burst = field.split()
    return RateLimit(rate=float(rate), burst=float(burst))


def _bucket(field: bytes | None) -> Bucket | None:
    """A ``buckets`` field (``"<tokens> <at> <limited_s>"``, as bucket.lua writes it)."""
    if field is None:
        return None
    tokens, at, limited_s = field.split()
    return Bucket(tokens=float(tokens), at=float(at), limited_s=float(limited_s))


def _breaker_field(breaker: CircuitBreaker) -> str:
    """A ``breakers`` field: ``"<failure_rate> <min_calls> <window_s> <open_for_s>
    <half_open_calls>"`` (``repr`` of the floats, so they read back exactly)."""
    floats = (breaker.failure_rate, breaker.window_s, breaker.open_for_s)
    rate, window_s, open_for_s = (repr(float(x)) for x in floats)
    return f"{rate} {breaker.min_calls} {window_s} {open_for_s} {breaker.half_open_calls}"


def _breaker(field: bytes) -> CircuitBreaker:
    """A ``breakers`` field as the CircuitBreaker it stores."""
    rate, min_calls, window_s, open_for_s, half_open_calls = field.split()
    return CircuitBreaker(
        failure_rate=float(rate),
        min_calls=int(min_calls),
        window_s=float(window_s),
        open_for_s=float(open_for_s),
        half_open_calls=int(half_open_calls),
    )


#: The states a ``circuits`` field may name.
_STATES: dict[bytes, CircuitState] = {
    b"closed": "closed",
    b"open": "open",
    b"half_open": "half_open",
}


def _circuit(field: bytes | None) -> Circuit | None:
    """A ``circuits`` field (as circuit.lua writes it); None for none, or one circuit.lua would
    not read either (it starts afresh)."""
    if field is None:
        return None
    parts = field.split()
    if len(parts) != 8 or parts[0] not in _STATES:
        return None
    since, window_start = float(parts[1]), float(parts[2])
    calls, failures, prev_calls, prev_failures, probes = (int(x) for x in parts[3:])
    return Circuit(
        _STATES[parts[0]],
        since=since,
        window_start=window_start,
        calls=calls,
        failures=failures,
        prev_calls=prev_calls,
        prev_failures=prev_failures,
        probes=probes,
    )
