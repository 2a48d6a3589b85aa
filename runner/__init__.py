"""distributed-queue: a config-driven background-task runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.config.load import load_config
from runner.config.models import PipelineConfig
from runner.errors import (
    BrokerClosed,
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    InvalidPayload,
    PermanentError,
    QueueFull,
    Retry,
    RunnerError,
    UsageError,
)
from runner.middleware.base import Middleware
from runner.model import DeadLetter, Task, TaskContext

if TYPE_CHECKING:
    from runner.app import Runner, build_runtime


def __getattr__(name: str) -> Any:
    # The engine pulls in prometheus_client and rich; `dq-run validate` should not pay for them.
    if name in ("Runner", "build_runtime"):
        from runner import app

        return getattr(app, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


__all__ = [
    "BrokerClosed",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "DeadLetter",
    "InvalidPayload",
    "Middleware",
    "PermanentError",
    "PipelineConfig",
    "QueueFull",
    "Retry",
    "Runner",
    "RunnerError",
    "Task",
    "TaskContext",
    "UsageError",
    "build_runtime",
    "load_config",
]
