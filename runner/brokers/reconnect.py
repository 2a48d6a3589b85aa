"""Reconnect backoff for brokers that hold a network connection (Redis), on tenacity.

``call_with_reconnect`` retries one broker call on a transient error with exponential backoff
until a deadline passes or the broker is closed, telling a callback about each attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


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
