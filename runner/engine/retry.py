"""Retry decisions for tasks, on tenacity's strategies.

A RetryPlan is built once per task type (from plain values: runner.app reads the policy) and
answers one question: given this exception on attempt n, does the task run again (and after how
long) or go to the dead-letter queue? It never sleeps: the engine hands the task back to the
broker with ``not_before = now + delay``, so no worker thread waits through a backoff.

delay(n) = min(max, initial * multiplier ** (n - 1)) scaled by a random factor drawn from
[1 - jitter, 1 + jitter]. Our jitter is a fraction of the delay; tenacity's own jitter is an
absolute number of seconds, so we wrap its exponential wait in our own proportional jitter.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import tenacity
from tenacity.wait import wait_base

from runner.errors import ChildError, PermanentError, Retry, TaskInterrupted
from runner.model import DeadReason


class wait_proportional_jitter(wait_base):
    """Scale another wait by a random factor in [1 - fraction, 1 + fraction]."""

    def __init__(self, inner: wait_base, fraction: float, rng: random.Random) -> None:
        self.inner = inner
        self.fraction = fraction
        self.rng = rng

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        base = self.inner(retry_state)
        if self.fraction == 0:
            return base
        return base * self.rng.uniform(1 - self.fraction, 1 + self.fraction)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt."""

    retry: bool
    delay_s: float = 0.0
    reason: DeadReason | None = None  # why the task is dead: PERMANENT, NEVER_RETRY, EXHAUSTED
    counted: bool = True  # False: Retry(count=False), the attempt is given back


class RetryPlan:
    """A RetryPolicy turned into tenacity strategies, reusable for every task of one type."""

    def __init__(
        self,
        max_attempts: int,
        *,
        initial: float,
        maximum: float,
        multiplier: float,
        jitter: float,
        never_retry: tuple[type[BaseException], ...] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.max_attempts = max_attempts
        self.never_retry = never_retry
        exponential = tenacity.wait_exponential(
            multiplier=initial, exp_base=multiplier, max=maximum
        )
        self._retrying = tenacity.Retrying(
            wait=wait_proportional_jitter(exponential, jitter, rng or random.Random()),
            stop=tenacity.stop_after_attempt(max_attempts),
            retry=tenacity.retry_if_exception(self._retryable),
        )

    def _retryable(self, exc: BaseException) -> bool:
        # An explicit Retry is retried even when never_retry names a class it derives from.
        return isinstance(exc, Retry) or not is_a(exc, (PermanentError, *self.never_retry))

    def decide(self, exc: BaseException, attempt: int) -> Decision:
        """Decide after ``exc`` ended attempt number ``attempt`` (1 for the first run)."""
        state = self._state(attempt)
        state.set_exception((type(exc), exc, exc.__traceback__))
        if not self._retrying.retry(state):
            permanent = is_a(exc, (PermanentError,))
            return Decision(
                False, reason=DeadReason.PERMANENT if permanent else DeadReason.NEVER_RETRY
            )
        if isinstance(exc, Retry) and not exc.count:  # never the last attempt: it is not one
            return Decision(True, delay_s=exc.delay_s(time.time()), counted=False)
        if self._retrying.stop(state):
            return Decision(False, reason=DeadReason.EXHAUSTED)
        if isinstance(exc, Retry):  # the handler named its own delay
            return Decision(True, delay_s=exc.delay_s(time.time()))
        return Decision(True, delay_s=self._retrying.wait(state))

    def delay(self, attempt: int) -> float:
        """The backoff after attempt ``attempt`` failed (used by tests and `dq-run config`)."""
        return self._retrying.wait(self._state(attempt))

    def _state(self, attempt: int) -> tenacity.RetryCallState:
        """tenacity's view of a task that has just finished attempt number ``attempt``."""
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempt
        return state


def error_name(exc: BaseException) -> str:
    """How an exception is named in records: TimeoutError for interrupts, a child process's
    exception by its own class's name, else its class name."""
    if isinstance(exc, TaskInterrupted):
        return "TimeoutError"
    if isinstance(exc, ChildError):
        return exc.kind
    return type(exc).__name__


def is_a(exc: BaseException, classes: tuple[type[BaseException], ...]) -> bool:
    """``isinstance(exc, classes)``; for an exception a child process raised (ChildError), of
    the class it was raised as there, when the parent could import it."""
    if isinstance(exc, classes):
        return True
    origin = exc.origin if isinstance(exc, ChildError) else None
    return origin is not None and issubclass(origin, classes)
