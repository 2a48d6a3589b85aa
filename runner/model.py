"""What a task is: the envelope, its attempts, dead-letter records, task ids, and the context a
handler receives (with its cancellation). Plain dataclasses; the JSON codec is runner.codec.

Everything that crosses a broker is JSON (never pickle), so a dead-letter record can be read and
replayed without the producer's code.

Size: about 460 lines, over our 450: the data every layer shares, kept in one module near the
bottom of the import graph, which each layer can import without a cycle.

May import: the standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import logging
import os
import random
import string
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any, NoReturn, TypeVar

from runner.errors import UsageError

# A private generator (handlers may seed the random module's), seeded from os.urandom and
# seeded again in a forked child, which would otherwise repeat its parent's ids.
_id_bits = random.Random()
os.register_at_fork(after_in_child=_id_bits.seed)


class _NoHeaders(dict[str, Any]):
    """An empty, read-only, hashable mapping (a dataclass default must be hashable).

    A dict underneath, so that ``if headers``, ``in`` and ``get`` stay C calls: every task
    asks its headers several times, and a Mapping's ``__len__`` in Python cost a call each.
    Everything that would change it raises TypeError."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return 0

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a task without headers has the shared, read-only NO_HEADERS")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


#: The headers of a task that has none: one shared, read-only mapping (a dict per task would
#: cost an allocation and 64 bytes on every task).
NO_HEADERS: Mapping[str, Any] = _NoHeaders()

#: How many attempts a task remembers; older ones are dropped (the count stays exact).
HISTORY_LIMIT = 10


#: How many ids this process has made (``next`` of it is atomic under the GIL).
_ids_made = itertools.count()


def new_task_id() -> str:
    """32 hex digits: the creation time in milliseconds (12), a count of the ids this process
    made (8), then 48 random bits (12).

    Ids sort by creation (as a UUIDv7's do), and within a process exactly, the same millisecond
    included: a batch published at once is claimed, acked and traced in that order, so the
    SQLite broker's index of ids, and of trace keys (which begin with their root's id), grows at
    one place rather than touching a random page of the millisecond's ids on every write. The
    random end keeps ids from two processes apart, and is what people see (``short_id``).
    Made as one 128-bit number's bytes in hex (0.4 us; formatting the parts cost 1.0).
    """
    count = next(_ids_made) & 0xFFFF_FFFF
    bits = (time.time_ns() // 1_000_000) << 80 | count << 48 | _id_bits.getrandbits(48)
    return bits.to_bytes(16, "big").hex()


#: How many characters of an id people see (text logs, tables, the summary).
SHORT_ID_CHARS = 8


def short_id(task_id: str) -> str:
    """The form of a task id shown to people: its last SHORT_ID_CHARS characters.

    An id's start is its creation time, the same for every task made in the same moment; its
    end is random (32 bits of it here), so it tells tasks apart: two of 1,000 dead letters
    share it with odds of about 1 in 9,000. ``dq-run dlq show`` takes it, as it takes any end or
    start of an id of 6 characters or more that only one record has.
    """
    return task_id[-SHORT_ID_CHARS:]


_C = TypeVar("_C")


def quick_init(cls: type[_C]) -> type[_C]:
    """``cls`` (a frozen dataclass) with an ``__init__`` that sets each field through its slot's
    descriptor (or, without slots, in the instance's ``__dict__``): the one dataclasses writes
    calls ``object.__setattr__`` per field (how a frozen class sets its own fields), which made
    a Task cost 2.1 us to build against 0.85 us, and a TaskContext 1.3 us (two Tasks and a
    TaskContext are built per task run; a Delivery per hand-out, 0.55 us against 0.30; a
    pipeline task's ack Effects and trace line's SetValue, 0.78 and 0.41 us against 0.45 and
    0.25). Same signature, defaults and factories; a class this does not fit (a field left
    out of ``__init__`` or keyword-only, a ``__post_init__``) is refused."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    if (
        not params.frozen
        or hasattr(cls, "__post_init__")
        or any(not f.init or f.kw_only for f in fields)
    ):
        raise TypeError(f"quick_init does not fit {cls.__name__}")
    slots = "__slots__" in cls.__dict__
    scope: dict[str, Any] = {"MISSING": dataclasses.MISSING}
    args, body = [], [] if slots else ["    fields = self.__dict__\n"]
    for f in fields:
        if slots:
            scope[f"set_{f.name}"] = getattr(cls, f.name).__set__
        value = f.name
        if f.default is not dataclasses.MISSING:
            scope[f"default_{f.name}"] = f.default
            args.append(f"{f.name}=default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"factory_{f.name}"] = f.default_factory
            args.append(f"{f.name}=MISSING")
            value = f"factory_{f.name}() if {f.name} is MISSING else {f.name}"
        else:
            args.append(f.name)
        if slots:
            body.append(f"    set_{f.name}(self, {value})\n")
        else:
            body.append(f"    fields[{f.name!r}] = {value}\n")
    source = f"def __init__(self, {', '.join(args)}):\n{''.join(body)}"
    exec(source, scope)  # how dataclasses writes __init__ too
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """What happened in one failed attempt."""

    attempt: int
    error_type: str
    message: str
    traceback: str
    started_at: float  # epoch seconds
    duration_s: float
    worker: str  # "host:pid"

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "error_type": self.error_type,
            "message": self.message,
            "traceback": self.traceback,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "worker": self.worker,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttemptRecord:
        return cls(
            attempt=int(data["attempt"]),
            error_type=str(data["error_type"]),
            message=str(data["message"]),
            traceback=str(data.get("traceback", "")),
            started_at=float(data["started_at"]),
            duration_s=float(data["duration_s"]),
            worker=str(data.get("worker", "")),
        )


@quick_init
@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work. ``id`` is stable across attempts.

    ``attempt`` is the number of times a broker has handed the task out: 0 while it waits for
    its first run, 1 during its first run. Brokers count it at hand-out, so a task that kills its
    worker still uses up an attempt.
    """

    type: str
    payload: Any
    id: str = field(default_factory=new_task_id)
    attempt: int = 0
    enqueued_at: float = 0.0  # epoch seconds of the first publish
    not_before: float = 0.0  # epoch seconds; 0 means ready now
    history: tuple[AttemptRecord, ...] = ()
    #: Set by middleware as the task is published (``ctx.headers`` in the handler): a trace id,
    #: the simulator's fault plan. JSON values; not part of the payload, never validated by it.
    headers: Mapping[str, Any] = NO_HEADERS
    #: Epoch seconds after which the task is not run (dead-lettered as expired); 0: never.
    expires_at: float = 0.0
    #: Its unique key ("type:key", held in the broker as ``unique:<key>`` from its put until
    #: it is acked or dead-lettered, then for its type's ttl); "": none.
    unique_key: str = ""

    def with_failure(self, failure: AttemptRecord) -> Task:
        """This task with one more failed attempt in its (bounded) history."""
        return replace(self, history=(*self.history, failure)[-HISTORY_LIMIT:])

    def to_json(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "type": self.type,
            "payload": self.payload,
            "attempt": self.attempt,
            "enqueued_at": self.enqueued_at,
            "not_before": self.not_before,
            "history": [h.to_json() for h in self.history],
        }
        if self.headers:  # written only when there are some: older runners read the rest
            data["headers"] = dict(self.headers)
        if self.expires_at:  # likewise
            data["expires_at"] = self.expires_at
        if self.unique_key:  # likewise
            data["unique_key"] = self.unique_key
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], attempt: int | None = None) -> Task:
        """``attempt``, when given, replaces the stored one (brokers count it at hand-out).

        Built positionally, in the field order (every durable broker decodes every task it
        hands out here; with keywords, 3.11 gathers them in a dict first). A headers dict is
        kept, not copied: both callers pass what a JSON decoder just made, so a caller that
        kept ``data`` and changed it later would change this task's headers."""
        history = data.get("history")
        headers = data.get("headers")
        return cls(
            str(data["type"]),
            data.get("payload"),
            str(data["id"]),
            int(data.get("attempt", 0)) if attempt is None else attempt,
            float(data.get("enqueued_at", 0.0)),
            float(data.get("not_before", 0.0)),
            tuple(AttemptRecord.from_json(h) for h in history) if history else (),
            (headers if type(headers) is dict else dict(headers)) if headers else NO_HEADERS,
            float(data.get("expires_at", 0.0)),
            str(data.get("unique_key", "")),
        )


class WireName(str, enum.Enum):
    """A name that is its own wire string: ``str()``, f-strings and JSON give the value, so a
    member goes wherever the string went (log lines, records, metric labels) unchanged.

    What ``enum.StrEnum`` does from Python 3.11 on; we support 3.10. A plain ``(str, Enum)``
    would print as ``EventName.TASK_DEAD`` in f-strings and ``str()`` on 3.11 and later.
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class DeadReason(WireName):
    """Why a task is in the dead-letter queue: ``DeadLetter.reason``, the ``reason`` of a
    ``task.dead`` event, its log line and its ``dq_tasks_dead_total`` label.

    The values are stored in records (files, SQLite, Redis) and read back: never change one.
    docs/operating/dead-letters.md explains each to operators.
    """

    EXHAUSTED = "exhausted"  # every one of max_attempts attempts failed
    NEVER_RETRY = "never_retry"  # the handler raised an exception listed in never_retry
    PERMANENT = "permanent"  # the handler raised PermanentError
    MAX_DELIVERIES = "max deliveries"  # handed out more than max_attempts times: workers died
    INVALID_PAYLOAD = "invalid payload"  # the payload failed its handler's model; never ran
    UNDECODABLE = "undecodable"  # the stored task could not be decoded, or has no handler here
    SHUTDOWN = "shutdown"  # memory broker: still queued, in backoff or stuck at shutdown
    EXPIRED = "expired"  # not started before its expires_at; never ran (that time)
    CANCELLED = "cancelled"  # its pipeline was cancelled (dq-run cancel) before it ran
    UPSTREAM_DEAD = "upstream dead"  # a join whose part died: replay that part, not the join
    #: Not how a task died: what a stored dead-letter record that cannot itself be decoded is
    #: shown with (SQLite), so an operator can still see and purge it. Never a task.dead event.
    CORRUPT_RECORD = "corrupt record"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A task that will not run again unless replayed, and why."""

    task: Task
    reason: str  # a DeadReason; a plain str too, so that any version's records still load
    error_type: str
    message: str
    traceback: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    dead_at: float

    @property
    def id(self) -> str:
        return self.task.id

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task.to_json(),
            "reason": self.reason,
            "error_type": self.error_type,
            "message": self.message,
            "traceback": self.traceback,
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
            "last_attempt_at": self.last_attempt_at,
            "dead_at": self.dead_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeadLetter:
        return cls(
            task=Task.from_json(data["task"]),
            reason=str(data["reason"]),
            error_type=str(data["error_type"]),
            message=str(data["message"]),
            traceback=str(data.get("traceback", "")),
            attempts=int(data["attempts"]),
            first_attempt_at=float(data["first_attempt_at"]),
            last_attempt_at=float(data["last_attempt_at"]),
            dead_at=float(data["dead_at"]),
        )


class Cancellation:
    """``ctx.cancelled``: an Event-like flag (``is_set()``, ``wait(timeout)``, ``set()``).

    Handlers poll it far more rarely than tasks start, so the threading.Event behind
    ``wait()`` is made on first use instead of for every task. Creating it takes no lock (an
    interrupt could land in handler code holding one): ``dict.setdefault`` is atomic, so every
    waiter shares the first Event made, and ``set()`` reaches it whichever order they run in.
    """

    __slots__ = ("_box", "_set")

    def __init__(self) -> None:
        self._set = False
        self._box: dict[str, threading.Event] = {}

    def is_set(self) -> bool:
        return self._set

    def mark(self) -> None:
        """``is_set()`` answers True from now on, but no ``wait()`` is woken: takes no lock,
        for a signal handler, which may run while its own thread holds the Event's (inside
        ``wait()``). Call ``set()`` once that thread is out of it."""
        self._set = True

    def set(self) -> None:
        self._set = True
        event = self._box.get("event")
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set or ``timeout`` seconds pass; returns whether it is set."""
        if self._set:
            return True
        event = self._box.setdefault("event", threading.Event())
        if self._set:  # set() may have run before the Event existed
            event.set()
        return event.wait(timeout)


@quick_init
@dataclass(frozen=True)
class TaskContext:
    """What a handler may know about the task it runs; the optional second argument.

    ``cancelled`` is set when the task's timeout expires or the runner shuts down past its
    grace period; cooperative handlers should check it in long loops (``is_set()``) or sleep
    on it (``wait(seconds)``). ``logger`` carries the task's fields on every line.
    """

    task_id: str
    type: str
    attempt: int
    max_attempts: int
    deadline: float  # time.monotonic() value after which the attempt is interrupted
    cancelled: Cancellation
    make_logger: Callable[[], logging.LoggerAdapter[logging.Logger]] = field(repr=False)
    #: The task's headers (set by middleware at publish); read them, do not change them.
    headers: Mapping[str, Any] = NO_HEADERS

    @cached_property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        # Built on first use: most handlers never log, and getLogger takes a global lock.
        return self.make_logger()


def not_before_of(now: float, delay_s: float = 0.0, at: datetime | None = None) -> float:
    """A task's ``not_before`` (0: ready now) from a delay or an aware datetime, not both."""
    if at is None:
        return now + delay_s if delay_s > 0 else 0.0
    if delay_s:
        raise UsageError("give a delay or a time to run at, not both")
    if at.utcoffset() is None:
        raise UsageError(f"{at.isoformat()} has no time zone: give an aware datetime")
    when = at.timestamp()
    return when if when > now else 0.0  # a time in the past runs now


def expires_at_of(now: float, given: float | None, configured: float | None) -> float:
    """A task's ``expires_at`` (0: never) from the publish call's ``expires`` or, without one,
    its type's configured ``expires`` (seconds after ``now``)."""
    if given is not None and not given > 0:
        raise UsageError(f"expires must be a positive number of seconds, got {given!r}")
    seconds = given if given is not None else configured
    return now + seconds if seconds else 0.0


def require_type(type_name: str, known: Collection[str]) -> None:
    """UsageError unless ``type_name`` is one of the ``known`` task types (it lists them)."""
    if type_name not in known:
        raise UsageError(f"unknown task type {type_name!r} (known: {', '.join(sorted(known))})")


def replayable(task: Task) -> Task:
    """``task`` as a dead-letter record keeps it: without its expiry, as whoever replays the
    record wants it run."""
    return replace(task, expires_at=0.0) if task.expires_at else task


def unique_key_of(
    type_name: str, payload: Any, template: str | None, given: str | None = None
) -> str:
    """A task's unique key, ``type:key``: ``given`` (``publish(..., unique_key=)``), else its
    type's ``unique.key`` template filled from the payload (``{payload.user_id}``); "" when
    it has neither. A UsageError when the payload lacks a field the template names."""
    if given is not None:
        if not given:
            raise UsageError("unique_key must not be empty")
        return f"{type_name}:{given}"
    if template is None:
        return ""
    parts = []
    for literal, field_name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if field_name is None:
            continue
        value: Any = payload
        for step in field_name.split(".")[1:]:  # "payload.user.id": past "payload"
            if not isinstance(value, Mapping) or step not in value:
                raise UsageError(
                    f"a {type_name!r} task's unique key {template!r} names {{{field_name}}}, "
                    "which its payload does not have"
                )
            value = value[step]
        parts.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return f"{type_name}:{''.join(parts)}"
