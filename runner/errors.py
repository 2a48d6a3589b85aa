"""The one exception tree of the runner.

::

    class                          exit  raised when
    RunnerError                      1   root of everything the runner raises on purpose
    ├── ConfigError                  2   the configuration is invalid (carries every problem)
    ├── UsageError                   2   a CLI call is malformed (bad payload, unknown type, ...)
    │   ├── InputError               2   command input is invalid: every problem, located
    │   └── InvalidPayload           2   a payload does not match its handler's pydantic model
    ├── BrokerError                  1   a broker operation failed (carries backend, operation)
    │   ├── QueueFull                1   put could not enqueue within enqueue_timeout
    │   ├── BrokerClosed             1   the broker was closed
    │   ├── BrokerUnavailable        3   the broker cannot be reached or opened
    │   └── NotSupported             2   the broker cannot do this (publish to a memory broker)
    └── PermanentError               1   raised by a handler: never retry, dead-letter at once

    TaskInterrupted (BaseException)      raised inside a handler's thread when it is interrupted

Each class carries, as ``exit_code``, the code ``dq-run`` exits with when the error reaches the
CLI (docs/reference/cli.md: 0 success, 1 failure, 2 config or usage error, 3 broker unreachable); a
subclass inherits its parent's unless it says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

#: Exit codes of ``dq-run`` (docs/reference/cli.md); each error class names its own (exit_code).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3


class RunnerError(Exception):
    """Root of every exception the runner raises on purpose."""

    exit_code: ClassVar[int] = EXIT_FAILURE


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

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UsageError(RunnerError):
    """Raised when a command is called with input it cannot accept (unknown type, bad JSON)."""

    exit_code = EXIT_USAGE


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
    """Raised when a broker operation fails.

    ``backend`` ("memory", "sqlite", "redis") and ``operation`` (the broker method: "open",
    "put", "get", "settle" for ack/retry/dead/release/settle_many, "exchange", "extend",
    "depth", "dead_letters", "replay", "purge", ...) say where, when the raiser knows; ""
    otherwise. They are not part of the message.
    """

    def __init__(self, *args: object, backend: str = "", operation: str = "") -> None:
        super().__init__(*args)
        self.backend = backend
        self.operation = operation


class QueueFull(BrokerError):
    """Raised when put cannot enqueue within enqueue_timeout (or at once with overflow: reject)."""


class BrokerClosed(BrokerError):
    """Raised when a broker is used after close()."""


class BrokerUnavailable(BrokerError):
    """Raised when the broker cannot be reached or opened (server down, unwritable file)."""

    exit_code = EXIT_BROKER


class NotSupported(BrokerError):
    """Raised when a broker cannot perform an operation (a memory broker has no shared state)."""

    exit_code = EXIT_USAGE


class PermanentError(RunnerError):
    """Raised by a handler to send its task straight to the dead-letter queue, without retries."""


class TaskInterrupted(BaseException):
    """Raised asynchronously in a handler's thread when its timeout or the shutdown grace expires.

    It derives from BaseException so that handlers' broad ``except Exception`` blocks do not
    swallow it, the same reason KeyboardInterrupt does.
    """
