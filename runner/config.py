"""Configuration: pydantic models and load_config(), the only code that reads YAML or the environment.

Flow: YAML file -> ${VAR:-default} interpolation -> DQ_* environment overrides -> CLI flags ->
validated, frozen PipelineConfig. Durations are seconds (float) once validated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """`50ms`, `2s`, `1.5m`, `1h` or a number of seconds -> float seconds (others left to pydantic)."""
    if isinstance(value, bool):
        return value  # pydantic rejects it with a clear message
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use a number of seconds or 50ms, 2s, 1.5m, 1h")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(json_schema_extra={"pattern": _DURATION_RE.pattern, "examples": ["50ms", "2s", "1.5m"]}),
]

HANDLER_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
TYPE_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Model):
    """Where tasks wait. `memory` is in-process; `sqlite` and `redis` are durable and shared."""

    kind: Literal["memory", "sqlite", "redis"] = "memory"
    capacity: int = Field(1000, ge=1, description="max tasks held (queued, delayed or running)")
    overflow: Literal["block", "reject"] = "block"
    enqueue_timeout: Duration = Field(5.0, ge=0)
    path: str | None = Field(None, description="sqlite: database file")
    url: str | None = Field(None, description="redis: redis://host:port/db")
    namespace: str = Field("dq", pattern=r"^[A-Za-z0-9_.:-]+$", description="redis key prefix")
    visibility_timeout: Duration = Field(30.0, gt=0)


class BackoffPolicy(_Model):
    """delay(n) = min(max, initial * multiplier**(n-1)), scaled by a random factor in [1-jitter, 1+jitter]."""

    initial: Duration = Field(0.05, ge=0)
    max: Duration = Field(1.0, ge=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.1, ge=0, le=1)


class RetryPolicy(_Model):
    """How failed attempts are retried. max_attempts counts the first run."""

    max_attempts: int = Field(3, ge=1)
    backoff: BackoffPolicy = BackoffPolicy()
    never_retry: tuple[str, ...] = Field(
        (), description="exception names (builtins or module:Class) sent straight to the DLQ"
    )


class BackoffOverride(_Model):
    initial: Duration | None = Field(None, ge=0)
    max: Duration | None = Field(None, ge=0)
    multiplier: float | None = Field(None, ge=1)
    jitter: float | None = Field(None, ge=0, le=1)


class RetryOverride(_Model):
    """Per-type retry settings; unset fields fall back to the top-level `retry`."""

    max_attempts: int | None = Field(None, ge=1)
    backoff: BackoffOverride | None = None
    never_retry: tuple[str, ...] | None = None

    def apply_to(self, base: RetryPolicy) -> RetryPolicy:
        backoff = base.backoff
        if self.backoff is not None:
            backoff = backoff.model_copy(update=self.backoff.model_dump(exclude_none=True))
        return RetryPolicy(
            max_attempts=self.max_attempts if self.max_attempts is not None else base.max_attempts,
            backoff=backoff,
            never_retry=self.never_retry if self.never_retry is not None else base.never_retry,
        )


class TaskTypeConfig(_Model):
    """One kind of task: its handler and how it may run."""

    handler: str = Field(pattern=HANDLER_PATTERN, description="module:function")
    concurrency: int | None = Field(None, ge=1, description="max running at once per process")
    timeout: Duration = Field(10.0, gt=0)
    timeout_action: Literal["interrupt", "cancel"] = "interrupt"
    retry: RetryOverride | None = None


class DeadLetterConfig(_Model):
    """Where dead tasks go. Durable brokers keep them in the broker (the default there)."""

    kind: Literal["memory", "file", "broker"] | None = None
    path: str | None = Field(None, description="file: JSON Lines file")


class MetricsConfig(_Model):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class LoggingConfig(_Model):
    format: Literal["auto", "json", "text"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ShutdownConfig(_Model):
    grace: Duration = Field(10.0, ge=0)


class SimulatedFaults(_Model):
    """Fault injection for one simulated type; decided per task from the seed."""

    latency: tuple[Duration, Duration] = (0.01, 0.1)
    failure_rate: float = Field(0.0, ge=0, le=1)
    hang_rate: float = Field(0.0, ge=0, le=1)
    poison_rate: float = Field(0.0, ge=0, le=1)


class SimulateConfig(_Model):
    """The demo producer: publish `tasks` tasks drawn from `mix`, then exit when all are done."""

    tasks: int = Field(10, ge=0)
    mix: dict[str, int] = Field(default_factory=dict)
    seed: int = 42
    faults: dict[str, SimulatedFaults] = Field(default_factory=dict)


class PipelineConfig(_Model):
    """A whole pipeline, validated."""

    version: Literal[1] = 1
    broker: BrokerConfig = BrokerConfig()
    workers: int = Field(4, ge=1, le=1024)
    handler_paths: tuple[str, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    task_types: dict[str, TaskTypeConfig] = Field(min_length=1)
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    simulate: SimulateConfig | None = None

    @model_validator(mode="after")
    def _defaults_that_depend_on_others(self) -> PipelineConfig:
        # Filled here so every consumer sees concrete values.
        if self.dead_letter.kind is None:
            kind = "memory" if self.broker.kind == "memory" else "broker"
            object.__setattr__(self, "dead_letter", DeadLetterConfig(kind=kind, path=self.dead_letter.path))
        return self

    def retry_for(self, type_name: str) -> RetryPolicy:
        override = self.task_types[type_name].retry
        return override.apply_to(self.retry) if override else self.retry

    def concurrency_for(self, type_name: str) -> int:
        limit = self.task_types[type_name].concurrency
        return min(limit, self.workers) if limit is not None else self.workers


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Minimal loader (replaced by the full one with locations, env and interpolation)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for key, value in (overrides or {}).items():
        data[key] = value
    return PipelineConfig.model_validate(data)
