"""RedisBroker: one stream per task type, shared by any number of processes on any machines.

Guarantees: at-least-once. A task is removed only by a fenced ack or dead-letter; a delivery
whose worker died is reclaimed (XAUTOCLAIM) after ``visibility_timeout`` (polls look for such
deliveries of each type ten times per visibility timeout, at most once a second, and again at
once after finding one) and handed out again with attempt + 1. A released task keeps its place
in its stream. How much survives a Redis crash depends on Redis' persistence (``appendonly yes``
+ ``appendfsync always`` loses nothing it acknowledged). Redis must run with
``maxmemory-policy noeviction``: eviction silently drops tasks (we warn at start, and also when
Redis keeps nothing on disk: ``appendonly no`` and no RDB save points).

The data model and the atomic steps are in runner/brokers/redis/scripts.py.

Blocking ``get``: one Lua poll (move due retries, reclaim, read, but nothing of a type whose
pause is in force by Redis' TIME, no more of a rate-limited type than its bucket's tokens, and
no more of a circuit-broken type than its circuit allows) and, when it finds nothing, an
``XREAD BLOCK`` on the wanted streams (less the gated ones, those whose bucket is empty and
those whose circuit holds them back) from their last entry id, in slices of at most
``block_slice`` seconds (default 0.1), none past the next delayed task's time, an empty
bucket's next token or the time a held circuit may probe again, with a poll pipelined behind
it on the same connection (Redis runs it as the read returns: a new task is claimed without a
second round trip; publish -> start p50 at 1,000/s 22-36% lower in alternating runs). A new
task wakes the XREAD at once, and so do ``wake()`` and ``close()``: the read also watches this
broker's own wake stream, to which they add an entry (a wake that lands after the get last
looked for one but before its read starts still ends it, as the read starts from the wake
stream's last entry the get saw). Between slices the broker re-polls, so tasks that fall due
(retries, also other processes'), expired leases and gates cleared or run out are seen within
one slice: that is why slices stay short. Every socket timeout is set explicitly and
exceeds the slice, so an idle worker never hits a client timeout mid-read (redis-py 8's 5 s
default with a longer BLOCK is a classic "alive but not consuming" bug). The protocol is pinned
to RESP2, redis-py 8 would otherwise negotiate RESP3.

``settle_many`` sends any number of acks / retries / dead-letters / releases in one call of the
fenced SETTLE script, and ``exchange`` sends them with a POLL in one EXCHANGE script call, on
the calling thread's own connection, so exchanges from several threads may overlap (the engine
settles through these two; a single ack / retry / dead / release is a ``settle_many`` of one).
Each op gets its own fenced answer, only after Redis gave it; an op's effects (tasks to put,
a join's parts, dead letters, values to set or delete, an outcome for its type's circuit) ride
in the same script call, which applies them only to an op it answers done. The operator
commands, the clock (``now``: Redis' TIME), the gate calls and the value calls
(``read_values``, ``put_if``, ``put_unique``, ``scan_values``, ``delete_values``) are in
admin.py, the pipeline admin (``tasks_of``, ``cancel``) in pipelines.py.

Connection loss: every call is retried with exponential backoff (call_with_reconnect, built
on tenacity) for up to ``reconnect_timeout`` seconds, logging ``broker.reconnecting``, then
BrokerUnavailable. A call whose reply was lost may have happened: a repeated put may store a
task twice (at-least-once), a repeated ack of a delivery that was in fact acked answers
ALREADY_DONE (the scripts remember settled lease tokens for one to two visibility timeouts), and
a poll whose reply was lost leaves its deliveries to be reclaimed after ``visibility_timeout``.

Size: about 860 lines: the whole Redis side of the broker contract (put, poll and blocking
wait, wake, settle with its effects, extend, reconnects, per-thread lines); the Lua lives in
scripts.py and its .lua files, the operator side, the gate and the value calls in admin.py. The
connection handling is the next part to split out.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar

import redis
from hiredis import pack_command
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from runner.brokers.base import Answer, BaseBroker, Delivery, Depth, Effects, Settle
from runner.brokers.reconnect import call_with_reconnect
from runner.brokers.redis import scripts as lua
from runner.brokers.redis.admin import RedisAdmin
from runner.brokers.redis.pipelines import RedisPipelines
from runner.brokers.redis.scripts import GROUP, JOIN_PAYLOAD
from runner.codec import decode_task, encode_dead_letter, encode_task
from runner.errors import BrokerClosed, BrokerUnavailable, QueueFull
from runner.eventlog import log_event
from runner.events import EventName
from runner.model import AttemptRecord, DeadLetter, Task

log = logging.getLogger("runner.broker")

T = TypeVar("T")

#: One settle operation: kind, type, entry id, lease token, three kind-specific fields, then
#: how many effect entries follow (0 from ``_op``).
_Settle = tuple[Any, ...]
#: Fields per effect entry in SETTLE's ARGV (settle.lua).
_EFFECT_FIELDS = 5
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
#: The scripts' answers (0 fenced, 1 done, 2 already done), by number.
_ANSWERS = (Answer.FENCED, Answer.DONE, Answer.ALREADY_DONE)
#: Polls look for expired leases this many times per visibility timeout (at most once a second).
RECLAIMS_PER_VISIBILITY = 10
#: Timeouts of the connection wake() sends on: it is called under the engine's lock, so it must
#: not wait long for a Redis that is down (the get then ends at its next slice instead).
WAKE_TIMEOUT_S = 0.5
#: A wake stream outlives its broker by at most this (close deletes it; a crash cannot).
WAKE_KEY_TTL_MS = 3_600_000


class RedisBroker(RedisAdmin, RedisPipelines, BaseBroker):
    """Broker, BrokerAdmin and PipelineAdmin on Redis streams; see the module docstring for the
    guarantees."""

    # Capability flags (runner.brokers.base): streams that outlive the process, shared by any
    # number of processes on any machines; every call is a round trip; POLL evaluates gates
    # and SETTLE applies effects, inside the scripts.
    durable = True
    shared = True
    batch_settles = True
    carry_settles = False  # a settle's round trip and a claim's overlap (docs/performance.md)
    gates_in_get = True
    settle_effects = True

    def __init__(
        self,
        url: str,
        namespace: str,
        capacity: int,
        enqueue_timeout: float,
        overflow: Literal["block", "reject"],
        visibility_timeout: float,
        clock: Callable[[], float] = time.time,
        *,
        socket_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        health_check_interval: int = 15,
        reconnect_timeout: float = 30.0,
        block_slice: float = 0.1,
        on_reconnect: Callable[[int, BaseException | None], None] | None = None,
    ) -> None:
        if socket_timeout <= block_slice:
            raise ValueError("socket_timeout must exceed block_slice, or idle reads time out")
        self._capacity = capacity
        self._enqueue_timeout = enqueue_timeout
        self._overflow = overflow
        self._visibility_ms = max(1, int(visibility_timeout * 1000))
        # How often polls look for expired leases (XAUTOCLAIM): a delivery whose worker died is
        # handed out again within visibility_timeout + this, not on the dot.
        self._reclaim_every_s = min(visibility_timeout / RECLAIMS_PER_VISIBILITY, 1.0)
        # Per type: a poll that cannot ask for a type (its slots are full) must not use up
        # that type's look, or a busy type's expired leases could wait for ever.
        self._next_reclaim: dict[str, float] = {}
        self._clock = clock
        self._reconnect_timeout = reconnect_timeout
        # Told about every reconnect attempt (the runner turns it into a broker.reconnecting
        # event: a log line and a metric); without one, the broker logs it itself.
        self._on_reconnect = on_reconnect or _log_reconnecting
        self._block_slice = block_slice
        self._prefix = "{" + namespace + "}:"
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # Lease tokens are this nonce + a poll counter + the hand-out's number in the poll:
        # unique without asking the OS for randomness on every get.
        self._nonce = secrets.token_hex(8) + "."
        self._polls = itertools.count()
        self._woken = threading.Event()
        self._closed = False
        # wake() ends a blocked read by adding to this stream, which every blocking read also
        # watches from the last entry the get saw (_wake_cursor). Under _wake_lock: whether a
        # read is under way, and whether a wake was sent to it already (one is enough).
        self._wake_key = self._key("wake", self.consumer)
        self._wake_cursor: bytes | str = "0-0"
        self._wake_lock = threading.Lock()
        self._reading = False
        self._wake_sent = False
        self._wake_client: Any = redis.Redis.from_url(
            url,
            protocol=2,
            socket_timeout=WAKE_TIMEOUT_S,
            socket_connect_timeout=WAKE_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )  # its own small pool: connects on first use
        self._wake_key_made = False
        # Held while get() runs, so close() does not pull the socket from under a blocked read.
        self._getting = threading.Lock()
        self._lines = threading.local()  # per-thread connections for exchange and put
        # Per type: the keys, argument head and type index of a one-type PUT (_put_shape).
        self._put_shapes: dict[tuple[str, ...], tuple[list[str], tuple[Any, ...], dict[str, int]]]
        self._put_shapes = {}
        # Any: redis-py's annotations are unions of sync/async and bytes/str replies.
        self._client: Any = redis.Redis.from_url(
            url,
            protocol=2,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            # Our own tenacity loop retries (and logs); redis-py's built-in retry would hide
            # outages and multiply the waits.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            self._client.ping()
            # The hot paths, get (the dispatcher, under _getting), the settle batches (the
            # Settler) and each fetching thread's exchanges (_line_here), keep a connection of
            # the pool to themselves: a pooled call pays a checkout (a lock, a non-blocking read
            # probe and two socket timeout changes) on every command. Closing the pool closes
            # these too.
            self._get_client: Any = self._dedicated_client()
            self._get_line = _Line(self._get_client)
            self._settle_line = _Line(self._dedicated_client())
        except (*_TRANSIENT, redis.ResponseError, redis.InvalidResponse) as exc:
            self._client.close()
            why = str(exc)
            if isinstance(exc, redis.InvalidResponse):  # another service on that port
                why = f"it did not answer as Redis does ({exc}): is that port a Redis server?"
            message = f"cannot reach redis at {_safe_url(url)}: {why}"
            raise BrokerUnavailable(message, **_at("open")) from exc
        self._scripts = {
            name: self._client.register_script(getattr(lua, name))
            for name in (
                "PUT",
                "PUT_IF",
                "PUT_UNIQUE",
                "POLL",
                "SETTLE",
                "EXCHANGE",
                "EXTEND",
                "REPLAY",
                "DEPTH",
                "QUEUED",
                "CANCEL",
            )
        }
        self._settle_keys = [self._key(k) for k in ("leases", "count", "dlq", "dlq:idx")]
        # The sets of tokens settled lately by brokers with this visibility timeout.
        settled = [self._key("settled", str(self._visibility_ms), p) for p in ("0", "1")]
        self._settle_keys += [*settled, self._key("types"), *self._circuit_keys()]
        self._settle_keys.append(self._key("held"))
        self._extend_keys = [self._key("leases"), *settled]
        self._warn_unless_noeviction()

    def _dedicated_client(self) -> Any:
        pool = self._client.connection_pool
        return redis.Redis(connection_pool=pool, single_connection_client=True)

    # -- keys -------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _stream(self, type_: str) -> str:
        return self._key("q", type_)

    def _delayed(self, type_: str) -> str:
        return self._key("d", type_)

    # -- plumbing ---------------------------------------------------------------------------

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise BrokerClosed("redis broker is closed", **_at(operation))

    def _call(self, fn: Callable[[], T], operation: str) -> T:
        """Run one Redis call, retrying connection errors with backoff until reconnect_timeout.

        ``operation``: the broker method it serves, named by the BrokerError it may raise.
        """
        if self._closed:
            raise BrokerClosed("redis broker is closed", **_at(operation))
        try:
            return fn()  # the common case, without the cost of setting up the retry loop
        except _TRANSIENT as exc:
            failed: list[BaseException] = [exc]

        def again() -> T:
            # The retry loop starts from the failure above, so it waits and logs as if it had
            # made that first call itself.
            if failed:
                raise failed.pop()
            return fn()

        try:
            return call_with_reconnect(
                again,
                transient=_TRANSIENT,
                timeout_s=self._reconnect_timeout,
                stopped=lambda: self._closed,
                on_retry=self._on_reconnect,
            )
        except _TRANSIENT as exc:
            if self._closed:
                raise BrokerClosed("redis broker is closed", **_at(operation)) from exc
            raise BrokerUnavailable(
                f"redis unreachable for {self._reconnect_timeout}s: {exc}", **_at(operation)
            ) from exc

    def _run(
        self, name: str, keys: Sequence[str], args: Sequence[Any], line: _Line | None = None
    ) -> Any:
        script = self._scripts[name]
        if line is None:
            return self._call(lambda: script(keys=keys, args=args), _OPERATION[name])
        return self._call(lambda: line.run(script, keys, args), _OPERATION[name])

    def _warn_unless_noeviction(self) -> None:
        """Warn at start about settings that lose tasks silently: eviction, no persistence."""
        reply: dict[Any, Any] = {}
        try:
            for name in ("maxmemory-policy", "appendonly", "save"):
                reply.update(self._client.config_get(name))
        except redis.ResponseError:  # CONFIG disabled or renamed (managed Redis): cannot check
            log_event(log, logging.INFO, "broker.config_unreadable")
            return
        # redis-py decodes CONFIG GET keys but may leave values as bytes.
        values = {_text(k): _text(v) for k, v in reply.items()}
        policy = values.get("maxmemory-policy")
        if policy is not None and policy != "noeviction":
            log_event(
                log,
                logging.WARNING,
                "broker.eviction_policy",
                f"redis maxmemory-policy is {policy}, not noeviction; "
                "Redis may silently evict queued tasks",
                policy=policy,
            )
        if values.get("appendonly") == "no" and values.get("save", "?").strip() == "":
            log_event(
                log,
                logging.WARNING,
                "broker.no_persistence",
                "redis keeps nothing on disk (appendonly no, no RDB save points): a Redis "
                "restart loses every queued, delayed and running task and every dead letter",
                appendonly="no",
                save="",
            )

    # -- Broker -----------------------------------------------------------------------------

    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None:
        self._check_open("put")
        if not tasks:
            return
        if len(tasks) > self._capacity:  # could never fit: do not wait for it
            message = f"{len(tasks)} tasks exceed the capacity of {self._capacity}"
            raise QueueFull(message, **_at("put"))
        keys, args = self._put_call(tasks)
        # On this thread's own connection, as exchanges: a pooled call's checkout and
        # redis-py's command wrapper cost more than the script's work in Redis.
        line = self._line_here()
        self._with_capacity(
            lambda: bool(self._run("PUT", keys, args, line)),
            timeout,
            f"queue full: {len(tasks)} task(s) do not fit in capacity {self._capacity}",
            "put",
        )

    def _put_call(self, tasks: Sequence[Task]) -> tuple[list[str], list[Any]]:
        """PUT's KEYS and ARGV for ``tasks`` (put.lua describes them)."""
        now = self._clock()
        types = tuple(dict.fromkeys(task.type for task in tasks))
        keys, head, index = self._put_shape(types)
        args: list[Any] = [*head]
        for task in tasks:
            not_before, data = _stored(task, now)
            args += [index[task.type], not_before, task.attempt, data, task.id]
        return keys, args

    def _put_shape(
        self, types: tuple[str, ...]
    ) -> tuple[list[str], tuple[Any, ...], dict[str, int]]:
        """PUT's keys, the head of its arguments and each type's index, for tasks of ``types``.

        Made once per type for a one-type put (always so for one task, how applications
        publish); a put of several types makes its own.
        """
        shape = self._put_shapes.get(types) if len(types) == 1 else None
        if shape is None:
            keys = [self._key("count"), self._key("types"), self._key("held")]
            for name in types:
                keys += [self._stream(name), self._delayed(name)]
            head = (self._capacity, GROUP, len(types), *types)
            shape = (keys, head, {name: i + 1 for i, name in enumerate(types)})
            if len(types) == 1:
                self._put_shapes[types] = shape
        return shape

    def _with_capacity(
        self, attempt: Callable[[], bool], timeout: float | None, message: str, operation: str
    ) -> None:
        """Call attempt() until it fits: at once with overflow reject, else poll until timeout.

        ``operation`` (put, replay) is named by the QueueFull or BrokerClosed it may raise.
        """
        wait_s = self._enqueue_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait_s
        pause = 0.01
        while not attempt():
            remaining = deadline - time.monotonic()
            if self._closed:
                closed = "redis broker was closed while waiting for capacity"
                raise BrokerClosed(closed, **_at(operation))
            if self._overflow == "reject" or remaining <= 0:
                raise QueueFull(message, **_at(operation))
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.2)

    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise BrokerClosed("redis broker is closed", **_at("get"))
        wanted = [(name, n) for name, n in slots.items() if n > 0]
        deadline = time.monotonic() + timeout
        if not wanted or limit <= 0:
            self._woken.wait(max(0.0, timeout))
            self._woken.clear()
            return []
        with self._getting:
            return self._get(self._poll_keys(wanted), wanted, limit, deadline)

    def exchange(
        self, ops: Sequence[Settle], slots: Mapping[str, int], limit: int
    ) -> tuple[list[Answer], list[Delivery]]:
        """``settle_many(ops)`` and one POLL (as ``get`` with timeout 0): one script call
        (EXCHANGE), on the calling thread's own connection.

        If the reply is lost, the settles may have happened (trying them again is safe) and
        the polled deliveries come back after ``visibility_timeout``, as with a lost get.
        """
        self._check_open("exchange")
        wanted = [(name, n) for name, n in slots.items() if n > 0]
        if not wanted or limit <= 0:
            return self.settle_many(ops), []
        settle_keys, settle_args = self._settle_call(ops)
        keys = [*settle_keys, *self._poll_keys(wanted)]
        args = [len(settle_keys), len(settle_args), *settle_args]
        args += self._poll_args(wanted, limit, waits=False)
        settled, (found, _cursors, _next_due) = self._call(
            lambda: self._line_here().run(self._scripts["EXCHANGE"], keys, args), "exchange"
        )
        return [_ANSWERS[ok] for ok in settled], self._deliveries(found, wanted)

    def _line_here(self) -> _Line:
        """This thread's own connection for exchanges (the engine's fetching threads each
        make theirs at the same time), made on first use."""
        line: _Line | None = getattr(self._lines, "line", None)
        if line is None:
            line = self._lines.line = _Line(self._dedicated_client())
        return line

    def _poll_keys(self, wanted: list[tuple[str, int]]) -> list[str]:
        keys = [self._key(k) for k in ("leases", "gates", "rates", "buckets")]
        keys += self._circuit_keys()
        for name, _ in wanted:
            keys += [self._stream(name), self._delayed(name)]
        return keys

    def _poll_args(self, wanted: list[tuple[str, int]], limit: int, waits: bool) -> list[Any]:
        """POLL's arguments; ``waits``: the caller blocks on the streams if nothing came."""
        now = time.monotonic()
        args = [repr(self._clock()), GROUP, self.consumer, self._visibility_ms, limit]
        args += [f"{self._nonce}{next(self._polls)}", int(waits)]
        for name, n in wanted:
            # Expired leases are looked for a few times per visibility timeout, per type.
            reclaim = now >= self._next_reclaim.get(name, 0.0)
            if reclaim:
                self._next_reclaim[name] = now + self._reclaim_every_s
            args += [name, n, int(reclaim)]
        return args

    def _get(
        self, keys: list[str], wanted: list[tuple[str, int]], limit: int, deadline: float
    ) -> list[Delivery]:
        try:
            while True:
                args = self._poll_args(wanted, limit, waits=True)
                found, cursors, next_due = self._run("POLL", keys, args, self._get_line)
                if found:
                    return self._deliveries(found, wanted)
                if self._woken.is_set() or self._closed:
                    self._woken.clear()
                    return []
                block = min(self._block_slice, deadline - time.monotonic())
                if next_due:
                    block = min(block, float(next_due) - self._clock())
                if block <= 0 and time.monotonic() >= deadline:
                    return []
                if block < 0.001:
                    continue
                woken, found = self._wait_for_entries(keys, wanted, limit, cursors, block)
                if found:
                    return self._deliveries(found, wanted)
                if woken:
                    self._woken.clear()
                    return []
        except BrokerClosed:
            if self._closed:
                return []
            raise

    def _wait_for_entries(
        self,
        keys: list[str],
        wanted: list[tuple[str, int]],
        limit: int,
        cursors: list[Any],
        block: float,
    ) -> tuple[bool, list[Any]]:
        """XREAD BLOCK from the last entry of each wanted stream and of the wake stream, and
        a POLL sent right behind it on the same connection: Redis runs the poll the moment the
        read returns (a stream grew, or ``block`` ended), so a new task is claimed without a
        round trip between the read and the claim. Returns (whether the get was woken or the
        broker closed, what that poll handed out).

        The poll's ``now`` is the time it was sent, up to ``block`` before it runs: a delayed
        task that fell due meanwhile waits for the next poll, which the get makes at once when
        this one brought nothing (leases, gates and circuits go by Redis' own clock).

        A type held back (empty cursor: paused, its bucket empty or its circuit open) is left
        out of the read: its new entries cannot be handed out, and would only end the read
        early. Its gates are looked at again by the next poll.
        """
        streams = {self._stream(name): c for (name, _), c in zip(wanted, cursors, strict=True) if c}
        streams[self._wake_key] = self._wake_cursor
        xread = ["XREAD", "COUNT", 1, "BLOCK", max(1, int(block * 1000)), "STREAMS"]
        xread += [*streams, *streams.values()]

        def read() -> tuple[Any, Any]:
            with self._wake_lock:
                # A wake from here on sees _reading and adds an entry after _wake_cursor, so
                # the read returns at once even if the entry lands before the read starts.
                if self._woken.is_set() or self._closed:
                    return None, None
                self._reading, self._wake_sent = True, False
            try:
                args = self._poll_args(wanted, limit, waits=False)
                return self._get_line.read_then_run(xread, self._scripts["POLL"], keys, args)
            finally:
                with self._wake_lock:
                    self._reading = False

        read_reply, polled = self._call(read, "get")
        for name, entries in read_reply or ():
            if entries and _text(name) == self._wake_key:
                self._wake_cursor = entries[-1][0]
        found = polled[0] if polled else []
        return self._woken.is_set() or self._closed, found

    def _deliveries(self, found: list[Any], wanted: list[tuple[str, int]]) -> list[Delivery]:
        out = []
        for i in range(0, len(found), 7):
            idx, entry_id, before, raw, count, token, redelivered = found[i : i + 7]
            type_ = wanted[int(idx) - 1][0]
            entry = entry_id.decode()
            receipt = f"{entry}|{token.decode()}|{type_}"
            attempt = int(before) + int(count)
            try:
                task = decode_task(raw, attempt)
                error = None
            except ValueError as exc:
                task = Task(type=type_, payload=None, id=f"redis:{entry}", attempt=attempt)
                error = f"undecodable task in {self._stream(type_)} entry {entry}: {exc}"
            again = bool(int(redelivered))
            if again:  # a worker of this type died: the next poll looks for more of its leases
                self._next_reclaim.pop(type_, None)
            out.append(Delivery(task, receipt, again, decode_error=error))
        return out

    def _parse(self, delivery: Delivery) -> tuple[str, str, str]:
        entry, token, type_ = delivery.receipt.split("|", 2)
        return self._stream(type_), entry, token

    def ack(self, delivery: Delivery) -> Answer:
        return self._settle(Settle(delivery, "ack"))

    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer:
        return self._settle(Settle(delivery, "retry", delay_s, failure))

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer:
        return self._settle(Settle(delivery, "dead", record=record))

    def release(self, delivery: Delivery) -> Answer:
        return self._settle(Settle(delivery, "release"))

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        """Every op in one SETTLE script call: one round trip, atomic in Redis."""
        self._check_open("settle")
        return self._flush_settles(ops) if ops else []

    def _settle(self, op: Settle) -> Answer:
        return self.settle_many([op])[0]

    def _op(self, op: Settle) -> _Settle:
        """``op`` as its eight fields in SETTLE's ARGV (see settle.lua), without effects."""
        entry, token, type_ = op.delivery.receipt.split("|", 2)
        if op.kind == "retry":
            assert op.failure is not None
            now = self._clock()
            not_before = now + max(0.0, op.delay_s)
            task = replace(op.delivery.task.with_failure(op.failure), not_before=not_before)
            member = _delayed_member(task.attempt, encode_task(task))
            return ("retry", type_, entry, token, repr(not_before), member, repr(now), 0)
        if op.kind == "dead":
            record = op.record
            assert record is not None
            encoded = encode_dead_letter(record)
            return ("dead", type_, entry, token, record.id, encoded, repr(record.dead_at), 0)
        held = op.delivery.task.id if op.kind == "ack" else ""
        return (op.kind, type_, entry, token, held, "", "", 0)

    def _flush_settles(self, ops: Sequence[Settle]) -> list[Answer]:
        """One SETTLE script call for every operation in ``ops``."""
        keys, args = self._settle_call(ops)
        return [_ANSWERS[ok] for ok in self._run("SETTLE", keys, args, self._settle_line)]

    def _settle_call(self, ops: Sequence[Settle]) -> tuple[list[str], list[Any]]:
        """SETTLE's KEYS and ARGV for ``ops`` (settle.lua describes them)."""
        types: dict[str, int] = {}
        values: dict[str, int] = {}
        args: list[Any] = [GROUP, self._visibility_ms, 0]  # 0: the number of types, below
        for op in ops:
            kind, type_, *rest = self._op(op)
            index = types.setdefault(type_, len(types) + 1)
            args += [kind, index, *rest]
            if op.effects is not None:
                effects = self._effect_args(op.effects, index, types, values)
                args[-1] = len(effects) // _EFFECT_FIELDS  # the op's last field, 0 from _op
                args += effects
        args[2] = len(types)
        args += types
        keys = list(self._settle_keys)
        for type_ in types:
            keys += [self._stream(type_), self._delayed(type_)]
        if values:
            prefix = self._key("v", "")
            keys += [prefix + key for key in values]
        return keys, args

    def _effect_args(
        self, effects: Effects, own: int, types: dict[str, int], values: dict[str, int]
    ) -> list[Any]:
        """``effects`` as SETTLE's effect entries, in the order they apply: the ``unless`` key,
        the outcome for the circuit of the op's own type (index ``own``), puts, arrivals (each
        a part and its join's task), dead letters, sets, deletes. The types and value keys
        they touch join ``types`` and ``values`` (name -> index in SETTLE's KEYS)."""
        out: list[Any] = []
        if effects.unless is not None:
            out += ["unless", values.setdefault(effects.unless, len(values) + 1), "", "", ""]
        if effects.circuit is not None:
            out += ["circuit", own, int(effects.circuit), "", ""]
        now = self._clock()
        for task in effects.puts:
            out += _put_entry(task, now, types)
        for arrival in effects.arrivals:
            index = values.setdefault(arrival.key, len(values) + 1)
            out += ["part", index, arrival.index, arrival.value, arrival.size]
            out += _put_entry(replace(arrival.task, payload=JOIN_PAYLOAD), now, types)
        for record in effects.dead_letters:
            out += ["dead", "", record.id, encode_dead_letter(record), repr(record.dead_at)]
        for item in effects.sets:
            index = values.setdefault(item.key, len(values) + 1)
            if item.ttl_s is None:
                out += ["set", index, item.value, "", ""]
            elif item.ttl_s > 0:
                # Rounded up, so the value never reads as absent before its ttl has run out.
                out += ["set", index, item.value, math.ceil(item.ttl_s * 1000), ""]
            else:  # run out already (and PX takes only a positive ttl)
                out += ["del", index, "", "", ""]
        for key in effects.deletes:
            out += ["del", values.setdefault(key, len(values) + 1), "", "", ""]
        return out

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]:
        self._check_open("extend")
        if not deliveries:
            return []
        keys = list(self._extend_keys)
        args: list[Any] = [GROUP, self.consumer]
        for delivery in deliveries:
            stream, entry, token = self._parse(delivery)
            keys.append(stream)
            args += [entry, token]
        return [_ANSWERS[ok] for ok in self._run("EXTEND", keys, args)]

    def wake(self) -> None:
        self._woken.set()
        with self._wake_lock:
            send = self._reading and not self._wake_sent
            self._wake_sent = self._wake_sent or send
        if send:
            self._send_wake()

    def _send_wake(self) -> None:
        """Add an entry to the wake stream: the blocked read returns. Never raises: if Redis
        cannot be reached, the get ends at the end of its slice instead."""
        try:
            pipe = self._wake_client.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.pexpire(self._wake_key, WAKE_KEY_TTL_MS)
            pipe.execute()
            self._wake_key_made = True
        except redis.RedisError as exc:
            log.debug("wake not sent: %s", exc)

    def depth(self) -> dict[str, Depth]:
        types = sorted(
            t.decode()
            for t in self._call(lambda: self._client.smembers(self._key("types")), "depth")
        )
        if not types:
            return {}
        keys = [k for name in types for k in (self._stream(name), self._delayed(name))]
        rows = self._run("DEPTH", keys, [GROUP, repr(self._clock())])
        return {
            name: Depth(
                ready=int(length) - int(pending) + int(due),
                delayed=int(delayed) - int(due),
                leased=int(pending),
            )
            for name, (length, pending, delayed, due) in zip(types, rows, strict=True)
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wake()
        # The wake ends a blocked read at once (with Redis down, at the end of its slice); do
        # not wait forever on a stuck one.
        acquired = self._getting.acquire(timeout=max(2.0, 3 * self._block_slice))
        try:
            if self._wake_key_made:
                with contextlib.suppress(redis.RedisError):
                    self._wake_client.delete(self._wake_key)
            self._wake_client.close()
            self._client.close()
        finally:
            if acquired:
                self._getting.release()


class _Line:
    """A client's one connection, driven directly for the hot script calls.

    A call through ``redis.Redis`` passes a deprecated-arguments check, a retry wrapper, timing
    hooks and a response-callback lookup around the command itself; on the dispatcher's path
    that cost more CPU than the script's own work in Redis. This sends EVALSHA and reads the
    reply on the same connection, under the client's own lock (so its other commands, such as
    the blocking XREAD, never interleave). Errors are redis-py's: a connection that failed
    mid-command is closed by redis-py and reconnects on the next call.
    """

    def __init__(self, client: Any) -> None:
        # Keep the client: once collected, it would hand its connection back to the pool while
        # this line still uses it, and another caller's replies would interleave with ours.
        self._client = client
        self._conn = client.connection
        self._lock = client.single_connection_lock

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with self._lock:
            try:
                return self._command("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted (or SCRIPT FLUSHed) Redis: load it again
                self._command("SCRIPT", "LOAD", script.script)
                return self._command("EVALSHA", script.sha, len(keys), *keys, *args)

    def read_then_run(
        self, read: Sequence[Any], script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, Any]:
        """A blocking ``read`` and ``script`` sent together: Redis runs the script as soon as
        the read returns. The replies of both; the script's None when Redis did not know it
        (the next ``run`` loads it). Any other error leaves the connection closed, so that no
        reply is left behind on it for the next command to read."""
        evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
        with self._lock:
            self._conn.send_packed_command([pack_command(tuple(read)), pack_command(evalsha)])
            try:
                first = self._conn.read_response()
            except BaseException:
                self._conn.disconnect()
                raise
            try:
                return first, self._conn.read_response()
            except NoScriptError:
                return first, None
            except BaseException:
                self._conn.disconnect()
                raise

    def _command(self, *parts: Any) -> Any:
        # Packed by hiredis in one C call: redis-py's packer encodes each argument in Python
        # (a generator and an isinstance ladder per argument), which on a one-task PUT of 15
        # arguments cost more than the rest of the publish.
        self._conn.send_packed_command([pack_command(parts)])
        return self._conn.read_response()


def _stored(task: Task, now: float) -> tuple[str, bytes]:
    """``task`` as put.lua and SETTLE's effect puts store it: ``("", envelope)`` when it is
    ready, ``(not_before, delayed-set member)`` when it is delayed."""
    # replace() costs several microseconds: only for a task that has no enqueued_at yet.
    stored = task if task.enqueued_at else replace(task, enqueued_at=now)
    envelope = encode_task(stored)
    if stored.not_before > now:
        return repr(stored.not_before), _delayed_member(stored.attempt, envelope)
    return "", envelope


def _put_entry(task: Task, now: float, types: dict[str, int]) -> list[Any]:
    """SETTLE's ``put`` or ``later`` entry of ``task``; its type joins ``types``."""
    index = types.setdefault(task.type, len(types) + 1)
    not_before, data = _stored(task, now)
    if not_before:
        return ["later", index, not_before, data, task.id]
    return ["put", index, task.attempt, data, task.id]


def _delayed_member(attempt: int, envelope: bytes) -> bytes:
    # A random prefix keeps two identical envelopes apart in the sorted set.
    return f"{secrets.token_hex(8)} {attempt} ".encode() + envelope


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _at(operation: str) -> dict[str, str]:
    """Where a BrokerError of this broker was raised (its ``backend`` and ``operation``)."""
    return {"backend": "redis", "operation": operation}


#: The broker method each script serves (the ``operation`` of a BrokerError it raises).
_OPERATION = {
    "PUT": "put",
    "PUT_IF": "put_if",
    "PUT_UNIQUE": "put_unique",
    "POLL": "get",
    "SETTLE": "settle",
    "EXCHANGE": "exchange",
    "EXTEND": "extend",
    "REPLAY": "replay",
    "DEPTH": "depth",
    "CANCEL": "cancel",
}


def _safe_url(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _log_reconnecting(attempt: int, exc: BaseException | None) -> None:
    log_event(
        log,
        logging.WARNING,
        EventName.BROKER_RECONNECTING,
        f"attempt {attempt} after {exc}",
        attempt=attempt,
        error=str(exc),
    )
