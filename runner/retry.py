"""Retry decisions for tasks, and reconnect backoff for brokers. The only tenacity import.

A RetryPlan is built once per task type from its RetryPolicy and answers one question: given
this exception on attempt n, does the task run again (and after how long) or go to the
dead-letter queue? It never sleeps: the engine hands the task back to the broker with
``not_before = now + delay``, so no worker thread waits through a backoff.

delay(n) = min(max, initial * multiplier ** (n - 1)) scaled by a random factor drawn from
[1 - jitter, 1 + jitter]. Our jitter is a fraction of the delay; tenacity's own jitter is an
absolute number of seconds, so we wrap its exponential wait in our own proportional jitter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity
from tenacity.wait import wait_base

from runner.config import RetryPolicy
from runner.errors import PermanentError, TaskInterrupted

T = TypeVar("T")


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
    reason: str = ""  # why the task is dead: permanent | never_retry | exhausted


class RetryPlan:
    """A RetryPolicy turned into tenacity strategies, reusable for every task of one type."""

    def __init__(
        self,
        policy: RetryPolicy,
        never_retry: tuple[type[BaseException], ...] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.max_attempts = policy.max_attempts
        self.never_retry = never_retry
        backoff = policy.backoff
        exponential = tenacity.wait_exponential(
            multiplier=backoff.initial, exp_base=backoff.multiplier, max=backoff.max
        )
        self._retrying = tenacity.Retrying(
            wait=wait_proportional_jitter(exponential, backoff.jitter, rng or random.Random()),
            stop=tenacity.stop_after_attempt(policy.max_attempts),
            retry=tenacity.retry_if_exception(self._retryable),
        )

    def _retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (PermanentError, *self.never_retry))

    def decide(self, exc: BaseException, attempt: int) -> Decision:
        """Decide after ``exc`` ended attempt number ``attempt`` (1 for the first run)."""
        state = self._state(attempt)
        state.set_exception((type(exc), exc, exc.__traceback__))
        if not self._retrying.retry(state):
            reason = "permanent" if isinstance(exc, PermanentError) else "never_retry"
            return Decision(False, reason=reason)
        if self._retrying.stop(state):
            return Decision(False, reason="exhausted")
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
    """How an exception is named in records: TimeoutError for interrupts, else its class name."""
    return "TimeoutError" if isinstance(exc, TaskInterrupted) else type(exc).__name__


class _StopWhen(tenacity.stop.stop_base):
    """A tenacity stop condition from a plain predicate."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._predicate()


def call_with_reconnect(
    fn: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...],
    timeout_s: float,
    stopped: Callable[[], bool],
    on_retry: Callable[[int, BaseException | None], None],
) -> T:
    """Call ``fn``; on a ``transient`` error retry with exponential backoff (50 ms doubling,
    capped at 1 s, plus up to 50 ms jitter) until ``timeout_s`` has passed or ``stopped()``,
    then re-raise the last error. ``on_retry(attempt, error)`` runs before each wait."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        on_retry(state.attempt_number, state.outcome.exception() if state.outcome else None)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(transient),
        wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
        stop=tenacity.stop_any(tenacity.stop_after_delay(timeout_s), _StopWhen(stopped)),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
