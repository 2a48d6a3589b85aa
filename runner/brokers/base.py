"""The broker contract: one Protocol that memory, SQLite and Redis all implement.

A broker moves tasks; it never calls handlers, decides retries or logs business events.
Every broker passes the same suite, runner.testing.contract. The contract, in one line each:

- ``put_many`` is all-or-nothing. Capacity counts a task from put until ack or dead-letter
  (ready, delayed and leased tasks alike). When full, put blocks up to ``timeout`` (None: the
  broker's ``enqueue_timeout``) and then raises QueueFull (at once with ``overflow: reject``, or
  when the batch is larger than the whole capacity). A task put with a future ``not_before`` is
  delayed until then.
- ``get(slots, limit, timeout)`` hands out at most ``slots[type]`` tasks of each type and at most
  ``limit`` in all, FIFO within a type, never a task before its ``not_before``. It blocks up to
  ``timeout`` seconds for the first task and returns ``[]`` on timeout, on ``wake()``, and when
  ``close()`` is called while it waits. A wake is sticky: one that lands while no get waits
  ends the next get that finds nothing to hand out.
- Attempts are counted at hand-out: each Delivery's ``task.attempt`` is one more than the last
  (1 on the first run). A delivery whose lease expired (its worker died) is handed out again
  with ``redelivered=True`` and the next attempt number; the engine, not the broker, decides
  that too many deliveries means the dead-letter queue (reason ``max deliveries``).
- Every delivery holds a lease of ``visibility_timeout`` seconds, renewed by ``extend``.
  ``ack``, ``retry``, ``dead``, ``release`` and ``extend`` answer one ``Answer`` each:
  ``DONE`` (it took effect now), ``ALREADY_DONE`` (this receipt was settled by an earlier call:
  a call sent again because the reply to the first was lost, or a renewal racing the settle;
  nothing changes, and it is not an error) or ``FENCED`` (the lease has moved on to another
  delivery, or expired: nothing changes). The receipt fences stale workers, so a task
  completes once; only ``FENCED`` is a lost lease. A broker remembers settled receipts for at
  least one ``visibility_timeout`` after the settle (then they may answer ``FENCED``).
- ``retry(delivery, delay_s, failure)`` appends ``failure`` to the task's history and makes it
  ready again after ``delay_s``, keeping its attempt count. ``retry`` and ``release`` never
  block on capacity (the task already holds its place).
- ``release`` hands an unstarted task back at once (another consumer may get it immediately)
  and gives back its attempt: the next hand-out has the same attempt number and the same
  ``redelivered`` flag. It keeps its place: handed out before the tasks of its type that were
  not handed out yet (a released redelivery must not wait behind the whole queue).
- ``dead`` writes the dead-letter record and removes the task in one step (durable brokers: one
  transaction), so a task is never both queued and dead, nor neither.
- ``settle_many(ops)`` runs several of ack / retry / dead / release (``Settle`` values) in order
  and answers one ``Answer`` per op, each exactly what its own call would have answered, in one
  round trip or transaction where the broker can (the engine settles finished tasks this way, in the
  background, on durable brokers). When it raises, any of the ops may or may not have happened;
  the receipts make trying them again safe (an op that did happen then answers
  ``ALREADY_DONE``). A broker whose ops can fail one by one (the memory broker's dead letters
  go to a store of their own) goes on past a failing op and raises ``SettleIncomplete`` with
  the answers of the others, so that an ack is not held back by a dead letter beside it.
- ``exchange(ops, slots, limit)`` is ``settle_many(ops)`` followed by ``get(slots, limit, 0)``
  (it never blocks), in one round trip or transaction where the broker can: the engine sends
  finished tasks' settles along with its next fetch (from several threads at once, so it must
  be safe to call concurrently). It answers
  ``(answers, deliveries)``; when it raises, the settles may or may not have happened, as with
  ``settle_many``, and anything it may have handed out comes back when its lease expires.
- ``depth()`` counts each type's ready (due), delayed and leased tasks; a type with no tasks may
  be absent or all zeros.
- ``close()`` is idempotent and wakes every waiter: a blocked ``get`` returns ``[]``, a ``put``
  blocked on a full queue raises BrokerClosed. After close, every method except ``close`` and
  ``wake`` raises BrokerClosed.
- BrokerAdmin: ``dead_letters`` lists records (each keeps the task's attempt history);
  ``replay`` puts the tasks back with ``attempt`` reset to 0 (next hand-out is attempt 1),
  all or none, waiting for room like put; ``purge`` deletes records and returns how many.
  ``oldest_enqueued_at`` maps each type with queued tasks (ready, delayed or leased) to the
  earliest ``enqueued_at`` among them (epoch seconds of first publish); for ``dq-run stats``.

Gates and effects (brokers that declare ``gates_in_get`` / ``settle_effects``; the features
built on them, such as rate limits, circuit breakers and pipelines, need both):

- A **gate** is a callable-free description, stored in the broker per task type, that ``get``
  (and ``exchange``) evaluate inside the same claim, transaction or script that hands tasks
  out, and that may lower the type's free slots to 0. A task held back by a gate is simply not
  handed out: it uses no attempt, holds no lease and stays ready (``depth`` counts it). The
  gates are:

  - ``Pause(until)``: no task of the type is handed out until ``until`` (epoch seconds on the
    broker's clock) or, with ``until=None``, until ``clear_gate``.
  - ``RateLimit(rate, burst)``: a token bucket of ``burst`` tokens, refilled at ``rate`` per
    second of the broker's clock; each task handed out takes one, and a claim hands out at most
    as many of the type as there are whole tokens (a new bucket starts full). ``set_gate``
    with a new rate keeps the bucket's tokens (capped at the new burst); ``clear_gate`` drops
    the bucket too. ``buckets()`` reports each bucket refilled to now, with ``limited_s``: the
    seconds in all it held less than one token.
  - ``CircuitBreaker(failure_rate, min_calls, window_s, open_for_s, half_open_calls)``: the
    outcomes settles carry for the type (``Effects(circuit=True|False)``, applied with the
    settle) are counted in a sliding window; once at least ``min_calls`` were counted and
    ``failure_rate`` of them failed, the circuit opens and no task of the type is handed out
    for ``open_for_s``. Then it is half-open: at most ``half_open_calls`` probes are handed
    out, and the first outcome closes it (success) or opens it again (failure). Outcomes of a
    type without a breaker are not kept; ``set_gate`` again keeps the state, ``clear_gate``
    drops it. ``circuits()`` reports each as of now. The steps are runner.brokers.flow's.

  A blocked ``get`` notices a gate cleared or expired, or a token come, within its usual
  wake-up time. ``set_gate`` replaces the type's gate of the same kind (a type may have one of
  each kind); ``gates()`` lists those in force.
- **Effects** ride on a settle op (``Settle.effects``): tasks to put, keys to set (with an
  optional ttl) and keys to delete, applied in the same step (transaction, script, lock) as the
  settle, and only when it answers ``DONE``: a ``FENCED`` settle applies none of them, and an
  ``ALREADY_DONE`` resend does not apply them again. Puts never wait for or fail on capacity
  (like retries they may overshoot it; they are counted from then on); a put with a future
  ``not_before`` is delayed. ``read_values(keys)`` reads keys set this way; one whose ttl has
  run out reads as absent.
- ``put_if(key, expected, value, tasks)`` is a compare-and-set with a put (what a schedule's
  tick fires by): when ``key`` holds ``expected`` (None: the key is absent), it sets ``key`` to
  ``value`` (no ttl) and puts ``tasks``, in one step, and answers True; otherwise it changes
  nothing and answers False. It never waits for room: when the tasks do not fit it raises
  QueueFull and changes nothing (the key keeps ``expected``). ``tasks`` may be empty (a bare
  compare-and-set). ``scan_values(prefix)`` reads every live key that starts with ``prefix``;
  ``delete_values(keys)`` deletes keys and answers how many it deleted; ``set_values(sets)``
  sets keys (each with its optional ttl) in one step, outside any settle (what a running
  process's presence is kept by).
- ``put_unique(tasks, timeout)`` is ``put_many`` for tasks that may carry a ``unique_key``
  (unique tasks): a task whose key is held (the value ``unique:<key>`` is set: by an earlier
  ``put_unique``, or by a settle's effect whose ttl has not run out) is not put, and its answer
  is the id the key holds; the others are put, all or none, waiting for room as ``put_many``
  does, and each one's key is set to its own id (no ttl) in the same step. A later task of the
  same call with the key of an earlier one answers the earlier one's id. It answers one id per
  task, in order (a task put answers its own). The engine sets the key's ttl (or deletes it)
  with the task's ack or dead-letter, as a settle effect.
- **Pipelines.** An effect put whose task id is held (ready, delayed or leased) is skipped: it
  is already there (an ack's put of its own task comes after the ack, so it is not held then).
  An ``Arrival`` keeps its part under ``key`` at ``index`` (a part already kept at that index
  stays as it was); when all ``size`` parts are kept, in the same step, ``task`` is put (unless
  its id is held) with the list of the parts' values, in index order, as its payload, the parts
  are dropped, and the dead-letter record with ``task``'s id, if any, is deleted (a join that
  was dead-lettered because a part had died fires once that part is replayed and succeeds).
  ``delete_values([key])`` drops a join's kept parts. ``Effects.dead_letters`` are written to
  the broker's dead letters (its store, when it is not durable), each replacing the record of
  the same task id; ``Effects.unless`` names a key whose presence skips the puts, arrivals and
  dead letters of the settle (``dq-run cancel``).
- PipelineAdmin (the admin side of a broker with ``settle_effects``): ``tasks_of(root_id)``
  lists the queued tasks (ready, delayed or leased, with that state) whose id is ``root_id``
  or whose ``root_id`` header is;
  ``cancel(root_id, message)`` dead-letters those that are ready or delayed (reason
  ``cancelled``, ``message`` as the record's message, error type ``Cancelled``) in one step
  and answers their ids; leased ones are left to their workers.
- Time in gates and effects is the broker's (``now()``): Redis' ``TIME``, the machine's clock
  for SQLite and memory, never a calling process's own.

Capability flags: class attributes every broker declares, so that the runner, the operator
commands and the config defaults ask the class what it can do rather than compare kind names.
Each is read from the class, before any broker is built, as well as from a live broker:

- ``durable``: queued tasks and dead letters outlive the process (and its crash). A durable
  broker keeps its own dead letters, written in the same transaction that removes the task, so
  it is given no dead-letter store (a ``dead_letter`` other than ``broker`` is a config error).
  One that is not durable is built with ``dead_letters=`` (a runner.deadletter store); at a stop
  the runner moves what it still holds there (its ``drain_to_dead_letters``, if it has one), and
  its prefetch default is deep when it is not ``shared`` either (a crash loses the tasks anyway).
- ``shared``: other processes may put into and take from the same queue, so ``dq-run publish``,
  ``stats`` and ``dlq`` reach it from outside and the progress view counts the whole queue. One
  that is not shared lives in the process that runs it: those commands refuse, saying why.
- ``batch_settles``: each call costs a round trip, a transaction or a hold of a contended lock,
  so the engine settles finished tasks in batches, several per ``settle_many`` (sent with the
  next fetch, or from a background thread). False: each worker thread makes its own call.
- ``carry_settles`` (with ``batch_settles``): the dispatcher's next fetch carries the settles
  handed on meanwhile (``exchange``: one transaction or round trip for both). False: they go
  to the background thread's ``settle_many`` at once, and the fetch goes alone, so that the
  two calls overlap: right for a broker whose calls are network round trips on a connection
  per thread (Redis), where the server works on one while the process works on the other.

- ``gates_in_get`` and ``settle_effects``: the broker implements gates and effects (above).
  Without them ``set_gate``, ``clear_gate``, ``gates``, ``buckets``, ``circuits``,
  ``read_values``, ``put_if``, ``put_unique``, ``scan_values``, ``delete_values`` and
  ``set_values`` raise NotImplementedError, and so does a settle that carries effects.

``BaseBroker`` declares them (by default a durable, shared, batching broker without gates or
effects) and derives ``settle_many`` and ``exchange`` from the single calls; a backend may
override either with a faster one (one transaction, one script).

Size: about 680 lines, most of it the contract's text above, which every broker is written
and reviewed against; the code is the values, the Protocol and BaseBroker's defaults.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

from runner.errors import BrokerUnavailable
from runner.model import AttemptRecord, DeadLetter, DeadReason, Task, quick_init, replayable


@quick_init
@dataclass(frozen=True, slots=True)
class Delivery:
    """One hand-out of a task, identified by its receipt (the lease token)."""

    task: Task  # task.attempt is this delivery's attempt number (1 on the first run)
    receipt: str
    redelivered: bool = False
    # Set when the stored task could not be decoded; task then carries only id and type.
    decode_error: str | None = None


class Answer(enum.Enum):
    """A broker's answer to one settle or renewal under a delivery's receipt.

    Truthy when the op has taken effect (now, or under this receipt before); only ``FENCED``
    is falsy, and only ``FENCED`` means the lease was lost.
    """

    DONE = "done"
    ALREADY_DONE = "already done"
    FENCED = "fenced"

    def __bool__(self) -> bool:
        return self is not Answer.FENCED


class SettleIncomplete(BrokerUnavailable):
    """Raised by ``settle_many`` (and ``exchange``) when some of its ops failed (each with
    BrokerUnavailable; the first one's message is this one's) and the others took effect:
    ``answers`` holds one per op, None for each op that failed (not taken effect: try it
    again)."""

    def __init__(
        self, message: str, answers: Sequence[Answer | None], *, backend: str = ""
    ) -> None:
        super().__init__(message, backend=backend, operation="settle")
        self.answers = tuple(answers)


@dataclass(frozen=True, slots=True)
class Pause:
    """A gate: no task of the type is handed out until ``until`` (epoch seconds on the broker's
    clock), or until the gate is cleared when ``until`` is None."""

    until: float | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A gate: a token bucket. At most ``burst`` tasks of the type are handed out at once, and
    ``rate`` per second over time (broker's clock), for every consumer of the broker together."""

    rate: float  # tokens per second, > 0
    burst: float = 1.0  # the bucket's size, >= 1

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.burst >= 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """A gate: counts the type's outcomes (settle effects) in a sliding window and, once
    ``failure_rate`` of at least ``min_calls`` calls failed, opens: no task of the type is handed
    out for ``open_for_s``; then at most ``half_open_calls`` probes are, and the first outcome
    closes it again (success) or reopens it (failure). Broker's clock; runner.brokers.flow."""

    failure_rate: float  # 0 < rate <= 1
    min_calls: int
    window_s: float
    open_for_s: float
    half_open_calls: int = 1

    def __post_init__(self) -> None:
        if not (0 < self.failure_rate <= 1 and self.min_calls >= 1 and self.half_open_calls >= 1):
            raise ValueError(f"a circuit breaker needs 0 < failure_rate <= 1, min_calls >= 1 "
                             f"and half_open_calls >= 1, got {self}")  # fmt: skip
        if not (self.window_s > 0 and self.open_for_s > 0):
            raise ValueError(f"a circuit breaker needs a positive window and open_for: {self}")


CircuitState = Literal["closed", "open", "half_open"]

#: Every kind of gate.
Gate = Pause | RateLimit | CircuitBreaker


@dataclass(frozen=True, slots=True)
class Circuit:
    """A circuit-broken type's state, as ``Broker.circuits`` reports it (as of now)."""

    state: CircuitState
    since: float  # when it entered ``state`` (epoch seconds, broker's clock)
    window_start: float  # the current window's start (closed)
    calls: int = 0  # outcomes counted in the current window
    failures: int = 0
    prev_calls: int = 0  # in the window before it (weighted by how much of it still overlaps)
    prev_failures: int = 0
    probes: int = 0  # half-open: probes handed out


@dataclass(frozen=True, slots=True)
class Bucket:
    """A rate-limited type's token bucket, as ``Broker.buckets`` reports it (refilled to now)."""

    tokens: float
    at: float  # when ``tokens`` was computed (epoch seconds, broker's clock)
    limited_s: float = 0.0  # seconds in all that it held less than one token (type throttled)


@quick_init
@dataclass(frozen=True, slots=True)
class SetValue:
    """An effect: set ``key`` to ``value``; with ``ttl_s``, it reads as absent after that long."""

    key: str
    value: str
    ttl_s: float | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class Arrival:
    """An effect: one part of a join arrives (a pipeline's fan-in; see the module docstring).

    ``key`` names the join, ``index`` is this part's place among ``size`` and ``value`` its JSON
    text. When the last part arrives, ``task`` is put with the list of every part, in index
    order, as its payload (its own payload is not used).
    """

    key: str
    index: int
    size: int
    value: str
    task: Task


@quick_init
@dataclass(frozen=True, slots=True)
class Effects:
    """What a settle also does, in the same step and only when it answers DONE."""

    puts: tuple[Task, ...] = ()
    sets: tuple[SetValue, ...] = ()
    deletes: tuple[str, ...] = ()
    # An outcome of the settled task's type for its circuit breaker (True: succeeded), counted
    # only when the type has one.
    circuit: bool | None = None
    arrivals: tuple[Arrival, ...] = ()
    # Dead-letter records written with the settle (a join whose part died), each replacing a
    # record of the same task id.
    dead_letters: tuple[DeadLetter, ...] = ()
    # When this key is set (a live value), the puts, arrivals and dead_letters are skipped (a
    # cancelled pipeline's hand-offs); the settle, sets, deletes and circuit outcome still apply.
    unless: str | None = None


SettleKind = Literal["ack", "retry", "dead", "release"]


class Settle(NamedTuple):
    """How one delivery ends, for ``settle_many``: the arguments of ack / retry / dead / release.

    ``retry`` carries ``failure`` (and ``delay_s``), ``dead`` carries ``record``. (A NamedTuple:
    the engine builds one per task, and a frozen dataclass costs several times as much.)
    """

    delivery: Delivery
    kind: SettleKind
    delay_s: float = 0.0
    failure: AttemptRecord | None = None
    record: DeadLetter | None = None
    effects: Effects | None = None


@dataclass(frozen=True, slots=True)
class Depth:
    """How many tasks of one type are where."""

    ready: int = 0
    delayed: int = 0
    leased: int = 0

    @property
    def total(self) -> int:
        return self.ready + self.delayed + self.leased


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operator command applies to; None means any."""

    ids: frozenset[str] | None = None
    type: str | None = None
    error: str | None = None  # error_type name, e.g. "TimeoutError"
    since: float | None = None  # epoch seconds; records that died at or after it

    def matches(self, record: DeadLetter) -> bool:
        return (
            (self.ids is None or record.id in self.ids)
            and (self.type is None or record.task.type == self.type)
            and (self.error is None or record.error_type == self.error)
            and (self.since is None or record.dead_at >= self.since)
        )


@runtime_checkable
class Broker(Protocol):
    """The engine's view of a broker. See the module docstring for the contract and the flags."""

    durable: ClassVar[bool]
    shared: ClassVar[bool]
    batch_settles: ClassVar[bool]
    carry_settles: ClassVar[bool]
    gates_in_get: ClassVar[bool]
    settle_effects: ClassVar[bool]

    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None: ...

    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]: ...

    def ack(self, delivery: Delivery) -> Answer: ...

    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer: ...

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer: ...

    def release(self, delivery: Delivery) -> Answer: ...

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]: ...

    def exchange(
        self, ops: Sequence[Settle], slots: Mapping[str, int], limit: int
    ) -> tuple[list[Answer], list[Delivery]]: ...

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]: ...

    def wake(self) -> None: ...

    def depth(self) -> dict[str, Depth]: ...

    def close(self) -> None: ...

    def now(self) -> float: ...

    def set_gate(self, type_name: str, gate: Gate) -> None: ...

    def clear_gate(self, type_name: str, kind: type[Gate]) -> bool: ...

    def gates(self) -> dict[str, tuple[Gate, ...]]: ...

    def buckets(self) -> dict[str, Bucket]: ...

    def circuits(self) -> dict[str, Circuit]: ...

    def read_values(self, keys: Sequence[str]) -> dict[str, str]: ...

    def put_if(self, key: str, expected: str | None, value: str, tasks: Sequence[Task]) -> bool: ...

    def put_unique(self, tasks: Sequence[Task], timeout: float | None = None) -> list[str]: ...

    def scan_values(self, prefix: str) -> dict[str, str]: ...

    def delete_values(self, keys: Sequence[str]) -> int: ...

    def set_values(self, sets: Sequence[SetValue]) -> None: ...


@runtime_checkable
class BrokerAdmin(Protocol):
    """The operator's view of a broker: dead letters and statistics (used by the CLI)."""

    def dead_letters(self, where: DeadLetterFilter) -> list[DeadLetter]: ...

    def replay(self, ids: Sequence[str]) -> int: ...

    def purge(self, where: DeadLetterFilter) -> int: ...

    def dead_letter_count(self) -> int: ...

    def depth(self) -> dict[str, Depth]: ...

    def oldest_enqueued_at(self) -> dict[str, float]: ...


@runtime_checkable
class Watched(Protocol):
    """A broker in this process that tells when it changed with no get waiting (``watch``:
    the hook is called without the broker's lock; one hook per broker, False for a second)
    and whether anything in it falls due by the clock alone, leases aside (``timers_idle``).
    On such a broker the engine's leader may leave the next blocking get to whichever thread
    idles next (runner.engine.books): in the first worker on it only."""

    def watch(self, hook: Callable[[], None]) -> bool: ...

    def timers_idle(self) -> bool: ...


@runtime_checkable
class PipelineAdmin(Protocol):
    """The operator's view of a pipeline's queued tasks (``dq-run trace`` and ``cancel``): the
    admin of every broker with ``settle_effects`` has it."""

    def tasks_of(self, root_id: str) -> list[Queued]: ...

    def cancel(self, root_id: str, message: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued task as ``BrokerAdmin.tasks_of`` lists it."""

    task: Task
    state: Literal["ready", "delayed", "leased"]


def of_root(task: Task, root_id: str) -> bool:
    """Whether ``task`` belongs to the pipeline whose first task is ``root_id``."""
    return task.id == root_id or task.headers.get("root_id") == root_id


def cancelled_record(task: Task, message: str, now: float) -> DeadLetter:
    """The dead-letter record ``PipelineAdmin.cancel`` writes for a queued ``task`` at ``now``:
    reason ``cancelled``, replayable (no expiry: a replay runs it)."""
    return DeadLetter(
        task=replayable(task),
        reason=DeadReason.CANCELLED,
        error_type="Cancelled",
        message=message,
        traceback="",
        attempts=task.attempt,
        first_attempt_at=task.history[0].started_at if task.history else now,
        last_attempt_at=task.history[-1].started_at if task.history else now,
        dead_at=now,
    )


class BaseBroker(abc.ABC):
    """A broker's defaults: the capability flags, and what follows from the single calls.

    A subclass implements the abstract methods (the contract is the module docstring) and sets
    the flags that differ. ``settle_many`` is one call per op; ``exchange`` is ``settle_many``
    then ``get`` without blocking. Both are as safe to call concurrently as the calls they make.
    """

    durable: ClassVar[bool] = True
    shared: ClassVar[bool] = True
    batch_settles: ClassVar[bool] = True
    carry_settles: ClassVar[bool] = True
    gates_in_get: ClassVar[bool] = False
    settle_effects: ClassVar[bool] = False

    @abc.abstractmethod
    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None: ...

    @abc.abstractmethod
    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]: ...

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> Answer: ...

    @abc.abstractmethod
    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer: ...

    @abc.abstractmethod
    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer: ...

    @abc.abstractmethod
    def release(self, delivery: Delivery) -> Answer: ...

    @abc.abstractmethod
    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]: ...

    @abc.abstractmethod
    def wake(self) -> None: ...

    @abc.abstractmethod
    def depth(self) -> dict[str, Depth]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def now(self) -> float:
        """The broker's clock: the time its gates and effects are evaluated by."""
        return time.time()

    def set_gate(self, type_name: str, gate: Gate) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no gates (gates_in_get is False)")

    def clear_gate(self, type_name: str, kind: type[Gate]) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no gates (gates_in_get is False)")

    def gates(self) -> dict[str, tuple[Gate, ...]]:
        raise NotImplementedError(f"{type(self).__name__} has no gates (gates_in_get is False)")

    def buckets(self) -> dict[str, Bucket]:
        raise NotImplementedError(f"{type(self).__name__} has no gates (gates_in_get is False)")

    def circuits(self) -> dict[str, Circuit]:
        raise NotImplementedError(f"{type(self).__name__} has no gates (gates_in_get is False)")

    def read_values(self, keys: Sequence[str]) -> dict[str, str]:
        raise _no_effects(self)

    def put_if(self, key: str, expected: str | None, value: str, tasks: Sequence[Task]) -> bool:
        raise _no_effects(self)

    def put_unique(self, tasks: Sequence[Task], timeout: float | None = None) -> list[str]:
        raise _no_effects(self)

    def scan_values(self, prefix: str) -> dict[str, str]:
        raise _no_effects(self)

    def delete_values(self, keys: Sequence[str]) -> int:
        raise _no_effects(self)

    def set_values(self, sets: Sequence[SetValue]) -> None:
        raise _no_effects(self)

    def settle_many(self, ops: Sequence[Settle]) -> list[Answer]:
        return settle_each(self, ops)

    def exchange(
        self, ops: Sequence[Settle], slots: Mapping[str, int], limit: int
    ) -> tuple[list[Answer], list[Delivery]]:
        return self.settle_many(ops), self.get(slots, limit, 0)


#: The prefix of a unique task's key among the broker's values (``put_unique``).
UNIQUE_PREFIX = "unique:"
#: The prefix of a task's kept result among the broker's values (set with its ack or dead).
RESULT_PREFIX = "result:"


def _no_effects(broker: object) -> NotImplementedError:
    return NotImplementedError(
        f"{type(broker).__name__} has no settle effects (settle_effects is False)"
    )


def settle_each(broker: Broker, ops: Sequence[Settle]) -> list[Answer]:
    """``settle_many`` for a broker whose single calls cost no round trip: one call per op.

    The single calls carry no effects: a broker with ``settle_effects`` has its own
    ``settle_many``.
    """
    if any(op.effects is not None for op in ops):
        raise _no_effects(broker)
    return [settle_one(broker, op) for op in ops]


def settle_apart(
    settle: Callable[[Settle], Answer], ops: Sequence[Settle], backend: str
) -> list[Answer]:
    """Each op by ``settle``, one after the other: one that fails with BrokerUnavailable is
    answered None and the others go on; then SettleIncomplete carries every answer (raised
    from the first failure, whose message it has)."""
    answers: list[Answer | None] = []
    failed: BrokerUnavailable | None = None
    for op in ops:
        try:
            answers.append(settle(op))
        except BrokerUnavailable as exc:
            failed = failed or exc
            answers.append(None)
    if failed is not None:
        raise SettleIncomplete(str(failed), answers, backend=backend) from failed
    return answers  # type: ignore[return-value]  # no None: nothing failed


class SingleCalls(Protocol):
    """The four single calls a settle op stands for (a Broker has them; so may a backend's
    own lock-held versions of them, as the memory broker's)."""

    def ack(self, delivery: Delivery) -> Answer: ...

    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer: ...

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer: ...

    def release(self, delivery: Delivery) -> Answer: ...


def settle_one(broker: Broker, op: Settle) -> Answer:
    """``op`` as the single call it stands for (one that carries effects: ``settle_many``)."""
    if op.effects is not None:
        return broker.settle_many([op])[0]
    return single_call(broker, op)


def single_call(broker: SingleCalls, op: Settle) -> Answer:
    """``op`` as the single call it stands for, on ``broker``; its effects are not applied."""
    if op.kind == "ack":
        return broker.ack(op.delivery)
    if op.kind == "release":
        return broker.release(op.delivery)
    if op.kind == "retry":
        assert op.failure is not None, "a retry carries its failure"
        return broker.retry(op.delivery, op.delay_s, op.failure)
    assert op.record is not None, "a dead-letter carries its record"
    return broker.dead(op.delivery, op.record)
