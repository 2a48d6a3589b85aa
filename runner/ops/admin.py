"""Operator operations behind ``dq-run publish``, ``dlq``, ``stats``, ``pause`` and ``resume``.

Plain functions over a validated config and a ``BrokerAdmin``; they return data and raise the
runner's errors, and the CLI only parses, calls and prints (runner.ops.views formats).

Everything goes through the broker's ``Broker`` / ``BrokerAdmin`` side, never raw SQL or keys,
so every shared broker (sqlite, redis, a ``module:Class`` one) works the same. A broker that is
not ``shared`` (memory) lives inside one ``dq-run`` process, so another process cannot publish
to it, replay into it or see its queue: those raise NotSupported and say why. Its dead letters
can still be listed, shown and purged when the config keeps them in a file
(``dead_letter: {kind: file, path: ...}``).

Publishing is all or nothing: every input is checked first (type, JSON, size, the handler's
pydantic model) and every problem is reported; only then are all tasks put in one ``put_many``,
which the broker applies atomically. Input with more tasks than ``broker.capacity`` could never
be queued at once, so it is refused before anything is put.

Size: about 580 lines: every operator command's work (publish, dead letters, replay, pause,
stats with its gates, buckets, circuits, unique keys and processes); the next split is stats
(its dataclasses and readers) into a module of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeGuard, TypeVar

from runner.app import wait_for_result
from runner.backends import broker_class, create_broker
from runner.brokers.base import (
    UNIQUE_PREFIX,
    Broker,
    BrokerAdmin,
    Bucket,
    Circuit,
    DeadLetterFilter,
    Depth,
    Pause,
    RateLimit,
)
from runner.config.models import PipelineConfig, parse_duration
from runner.config.models import parse_rate as config_parse_rate
from runner.deadletter.file import FileDeadLetters
from runner.engine import presence
from runner.errors import BrokerError, NotSupported, QueueFull, UsageError
from runner.model import (
    DeadLetter,
    Task,
    expires_at_of,
    not_before_of,
    require_type,
    unique_key_of,
)
from runner.ops.drafts import Draft

T = TypeVar("T")

#: The fewest characters of an id's end or start that ``dq-run dlq`` looks an id up by.
MIN_ID_CHARS = 6

#: A throttled replay sends about this many chunks per second (at least one task per chunk).
CHUNKS_PER_S = 10

_IN_PROCESS = "a {kind} broker lives inside the one dq-run process that runs it"
_NO_PUBLISH = (
    f"cannot publish: {_IN_PROCESS}, so tasks published from another process could never reach "
    "it; use a sqlite or redis broker (or a `simulate` section)"
)
_NO_STATS = (
    f"cannot show stats: {_IN_PROCESS}, and no other process can see its queue; the running "
    "process shows live progress and /metrics instead"
)
_NO_PIPELINE = (
    f"cannot {{command}}: {_IN_PROCESS}, so no other process can reach its pipelines; use "
    "Runner.cancel in that process, or a sqlite or redis broker"
)
_NO_PAUSE = (
    f"cannot {{command}}: {_IN_PROCESS}, so no other process can reach it; pause it from the "
    "process itself (Runner.pause), or use a sqlite or redis broker"
)
_NO_DLQ = (
    f"no dead letters to read: {_IN_PROCESS} and keeps them in memory, lost when it exits; "
    "keep them with `dead_letter: {{kind: file, path: ...}}`, or use a sqlite or redis broker"
)


# -- publish -------------------------------------------------------------------------------------


def require_shared(config: PipelineConfig, command: str) -> None:
    """Raise NotSupported (saying why) when ``command`` cannot work on the config's broker:
    one that is not ``shared`` cannot be reached from another process."""
    if not broker_class(config).shared:
        messages = {"publish": _NO_PUBLISH, "stats": _NO_STATS, "cancel": _NO_PIPELINE,
                    "trace": _NO_PIPELINE}  # fmt: skip
        message = messages.get(command, _NO_PAUSE)
        raise NotSupported(message.format(kind=config.broker.kind, command=command))


def publish(
    config: PipelineConfig,
    drafts: Sequence[Draft],
    delay_s: float = 0.0,
    at: datetime | None = None,
    expires_s: float | None = None,
    unique_key: str | None = None,
) -> list[tuple[str, str]]:
    """Put every draft as one all-or-nothing batch, held back ``delay_s`` or until ``at``,
    expiring ``expires_s`` from now (default: each type's ``expires``); returns, in input
    order, each task's id and "" or, for a unique task whose key is held (``unique_key``, or
    its type's ``unique.key``), the holder's id and the key (nothing was put for it).

    Blocks up to ``broker.enqueue_timeout`` for room, then QueueFull (nothing published).
    """
    require_shared(config, "publish")
    if len(drafts) > config.broker.capacity:
        raise UsageError(
            f"{len(drafts)} tasks exceed broker.capacity ({config.broker.capacity}): they could "
            "never be queued at once, so nothing was published; split the input"
        )
    now = time.time()
    not_before = not_before_of(now, delay_s, at)
    tasks = [
        Task(
            type=d.type,
            payload=d.payload,
            enqueued_at=now,
            not_before=not_before,
            expires_at=expires_at_of(now, expires_s, config.task_types[d.type].expires),
            unique_key=unique_key_of(d.type, d.payload, _template(config, d.type), unique_key),
        )
        for d in drafts
    ]
    broker = create_broker(config)
    try:
        if any(task.unique_key for task in tasks):
            answers = broker.put_unique(tasks)
        else:
            broker.put_many(tasks)
            answers = [task.id for task in tasks]
    except QueueFull as exc:
        raise QueueFull(f"{exc}; nothing was published") from exc
    finally:
        broker.close()
    return [
        (answer, "" if answer == task.id else task.unique_key)
        for task, answer in zip(tasks, answers, strict=True)
    ]


def _template(config: PipelineConfig, type_name: str) -> str | None:
    unique = config.task_types[type_name].unique
    return unique.key if unique else None


# -- the admin side --------------------------------------------------------------------------


class FileDeadLetterAdmin:
    """BrokerAdmin over the JSON Lines dead-letter file of a broker that is not shared (memory):
    list, show, purge."""

    def __init__(self, store: FileDeadLetters, kind: str = "memory") -> None:
        self.store = store
        self.kind = kind  # the broker's, for the messages

    def dead_letters(self, where: DeadLetterFilter) -> list[DeadLetter]:
        return self._reading(lambda: self.store.records(where))

    def purge(self, where: DeadLetterFilter) -> int:
        return self._reading(lambda: self.store.purge(where))

    def dead_letter_count(self) -> int:
        return self._reading(self.store.count)

    def replay(self, ids: Sequence[str]) -> int:
        in_process = _IN_PROCESS.format(kind=self.kind)
        raise NotSupported(
            f"cannot replay into a {self.kind} broker: {in_process}, so no other process can put "
            f"tasks into its queue; the records stay in {self.store.path}: replay them into the "
            f"next run with `dq-run run CONFIG --replay`"
        )

    def depth(self) -> dict[str, Depth]:
        raise NotSupported(_NO_STATS.format(kind=self.kind))

    def oldest_enqueued_at(self) -> dict[str, float]:
        raise NotSupported(_NO_STATS.format(kind=self.kind))

    def _reading(self, op: Callable[[], T]) -> T:
        try:
            return op()
        except ValueError as exc:  # a malformed line, named by FileDeadLetters
            raise BrokerError(str(exc)) from exc


@contextmanager
def open_admin(config: PipelineConfig, read_only: bool = False) -> Iterator[BrokerAdmin]:
    """The operator's side of the config's broker (or of its dead-letter file), closed after.

    ``read_only``: the caller only reads (stats, dlq list/show), so a read-only file will do
    (a SQLite queue, or a dead-letter file and its directory).
    A broker that is not ``shared`` cannot be reached from here: only a dead-letter file can.
    """
    kind = config.broker.kind
    if not broker_class(config).shared:
        if config.dead_letter.kind != "file" or not config.dead_letter.path:
            raise NotSupported(_NO_DLQ.format(kind=kind))
        mode = int(config.dead_letter.file_mode, 8)  # a replay's rewrite keeps the file's mode
        store = FileDeadLetters(config.dead_letter.path, mode, read_only=read_only)
        yield FileDeadLetterAdmin(store, kind)
        return
    broker = create_broker(config, read_only=read_only)
    try:
        if not isinstance(broker, BrokerAdmin):
            raise NotSupported(f"the {kind} broker has no operator side")
        yield broker
    finally:
        broker.close()


# -- dead letters --------------------------------------------------------------------------


def dead_letter_filter(
    type_name: str | None = None,
    error: str | None = None,
    since: str | None = None,
    ids: Sequence[str] = (),
    now: float | None = None,
) -> DeadLetterFilter:
    """The filter for CLI options; ``since`` is a duration (``1h``, ``30m``) back from now."""
    cutoff = None
    if since is not None:
        cutoff = (time.time() if now is None else now) - parse_duration_option("--since", since)
    return DeadLetterFilter(
        ids=frozenset(ids) if ids else None, type=type_name, error=error, since=cutoff
    )


def find_dead_letter(admin: BrokerAdmin, task_id: str) -> DeadLetter:
    """The record with this task id, or the only one whose id ends or starts with it.

    Tables and logs show an id's end (runner.model.short_id), so that is what people type; the
    start, its creation time, is shared by ids made together. Raises UsageError when nothing
    matches or when several do (saying how many).
    """
    exact = admin.dead_letters(DeadLetterFilter(ids=frozenset({task_id})))
    if exact:
        return exact[0]
    matches = _id_matches(admin.dead_letters(DeadLetterFilter()), task_id)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"{task_id!r} matches {len(matches)} dead letters; give more of it")
    raise UsageError(f"no dead letter with id {task_id!r}{_too_short(task_id)}")


def resolve_ids(admin: BrokerAdmin, given: Sequence[str]) -> list[str]:
    """The whole ids of the dead letters ``given`` names, each by its whole id or a unique end
    or start (as find_dead_letter); one that names none is kept as given (the caller reports it
    missing); one that names several raises UsageError."""
    if not given:
        return []
    known = {r.id for r in admin.dead_letters(DeadLetterFilter(ids=frozenset(given)))}
    records = admin.dead_letters(DeadLetterFilter()) if set(given) - known else []
    out: list[str] = []
    for task_id in given:
        matches = [] if task_id in known else _id_matches(records, task_id)
        if len(matches) > 1:
            raise UsageError(f"{task_id!r} matches {len(matches)} dead letters; give more of it")
        out.append(matches[0].id if matches else task_id)
    return out


def _id_matches(records: Sequence[DeadLetter], part: str) -> list[DeadLetter]:
    if len(part) < MIN_ID_CHARS:
        return []
    return [r for r in records if r.id.endswith(part) or r.id.startswith(part)]


def _too_short(part: str) -> str:
    if len(part) < MIN_ID_CHARS:
        return f" (an id's end or start needs {MIN_ID_CHARS} characters or more)"
    return ""


def select_for_replay(
    admin: BrokerAdmin, ids: Sequence[str], replay_all: bool, where: DeadLetterFilter
) -> tuple[list[DeadLetter], list[str]]:
    """The records to replay, and the given ids that matched nothing."""
    if isinstance(admin, FileDeadLetterAdmin):
        admin.replay(())  # refuses, saying why; before a dry run would suggest otherwise
    if ids and replay_all:
        raise UsageError("give either IDs or --all, not both")
    if not ids and not replay_all:
        raise UsageError("name the dead letters to replay (ID...) or pass --all")
    records = admin.dead_letters(where)
    found = {r.id for r in records}
    return records, [i for i in dict.fromkeys(ids) if i not in found]


def parse_rate(text: str) -> float:
    """``10/s``, ``30/m`` or ``100/h`` -> tasks per second; raises UsageError."""
    try:
        return config_parse_rate(text)
    except ValueError as exc:
        raise UsageError(f"--rate {text!r}: {exc}") from None


def replay(
    admin: BrokerAdmin,
    ids: Sequence[str],
    rate_per_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Put these dead letters back (attempt reset); returns how many moved.

    With a rate, tasks go back in chunks of about ``rate / CHUNKS_PER_S`` (at least one),
    each chunk starting no earlier than ``index / rate`` seconds after the first, so that a
    recovering dependency is not flooded. A full queue stops the replay with QueueFull saying
    how many went back; the rest stay in the dead-letter queue.
    """
    chunk = len(ids) or 1
    if rate_per_s is not None:
        chunk = max(1, int(rate_per_s / CHUNKS_PER_S))
    start = clock()
    moved = 0
    for index in range(0, len(ids), chunk):
        if rate_per_s is not None:
            wait = start + index / rate_per_s - clock()
            if wait > 0:
                sleep(wait)
        try:
            moved += admin.replay(ids[index : index + chunk])
        except QueueFull as exc:
            raise QueueFull(
                f"{exc}; replayed {moved} of {len(ids)}, the rest are still dead letters"
            ) from exc
    return moved


def held_unique(admin: BrokerAdmin, records: Sequence[DeadLetter]) -> dict[str, str]:
    """The records whose unique key is held now (by a task queued since): id -> the holder.
    Replay skips them (they would run the same key twice)."""
    keyed = [r for r in records if r.task.unique_key]
    if not keyed or not _keeps_values(admin):
        return {}
    held = admin.read_values([UNIQUE_PREFIX + r.task.unique_key for r in keyed])
    return {
        r.id: held[UNIQUE_PREFIX + r.task.unique_key]
        for r in keyed
        if held.get(UNIQUE_PREFIX + r.task.unique_key, r.id) != r.id
    }


def purge(admin: BrokerAdmin, records: Sequence[DeadLetter]) -> int:
    """Delete exactly these records (not whatever matches the filter by now)."""
    if not records:
        return 0
    return admin.purge(DeadLetterFilter(ids=frozenset(r.id for r in records)))


# -- pause and resume ----------------------------------------------------------------------


def pause(config: PipelineConfig, type_name: str, for_s: float | None = None) -> Pause:
    """Stop every process from being handed ``type_name``'s tasks (for ``for_s`` seconds on the
    broker's clock, or until resumed); tasks running now finish. Returns the gate set."""
    broker = _gated_broker(config, type_name, "pause")
    try:
        gate = Pause(until=None if for_s is None else broker.now() + for_s)
        broker.set_gate(type_name, gate)
        return gate
    finally:
        broker.close()


def resume(config: PipelineConfig, type_name: str) -> bool:
    """Hand ``type_name``'s tasks out again; False when it was not paused."""
    broker = _gated_broker(config, type_name, "resume")
    try:
        return broker.clear_gate(type_name, Pause)
    finally:
        broker.close()


def _gated_broker(config: PipelineConfig, type_name: str, command: str) -> Broker:
    require_shared(config, command)
    require_type(type_name, config.task_types)
    if not broker_class(config).gates_in_get:
        raise NotSupported(
            f"cannot {command}: the {config.broker.kind} broker has no gates (gates_in_get)"
        )
    return create_broker(config)


# -- stats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TypeStats:
    depth: Depth
    oldest_age_s: float | None


@dataclass(frozen=True)
class Stats:
    """What ``dq-run stats`` shows: per-type depth and age, the DLQ size."""

    types: dict[str, TypeStats]
    dead_letters: int
    # Paused types: until when (epoch seconds, broker's clock), None until resumed.
    paused: dict[str, float | None] = field(default_factory=dict)
    # Rate-limited types: the limit and its bucket now.
    rate_limits: dict[str, tuple[RateLimit, Bucket]] = field(default_factory=dict)
    # Types with a circuit breaker: the circuit now.
    circuits: dict[str, Circuit] = field(default_factory=dict)
    # Unique types: how many keys are held now (by queued tasks, or for their ttl).
    unique_held: dict[str, int] = field(default_factory=dict)
    # The running processes that share the broker: host, pid, types, started_at.
    processes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def oldest_age_s(self) -> float | None:
        ages = [s.oldest_age_s for s in self.types.values() if s.oldest_age_s is not None]
        return max(ages) if ages else None

    def to_json(self) -> dict[str, Any]:
        return {
            "types": {
                name: {
                    "ready": s.depth.ready,
                    "delayed": s.depth.delayed,
                    "leased": s.depth.leased,
                    "oldest_age_s": s.oldest_age_s,
                    "paused": name in self.paused,
                    "paused_until": self.paused.get(name),
                    "rate_limit": _rate_json(self.rate_limits.get(name)),
                    "circuit": _circuit_json(self.circuits.get(name)),
                    "unique_keys_held": self.unique_held.get(name),
                }
                for name, s in self.types.items()
            },
            "dead_letters": self.dead_letters,
            "oldest_age_s": self.oldest_age_s,
            "processes": self.processes,
        }


def stats(config: PipelineConfig, admin: BrokerAdmin, now: float | None = None) -> Stats:
    """Depth and oldest task age for every configured type (and any other the broker holds)."""
    require_shared(config, "stats")
    at = time.time() if now is None else now
    depth = admin.depth()
    oldest = admin.oldest_enqueued_at()
    names = sorted(set(config.task_types) | set(depth) | set(oldest))
    types = {
        name: TypeStats(
            depth=depth.get(name, Depth()),
            oldest_age_s=max(0.0, at - oldest[name]) if name in oldest else None,
        )
        for name in names
    }
    paused: dict[str, float | None] = {}
    limits: dict[str, RateLimit] = {}
    buckets: dict[str, Bucket] = {}
    circuits: dict[str, Circuit] = {}
    if isinstance(admin, Broker) and admin.gates_in_get:
        breakers = False
        for name, gates in admin.gates().items():
            for gate in gates:
                if isinstance(gate, Pause):
                    paused[name] = gate.until
                elif isinstance(gate, RateLimit):
                    limits[name] = gate
                else:
                    breakers = True
        buckets = admin.buckets() if limits else {}
        circuits = admin.circuits() if breakers else {}
    rate_limits = {n: (limit, buckets[n]) for n, limit in limits.items() if n in buckets}
    return Stats(
        types=types,
        dead_letters=admin.dead_letter_count(),
        paused=paused,
        rate_limits=rate_limits,
        circuits=circuits,
        unique_held=_unique_held(config, admin),
        processes=presence.processes(admin) if _keeps_values(admin) else [],
    )


def result(config: PipelineConfig, task_id: str, wait_s: float) -> dict[str, Any] | None:
    """``dq-run result``: the task's kept result, waiting up to ``wait_s`` for it."""
    if not broker_class(config).shared:
        raise NotSupported(
            f"cannot read results: {_IN_PROCESS.format(kind=config.broker.kind)}; read them in "
            "the process (Runner.result)"
        )
    broker = create_broker(config, read_only=True)
    try:
        return wait_for_result(broker, task_id, wait_s)
    finally:
        broker.close()


def _keeps_values(admin: BrokerAdmin) -> TypeGuard[Broker]:
    """Whether ``admin`` is a broker that keeps values (settle effects)."""
    return isinstance(admin, Broker) and admin.settle_effects


def _unique_held(config: PipelineConfig, admin: BrokerAdmin) -> dict[str, int]:
    """Per unique type, how many of its keys the broker holds (keys are ``unique:type:key``)."""
    unique = [name for name, spec in config.task_types.items() if spec.unique]
    if not unique or not _keeps_values(admin):
        return {}
    held = admin.scan_values(UNIQUE_PREFIX)
    return {
        name: sum(1 for key in held if key.startswith(f"{UNIQUE_PREFIX}{name}:")) for name in unique
    }


def _rate_json(held: tuple[RateLimit, Bucket] | None) -> dict[str, float] | None:
    if held is None:
        return None
    limit, bucket = held
    return {
        "rate": limit.rate,
        "burst": limit.burst,
        "tokens": bucket.tokens,
        "limited_s": bucket.limited_s,
    }


def _circuit_json(circuit: Circuit | None) -> dict[str, Any] | None:
    if circuit is None:
        return None
    return {
        "state": circuit.state,
        "since": circuit.since,
        "calls": circuit.calls,
        "failures": circuit.failures,
    }


def parse_delay(text: str | None) -> float:
    return 0.0 if text is None else parse_duration_option("--delay", text)


def parse_at(text: str | None, given_delay: bool = False) -> datetime | None:
    """``--at``: an ISO 8601 time with a zone offset (``Z`` for UTC) or None; a UsageError
    for anything else, a time without a zone, or ``--at`` beside ``--delay``."""
    if text is None:
        return None
    if given_delay:
        raise UsageError("give --delay or --at, not both")
    try:
        # Python 3.10's fromisoformat does not read "Z".
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--at {text!r}: expected an ISO 8601 time such as 2026-12-24T18:00:00+01:00"
        ) from None
    if when.utcoffset() is None:
        raise UsageError(
            f"--at {text!r} has no time zone: add an offset (+01:00) or Z for UTC, so that it "
            "means the same time on every machine"
        )
    return when


def parse_duration_option(option: str, text: str) -> float:
    """``text`` given to ``option`` as seconds, or a UsageError naming the option."""
    try:
        value = parse_duration(text)
    except ValueError:
        value = None
    if not isinstance(value, float) or value < 0:
        raise UsageError(f"{option} {text!r}: expected a duration such as 500ms, 10s, 5m or 1h")
    return value
