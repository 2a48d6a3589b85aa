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
    ├── PermanentError               1   raised by a handler: never retry, dead-letter at once
    ├── Retry                        1   raised by a handler: retry after this delay (or at)
    ├── ChildDied                    1   a process type's child died while it ran the task
    └── ChildError                   1   a handler's exception in a child, as its parent sees it

    TaskInterrupted (BaseException)      raised inside a handler's thread when it is interrupted

Each class carries, as ``exit_code``, the code ``dq-run`` exits with when the error reaches the
CLI (docs/reference/cli.md: 0 success, 1 failure, 2 config or usage error, 3 broker unreachable); a
subclass inherits its parent's unless it says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
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


class Retry(RunnerError):
    """Raised by a handler to run its task again after ``delay`` seconds, or at ``at`` (an
    aware datetime; a time in the past means at once), instead of after the backoff policy's
    delay: ``raise Retry(delay=30)``, say, when a downstream service answered "try again in
    30 s". It is a failed attempt like any other (retry events, history, the attempt counted):
    raised on the last attempt, the task goes to the dead-letter queue (reason exhausted).

    ``count=False`` gives the attempt back instead: the task runs again after the delay with
    the same attempt number, no history entry and no step towards ``max_attempts`` (a task
    that always raises it never finishes: bound it yourself, with ``expires`` say).
    """

    def __init__(
        self,
        delay: float | None = None,
        *,
        at: datetime | None = None,
        count: bool = True,
        message: str = "",
    ) -> None:
        if (delay is None) == (at is None):
            raise ValueError("Retry takes one of delay (seconds) or at (a datetime)")
        if delay is not None and not delay >= 0:
            raise ValueError(f"Retry delay must be 0 or more seconds, got {delay!r}")
        if at is not None and at.utcoffset() is None:
            raise ValueError(f"Retry at {at.isoformat()} has no time zone: give an aware datetime")
        self.delay = delay
        self.at = at
        self.count = count
        when = f"in {delay:g}s" if delay is not None else f"at {at.isoformat() if at else ''}"
        super().__init__(message or f"retry requested {when}")

    def delay_s(self, now: float) -> float:
        """Seconds from ``now`` (epoch seconds) until the task may run again."""
        if self.at is not None:
            return max(0.0, self.at.timestamp() - now)
        return self.delay or 0.0


class TaskInterrupted(BaseException):
    """Raised asynchronously in a handler's thread when its timeout or the shutdown grace expires.

    It derives from BaseException so that handlers' broad ``except Exception`` blocks do not
    swallow it, the same reason KeyboardInterrupt does.
    """


class ChildDied(RunnerError):
    """A process type's child process died while it ran the task (a segfault, ``os._exit``,
    the OOM killer): that attempt fails with it, retried like any failure; the message names
    the exit code or signal. A new child takes the dead one's place."""


class ChildError(RunnerError):
    """An exception a handler raised in a child process (``execution: process``), as the parent
    sees it: its class's name (``kind``), message and traceback from the child, and ``origin``,
    the class itself when the parent can import it (retry decisions match ``never_retry`` and
    PermanentError against it, as if the handler had raised it here)."""

    def __init__(
        self, kind: str, message: str, remote_traceback: str, origin: type[BaseException] | None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.remote_traceback = remote_traceback
        self.origin = origin
