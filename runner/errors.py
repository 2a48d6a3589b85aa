"""The one exception tree of the runner.

::

    RunnerError                     root of everything the runner raises on purpose
    ├── ConfigError                 the configuration is invalid (carries every problem)
    ├── UsageError                  a CLI call is malformed (bad payload, unknown type, ...)
    │   ├── InputError              command input is invalid: every problem, located
    │   └── InvalidPayload          a payload does not match its handler's pydantic model
    ├── BrokerError                 a broker operation failed
    │   ├── QueueFull               put could not enqueue within enqueue_timeout
    │   ├── BrokerClosed            the broker was closed
    │   ├── BrokerUnavailable       the broker cannot be reached or opened
    │   └── NotSupported            the broker cannot do this (e.g. publish to a memory broker)
    └── PermanentError              raised by a handler: never retry, dead-letter at once

    TaskInterrupted (BaseException) raised inside a handler's thread when it is interrupted

The CLI maps the tree to exit codes: 2 for ConfigError, UsageError and NotSupported, 3 for
BrokerUnavailable, 1 for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass


class RunnerError(Exception):
    """Root of every exception the runner raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One configuration mistake, located as precisely as we can."""

    source: str  # "configs/demo.yaml:12:5", "env DQ_WORKERS", "flag --workers"
    path: str  # dotted key path, "" for the whole document
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigError(RunnerError):
    """Raised when a configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UsageError(RunnerError):
    """Raised when a command is called with input it cannot accept (unknown type, bad JSON)."""


class InputError(UsageError):
    """Raised when command input (a payload argument, a JSON Lines file) is invalid.

    Carries every problem found, each located (``jobs.jsonl:3``, ``PAYLOAD_JSON``), so that an
    operator fixes a file in one pass.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class InvalidPayload(UsageError):
    """Raised when a payload does not match the pydantic model its handler is annotated with."""

    def __init__(self, model: str, fields: list[tuple[str, str]]) -> None:
        self.model = model
        self.fields = fields  # (dotted field path, what was wrong); path "" is the whole payload
        detail = "; ".join(f"{path}: {msg}" if path else msg for path, msg in fields)
        super().__init__(f"payload does not match {model}: {detail}")


class BrokerError(RunnerError):
    """Raised when a broker operation fails."""


class QueueFull(BrokerError):
    """Raised when put cannot enqueue within enqueue_timeout (or at once with overflow: reject)."""


class BrokerClosed(BrokerError):
    """Raised when a broker is used after close()."""


class BrokerUnavailable(BrokerError):
    """Raised when the broker cannot be reached or opened (server down, unwritable file)."""


class NotSupported(BrokerError):
    """Raised when a broker cannot perform an operation (a memory broker has no shared state)."""


class PermanentError(RunnerError):
    """Raised by a handler to send its task straight to the dead-letter queue, without retries."""


class TaskInterrupted(BaseException):
    """Raised asynchronously in a handler's thread when its timeout or the shutdown grace expires.

    It derives from BaseException so that handlers' broad ``except Exception`` blocks do not
    swallow it, the same reason KeyboardInterrupt does.
    """
