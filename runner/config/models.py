"""The config models: one frozen pydantic class per YAML section, with its field docs.

The field descriptions also make the JSON schema (runner.config.schema) and the reference.
Durations accept ``250ms``, ``2s``, ``5m``, ``1h`` or a number of seconds and are seconds (float)
once validated; rates accept ``N/s``, ``N/m``, ``N/h``.

Size: about 750 lines because it holds every model of the YAML file in one place, which is
where a reader looks for a key (the checks of schedule values are in runner.config.schedules).
The next split: the per-type flow-control models (rate limit, circuit breaker, unique) into a
module of their own, once the shared field types (Duration, ByteSize, Rate, _Model) move out
of this one.
"""

from __future__ import annotations

import math
import os
import re
import string
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from runner.config.kinds import (
    BROKER_KINDS,
    DEAD_LETTER_KINDS,
    broker_flags,
    default_dead_letter,
    kind_check,
)
from runner.config.numbers import boolean_problem
from runner.config.schedules import (
    MIN_EVERY_S,
    SCHEDULE_NAME_PATTERN,
    cron_expression,
    zone_name,
)
from runner.loader import CLASS_PATTERN, EXCEPTION_PATTERN, HANDLER_PATTERN

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")


# (multiplier, divisor): dividing by 1000 keeps "7132ms" == 7.132, where * 0.001 would not.
_UNIT_SECONDS = {"ms": (1, 1000), "s": (1, 1), "m": (60, 1), "h": (3600, 1), None: (1, 1)}


DURATION_PATTERN = r"^\s*(\d+(\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$"


RATE_PATTERN = r"^\s*(\d+(\.\d+)?)\s*/\s*(s|m|h)\s*$"


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


_RATE_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """``10/s``, ``30/m``, ``7200/h`` -> tasks per second (> 0); ValueError otherwise."""
    match = _RATE_RE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError("expected a positive N/s, N/m or N/h, e.g. 10/s")
    return float(match.group(1)) / _RATE_PER[match.group(2)]


def parse_duration(value: Any) -> Any:
    """`50ms`, `2s`, `1.5m`, `1h` or a number of seconds -> float seconds.

    Other types are returned unchanged for pydantic to reject with its own message.
    """
    if isinstance(value, bool):
        return value  # pydantic rejects it with a clear message
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f"invalid duration {value!r}: use a number of seconds or 50ms, 2s, 1.5m, 1h"
            )
        multiplier, divisor = _UNIT_SECONDS[match.group(2)]
        return float(match.group(1)) * multiplier / divisor
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(allow_inf_nan=False),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": "seconds: a number, or a number with a unit ms, s, m, h (50ms, 1.5m)",
            "examples": ["50ms", "2s", "1.5m", 30],
        }
    ),
]


"""Seconds: a number, or a string with a unit: ms, s, m, h (``50ms``, ``2s``, ``1.5m``)."""


#: A size, for the loader and the JSON schema alike (one pattern: they cannot drift apart):
#: editors check it with ECMA-262 regexes, which have no ignore-case flag, so each unit letter
#: is given in both cases.
SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([bB]|[kKmMgG][bB])?\s*$"
_SIZE_RE = re.compile(SIZE_PATTERN)
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(value: Any) -> Any:
    """``512MB``, ``2GB``, ``64KB`` (powers of 1024) or a number of bytes -> int bytes.

    Other types are returned unchanged for pydantic to reject with its own message.
    """
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"invalid size {value!r}: use a number of bytes or 64KB, 512MB, 2GB")
        unit = match.group(2).upper() if match.group(2) else None
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    return value


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "description": "bytes: a number, or a number with a unit KB, MB, GB (powers of 1024)",
            "examples": ["512MB", "2GB"],
        }
    ),
]
"""Bytes: a number, or a string with a unit: KB, MB, GB (``512MB``; powers of 1024)."""


TYPE_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


TypeName = Annotated[str, Field(pattern=TYPE_NAME_PATTERN)]


ScheduleName = Annotated[str, Field(pattern=SCHEDULE_NAME_PATTERN)]


ExceptionName = Annotated[
    str, Field(pattern=EXCEPTION_PATTERN, description="ValueError, or module:Class")
]


def _octal(value: Any) -> Any:
    # Unquoted, YAML 1.1 reads 0640 as the octal integer 416: write it back as octal text.
    if isinstance(value, int) and not isinstance(value, bool):
        return f"0{value:o}"
    return value


FileMode = Annotated[
    str,
    BeforeValidator(_octal),
    Field(pattern=r"^0?[0-7]{3}$", description="octal mode of files created, e.g. '0640'"),
]


def _file_name(value: str) -> str:
    # No file system takes one; os.open() would raise ValueError at the first write instead.
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    return value


#: A file or directory name from the config.
PathText = Annotated[str, AfterValidator(_file_name)]


def _kind_schema(names: tuple[str, ...]) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"enum": list(names), "type": "string"},
                {"type": "string", "pattern": CLASS_PATTERN},
            ]
        }
    )


#: A broker kind: a built-in name or a ``module:Class`` (runner.config.kinds).
BrokerKind = Annotated[
    str,
    AfterValidator(kind_check(tuple(BROKER_KINDS))),
    _kind_schema(tuple(BROKER_KINDS)),
]


#: A dead-letter kind: a built-in name or a ``module:Class`` store.
DeadLetterKind = Annotated[
    str,
    AfterValidator(kind_check(DEAD_LETTER_KINDS)),
    _kind_schema(DEAD_LETTER_KINDS),
]


Options = Annotated[
    dict[str, Any],
    Field(description="module:Class only: more keyword arguments for its constructor"),
]


#: How many coroutines of an async type run at once by default (``concurrency``).
ASYNC_CONCURRENCY = 100
#: How many children a process type has by default (``concurrency``): one per core.
PROCESS_CONCURRENCY = os.cpu_count() or 1
#: How long a process type's child has between SIGTERM and SIGKILL by default (``kill_grace``).
KILL_GRACE_S = 1.0
#: The settings of process types only.
PROCESS_KEYS = ("kill_grace", "max_tasks_per_child", "max_memory_per_child", "start_method")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # `workers: yes` is YAML 1.1's True, which pydantic's lax mode would take as 1.
        if info.field_name is not None:
            problem = boolean_problem(cls.model_fields[info.field_name], value)
            if problem:
                raise ValueError(problem)
        return value


class BrokerConfig(_Model):
    """Where tasks wait. `memory` is in-process; `sqlite` and `redis` are durable and shared."""

    kind: BrokerKind = Field(
        "memory",
        description="memory (in-process), sqlite (one file), redis (shared), or module:Class",
    )
    capacity: int = Field(1000, ge=1, description="max tasks held (queued, delayed or running)")
    overflow: Literal["block", "reject"] = Field(
        "block", description="when full: block up to enqueue_timeout, or reject at once"
    )
    enqueue_timeout: Duration = Field(5.0, ge=0, description="how long a put waits when full")
    path: PathText | None = Field(None, description="sqlite: database file (required for sqlite)")
    url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="redis: redis://host:port/db (required for redis)",
    )
    namespace: str = Field("dq", pattern=r"^[A-Za-z0-9_.:-]+$", description="redis key prefix")
    visibility_timeout: Duration = Field(
        30.0, gt=0, description="an unacked delivery is handed out again after this"
    )
    file_mode: FileMode = Field(
        "0600", description="sqlite: mode of a new database file (its WAL and shm follow it)"
    )
    options: Options = Field(default_factory=dict)


class BackoffPolicy(_Model):
    """delay(n) = min(max, initial * multiplier**(n-1)), times a random factor in 1 +- jitter."""

    initial: Duration = Field(0.05, ge=0, description="delay before the first retry")
    max: Duration = Field(1.0, ge=0, description="upper bound of any delay")
    multiplier: float = Field(2.0, ge=1, description="growth factor per attempt")
    jitter: float = Field(0.1, ge=0, le=1, description="random spread, a fraction of the delay")


class RetryPolicy(_Model):
    """How failed attempts are retried. max_attempts counts the first run."""

    max_attempts: int = Field(3, ge=1, description="attempts in all, the first run included")
    backoff: BackoffPolicy = BackoffPolicy()
    never_retry: tuple[ExceptionName, ...] = Field(
        (), description="exception names (builtins or module:Class) sent straight to the DLQ"
    )


class BackoffOverride(_Model):
    """Per-type backoff; unset fields come from retry.backoff."""

    initial: Duration | None = Field(None, ge=0)
    max: Duration | None = Field(None, ge=0)
    multiplier: float | None = Field(None, ge=1)
    jitter: float | None = Field(None, ge=0, le=1)


class RetryOverride(_Model):
    """Per-type retry settings; unset fields fall back to the top-level `retry`."""

    max_attempts: int | None = Field(None, ge=1)
    backoff: BackoffOverride | None = None
    never_retry: tuple[ExceptionName, ...] | None = Field(
        None, description="replaces (does not extend) retry.never_retry for this type"
    )

    def apply_to(self, base: RetryPolicy) -> RetryPolicy:
        backoff = base.backoff
        if self.backoff is not None:
            backoff = backoff.model_copy(update=self.backoff.model_dump(exclude_none=True))
        return RetryPolicy(
            max_attempts=self.max_attempts if self.max_attempts is not None else base.max_attempts,
            backoff=backoff,
            never_retry=self.never_retry if self.never_retry is not None else base.never_retry,
        )


def _rate_shorthand(value: Any) -> Any:
    # `rate_limit: 50/s` is `rate_limit: {rate: 50/s}`.
    return {"rate": value} if isinstance(value, str | int | float) else value


def _rate(value: Any) -> Any:
    """``50/s``, ``30/m``, ``7200/h`` -> tasks per second; a number is per second already."""
    return parse_rate(value) if isinstance(value, str) else value


Rate = Annotated[
    float,
    BeforeValidator(_rate),
    Field(gt=0, allow_inf_nan=False),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": RATE_PATTERN},
            ],
            "description": "tasks per second: a number, or N/s, N/m, N/h",
            "examples": ["50/s", "30/m", "7200/h"],
        }
    ),
]


class RateLimitConfig(_Model):
    """A token bucket for one task type, held in the broker for every process together."""

    rate: Rate = Field(description="tasks started per second, over time: 50/s, 30/m, 7200/h")
    burst: int | None = Field(
        None, ge=1, description="tasks that may start at once (default: one second's worth, >= 1)"
    )

    def effective_burst(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))


class CircuitBreakerConfig(_Model):
    """Stops handing out a type whose calls keep failing, for every process together."""

    failure_rate: float = Field(
        0.5, gt=0, le=1, description="share of failed calls in the window that opens it"
    )
    min_calls: int = Field(20, ge=1, description="calls in the window before it may open")
    window: Duration = Field(30.0, gt=0, description="the sliding window calls are counted in")
    open_for: Duration = Field(60.0, gt=0, description="how long it stays open before probing")
    half_open_calls: int = Field(3, ge=1, description="probes handed out once open_for has passed")


def _key_template(template: str) -> str:
    """A unique key template: text with ``{payload}`` or ``{payload.field.sub}`` fields."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"invalid key template {template!r}: {exc}") from None
    for name in fields:
        if name != "payload" and not name.startswith("payload."):
            raise ValueError(
                f"key template field {{{name}}}: use {{payload}} or {{payload.field}}, "
                "e.g. '{payload.user_id}'"
            )
    if not template:
        raise ValueError("the key template is empty")
    return template


class StageConfig(_Model):
    """One stage a task's success starts: a task of ``type`` (or one per item of ``each``)."""

    type: TypeName = Field(description="the task type it starts")
    each: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
        description="fan out: one task per item of the list at this key of the return value",
        examples=["images", "order.lines"],
    )
    max_fanout: int = Field(1000, ge=1, description="more items than this fail the parent")
    join: bool = Field(
        False,
        description="fan in: one task once every task of this one's fan-out group succeeded, "
        "with their return values in order as its payload",
    )


class OnDeadConfig(_Model):
    """Where a dead-lettered task's record goes: a task of ``type`` (a compensating step)."""

    type: TypeName = Field(description="the task type started with the record as its payload")


class ResultsConfig(_Model):
    """Keep each task's result: its return value, or why it died."""

    ttl: Duration = Field(3600.0, gt=0, description="how long a result is kept after it is set")


class UniqueConfig(_Model):
    """Publishing a task whose key is held adds nothing and returns the holder's id."""

    key: Annotated[str, AfterValidator(_key_template)] = Field(
        description="the task's key, from its payload: '{payload.user_id}' (the type is "
        "added: keys of two types never collide)",
        examples=["{payload.user_id}", "report-{payload.day}"],
    )
    ttl: Duration = Field(
        0.0, ge=0, description="how long the key stays held after the task is done or dead"
    )


class TaskTypeConfig(_Model):
    """One kind of task: its handler and how it may run."""

    handler: str = Field(
        pattern=HANDLER_PATTERN,
        description="module:function called as f(payload, ctx) or f(payload)",
        examples=["handlers.demo:send_email"],
    )
    execution: Literal["thread", "async", "process"] = Field(
        "thread",
        description="thread: a plain def on the worker threads; async: an async def awaited on "
        "the worker's event loop (its tasks take no thread); process: a plain def in a pool "
        "of child processes, one task at a time each (hard timeouts, every core)",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="max running at once per process (default: workers; async types: 100; "
        "process types: the CPU count, one child process each)",
    )
    timeout: Duration = Field(
        10.0, gt=0, description="per attempt; must stay below broker.visibility_timeout"
    )
    timeout_action: Literal["interrupt", "cancel"] = Field(
        "interrupt",
        description="interrupt: raise in the handler's thread (async: cancel its coroutine; "
        "process: SIGTERM its child); cancel: only set ctx.cancelled (process: the child is "
        "killed kill_grace later if it has not returned)",
    )
    kill_grace: Duration | None = Field(
        None,
        gt=0,
        description="process types: how long a child has between SIGTERM (or ctx.cancelled) "
        "and SIGKILL past its timeout (default 1s)",
    )
    max_tasks_per_child: int | None = Field(
        None, ge=1, description="process types: a child is replaced after this many tasks"
    )
    max_memory_per_child: ByteSize | None = Field(
        None,
        gt=0,
        description="process types: a child whose RSS is above this after a task is replaced "
        "(512MB, 2GB, or bytes)",
    )
    start_method: Literal["forkserver", "spawn"] | None = Field(
        None,
        description="process types: how children are started (default forkserver where the "
        "platform has it, else spawn)",
    )
    retry: RetryOverride | None = None
    expires: Duration | None = Field(
        None,
        gt=0,
        description="a task not started this long after it was published is not run: it is "
        "dead-lettered with reason expired (publish(..., expires=) overrides it)",
    )
    rate_limit: Annotated[RateLimitConfig, BeforeValidator(_rate_shorthand)] | None = Field(
        None,
        description="at most this many starts per second across every process: 50/s, or "
        "{rate: 50/s, burst: 10}",
    )
    results: ResultsConfig | None = Field(
        None, description="keep this type's results (overrides the top-level results)"
    )
    then: tuple[StageConfig, ...] = Field(
        (), description="tasks its success starts, put with its ack: [{type: next, each: items}]"
    )
    on_dead: OnDeadConfig | None = Field(
        None, description="start a task of this type with each dead-letter record: {type: undo}"
    )
    unique: UniqueConfig | None = Field(
        None, description="one task per key at a time: {key: '{payload.user_id}', ttl: 10m}"
    )
    circuit_breaker: CircuitBreakerConfig | None = Field(
        None,
        description="stop handing the type out while its calls keep failing ({} for defaults)",
    )


class ScheduleConfig(_Model):
    """One schedule: a task of ``type`` published on a clock, once per tick however many
    processes run the file (runner.engine.schedule)."""

    type: TypeName = Field(description="the task type it publishes")
    every: Duration | None = Field(
        None,
        ge=MIN_EVERY_S,
        description="fire every this long (ticks are multiples of it since the epoch, in UTC)",
    )
    cron: Annotated[str, AfterValidator(cron_expression)] | None = Field(
        None, description="fire by a cron expression ('0 3 * * *'), read in timezone"
    )
    timezone: Annotated[str, AfterValidator(zone_name)] | None = Field(
        None, description="cron only: the IANA zone the expression is read in (default UTC)"
    )
    jitter: Duration = Field(
        0.0, ge=0, description="each task's not_before is its tick plus up to this much"
    )
    payload: Any = Field(None, description="the payload of every task it publishes")
    missed: Literal["skip", "once", "all"] = Field(
        "once",
        description="ticks that passed while no worker ran: fire none of them (skip), the "
        "latest (once) or each one (all)",
    )

    @model_validator(mode="after")
    def _one_clock(self) -> ScheduleConfig:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of every and cron")
        if self.every is not None and self.timezone is not None:
            raise ValueError("timezone applies to cron only (every ticks are zone-free)")
        return self


class DeadLetterConfig(_Model):
    """Where dead tasks go. Durable brokers keep them in the broker (the default there)."""

    kind: DeadLetterKind | None = Field(
        None,
        description="memory, file, broker or module:Class (default: memory for the memory "
        "broker, broker for the others)",
    )
    path: PathText | None = Field(None, description="file: JSON Lines file (required for file)")
    file_mode: FileMode = Field("0600", description="file: mode of the files it creates")
    options: Options = Field(default_factory=dict)


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


class MetricsConfig(_Model):
    """Prometheus metrics served on http://host:port/metrics."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port")


class LoggingConfig(_Model):
    """Log lines: json (one object per event), text, or auto (text on a terminal, else json)."""

    format: Literal["auto", "json", "text"] = "auto"
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = "INFO"


class ShutdownConfig(_Model):
    """What the first SIGINT/SIGTERM does: stop taking tasks, let running ones finish."""

    grace: Duration = Field(10.0, ge=0, description="how long running handlers may finish")


class SimulatedFaults(_Model):
    """Fault injection for one simulated type; decided per task from the seed."""

    latency: tuple[Duration, Duration] = Field(
        (0.01, 0.1), description="[min, max] handler run time"
    )
    failure_rate: float = Field(0.0, ge=0, le=1, description="share of attempts that raise")
    hang_rate: float = Field(0.0, ge=0, le=1, description="share of attempts that hang")
    poison_rate: float = Field(0.0, ge=0, le=1, description="share of tasks that always fail")


class SimulateConfig(_Model):
    """The demo producer: publish `tasks` tasks drawn from `mix`, then exit when all are done."""

    tasks: int = Field(10, ge=0, description="how many tasks to publish")
    mix: dict[TypeName, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="task type -> relative weight"
    )
    seed: int = 42
    faults: dict[TypeName, SimulatedFaults] = Field(
        default_factory=dict, description="task type -> injected faults"
    )


#: The default prefetch per worker thread: deep on an in-process broker (neither durable nor
#: shared, as memory), shallow on the others; and the largest prefetch allowed.
DEEP_PREFETCH_PER_WORKER = 16


SHALLOW_PREFETCH_PER_WORKER = 2


MAX_PREFETCH = 4096


class MiddlewareConfig(_Model):
    """One of your own middlewares (runner.middleware.base.Middleware), around every task."""

    use: str = Field(
        pattern=CLASS_PATTERN,
        description="module:Class of a runner.middleware.Middleware subclass",
        examples=["myapp.tracing:TraceIds"],
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for its constructor"
    )


def _comma_list(value: Any) -> Any:
    # DQ_TYPES=resize,report and --types resize,report: a comma-separated string.
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class PipelineConfig(_Model):
    """A whole pipeline, validated."""

    version: Literal[1] = 1
    broker: BrokerConfig = BrokerConfig()
    workers: int = Field(4, ge=1, le=1024, description="worker threads in this process")
    prefetch: int | None = Field(
        None,
        ge=0,
        le=MAX_PREFETCH,
        description="tasks fetched ahead of free threads (default: 16 x workers on the "
        "memory broker, 2 x workers on the others)",
    )
    handler_paths: tuple[PathText, ...] = Field(
        (), description="extra import directories, relative to the config file"
    )
    types: Annotated[tuple[TypeName, ...], BeforeValidator(_comma_list)] | None = Field(
        None,
        description="run only these task types in this process (default: all): "
        "--types resize,report or DQ_TYPES=resize,report",
    )
    retry: RetryPolicy = RetryPolicy()
    task_types: dict[TypeName, TaskTypeConfig] = Field(
        min_length=1, description="task type name ([a-z][a-z0-9_]*) -> its settings"
    )
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    simulate: SimulateConfig | None = None
    results: ResultsConfig | None = Field(
        None, description="keep every type's results: {ttl: 1h} (runner.result, dq-run result)"
    )
    schedules: dict[ScheduleName, ScheduleConfig] = Field(
        default_factory=dict,
        description="schedule name ([a-z][a-z0-9_-]*) -> a task published on a clock",
    )
    middleware: tuple[MiddlewareConfig, ...] = Field(
        (), description="your own middlewares, applied in this order after the built-in ones"
    )

    @model_validator(mode="after")
    def _defaults_that_depend_on_others(self) -> PipelineConfig:
        # Filled here so every consumer sees concrete values.
        if self.dead_letter.kind is None:
            kind = default_dead_letter(self.broker.kind)
            dead_letter = self.dead_letter.model_copy(update={"kind": kind})
            object.__setattr__(self, "dead_letter", dead_letter)
        return self

    def retry_for(self, type_name: str) -> RetryPolicy:
        override = self.task_types[type_name].retry
        return override.apply_to(self.retry) if override else self.retry

    def effective_prefetch(self) -> int:
        """A buffer keeps threads from waiting for the broker: the next task is fetched while
        the last one runs, and in batches. On a durable broker it is shallow (two per thread,
        as Dramatiq's consumers): a worker that crashes uses up one attempt of every task it
        had fetched, run or not (attempts are counted at hand-out; the Worker runs a task
        handed out again with nothing prefetched beside it, so a task that kills its worker
        costs its neighbours that attempt once), and a prefetched task waits for this process
        while another may be idle. A broker that is neither durable nor shared (memory) keeps
        nothing across a crash and has no other process, so there a deep one costs nothing
        (runner.config.kinds says which flags a kind has)."""
        if self.prefetch is not None:
            return self.prefetch
        return self._default_prefetch()[0]

    def _default_prefetch(self) -> tuple[int, str]:
        flags = broker_flags(self.broker.kind)
        deep = not flags.durable and not flags.shared
        per_worker = DEEP_PREFETCH_PER_WORKER if deep else SHALLOW_PREFETCH_PER_WORKER
        if per_worker * self.workers > MAX_PREFETCH:
            return MAX_PREFETCH, f"{per_worker} x workers, at most {MAX_PREFETCH}"
        return per_worker * self.workers, f"{per_worker} x workers"

    def result_ttl_for(self, type_name: str) -> float:
        """How long the type's results are kept (0: not kept)."""
        results = self.task_types[type_name].results or self.results
        return results.ttl if results else 0.0

    def concurrency_for(self, type_name: str) -> int:
        """How many tasks of the type run at once: a thread type's are capped at ``workers``
        (they share the threads); an async type's are coroutines on the event loop; a process
        type's are child processes."""
        task_type = self.task_types[type_name]
        limit = task_type.concurrency
        if task_type.execution == "async":
            return ASYNC_CONCURRENCY if limit is None else limit
        if task_type.execution == "process":
            return PROCESS_CONCURRENCY if limit is None else limit
        return min(limit, self.workers) if limit is not None else self.workers

    def in_force(self) -> dict[tuple[str | int, ...], tuple[int, str]]:
        """Settings whose value in force is not the one set, by key path: (value, why).

        An unset prefetch or concurrency is computed from other settings; a concurrency above
        ``workers`` is capped at it. ``dq-run config`` prints these.
        """
        found: dict[tuple[str | int, ...], tuple[int, str]] = {}
        if self.prefetch is None:
            found[("prefetch",)] = self._default_prefetch()
        for name, task_type in self.task_types.items():
            path = ("task_types", name, "concurrency")
            if task_type.execution == "async":
                if task_type.concurrency is None:
                    found[path] = (ASYNC_CONCURRENCY, "the default of async types")
                continue
            if task_type.execution == "process":
                if task_type.concurrency is None:
                    found[path] = (PROCESS_CONCURRENCY, "the CPU count: process types' default")
                continue
            if task_type.concurrency is None:
                found[path] = (self.workers, "workers")
            elif task_type.concurrency > self.workers:
                found[path] = (self.workers, "capped at workers")
        return found
