"""distributed-queue: a config-driven background-task runner."""

from __future__ import annotations

from runner.config import PipelineConfig, load_config
from runner.errors import (
    BrokerClosed,
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    PermanentError,
    QueueFull,
    RunnerError,
    UsageError,
)
from runner.task import DeadLetter, Task, TaskContext

__all__ = [
    "BrokerClosed",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "DeadLetter",
    "PermanentError",
    "PipelineConfig",
    "QueueFull",
    "RunnerError",
    "Task",
    "TaskContext",
    "UsageError",
    "load_config",
]
