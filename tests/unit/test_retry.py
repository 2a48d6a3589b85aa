"""RetryPlan: our backoff formula on tenacity's strategies, and the retry/dead decision."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.engine.retry import Decision, RetryPlan, error_name
from runner.errors import PermanentError, Retry, TaskInterrupted
from runner.model import DeadReason


def make(max_attempts: int = 5, initial: float = 0.1, maximum: float = 1.0,
         multiplier: float = 2.0, jitter: float = 0.0, never: tuple[type[BaseException], ...] = (),
         seed: int = 0) -> RetryPlan:  # fmt: skip
    return RetryPlan(
        max_attempts,
        initial=initial,
        maximum=maximum,
        multiplier=multiplier,
        jitter=jitter,
        never_retry=never,
        rng=random.Random(seed),
    )


def test_delay_grows_exponentially_up_to_max() -> None:
    plan = make(initial=0.1, maximum=0.5, multiplier=3)
    assert [round(plan.delay(n), 6) for n in range(1, 5)] == [0.1, 0.3, 0.5, 0.5]


@given(
    attempt=st.integers(1, 30),
    initial=st.floats(0.001, 5),
    maximum=st.floats(0.001, 60),
    multiplier=st.floats(1, 5),
    jitter=st.floats(0, 1),
)
def test_jitter_is_a_fraction_of_the_delay(
    attempt: int, initial: float, maximum: float, multiplier: float, jitter: float
) -> None:
    """delay(n) = min(max, initial * multiplier**(n-1)) * U[1 - jitter, 1 + jitter]."""
    plan = make(initial=initial, maximum=maximum, multiplier=multiplier, jitter=jitter)
    nominal = min(maximum, initial * multiplier ** (attempt - 1))
    delay = plan.delay(attempt)
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal * (1 + jitter) + 1e-9


def test_jitter_spreads_delays_over_the_whole_band() -> None:
    plan = make(initial=1.0, maximum=1.0, jitter=0.5)
    delays = [plan.delay(1) for _ in range(2000)]
    assert min(delays) < 0.55 and max(delays) > 1.45  # not tenacity's additive seconds


def test_decide_retries_until_max_attempts_then_exhausts() -> None:
    plan = make(max_attempts=3)
    assert plan.decide(RuntimeError(), 1).retry
    assert plan.decide(RuntimeError(), 2).retry
    final = plan.decide(RuntimeError(), 3)
    assert not final.retry and final.reason == "exhausted"


def test_max_attempts_one_never_retries() -> None:
    assert make(max_attempts=1).decide(RuntimeError(), 1).reason == "exhausted"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (PermanentError("x"), "permanent"),
        (KeyError("k"), "never_retry"),
        (LookupError(), "never_retry"),
    ],
)
def test_non_retryable_errors_die_on_first_attempt(exc: BaseException, reason: str) -> None:
    decision = make(never=(LookupError,)).decide(exc, 1)
    assert not decision.retry and decision.reason == reason


def test_timeouts_are_retryable_and_named_timeout_error() -> None:
    assert make().decide(TaskInterrupted(), 1).retry
    assert error_name(TaskInterrupted()) == "TimeoutError"
    assert error_name(ValueError()) == "ValueError"


def test_a_retry_the_handler_asks_for_uses_its_own_delay() -> None:
    plan = make(max_attempts=3)
    assert plan.decide(Retry(delay=30), 1) == Decision(True, delay_s=30)
    soon = plan.decide(Retry(at=datetime.now(timezone.utc) + timedelta(seconds=60)), 2)
    assert soon.retry and 58 <= soon.delay_s <= 60
    past = plan.decide(Retry(at=datetime(2020, 1, 1, tzinfo=timezone.utc)), 1)
    assert past == Decision(True, delay_s=0.0)  # a time gone by: at once
    # Still a failed attempt: the last one exhausts the task.
    assert plan.decide(Retry(delay=30), 3) == Decision(False, reason=DeadReason.EXHAUSTED)
    # Not counted: retried even after the last attempt, and said so.
    uncounted = Decision(True, delay_s=30, counted=False)
    assert plan.decide(Retry(delay=30, count=False), 3) == uncounted


def test_a_retry_asked_for_beats_never_retry() -> None:
    plan = make(max_attempts=3, never=(Exception,))
    assert plan.decide(Retry(delay=5), 1) == Decision(True, delay_s=5)
    assert plan.decide(ValueError("x"), 1).reason == DeadReason.NEVER_RETRY


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "one of delay"),
        ({"delay": 1, "at": datetime(2030, 1, 1, tzinfo=timezone.utc)}, "one of delay"),
        ({"delay": -1}, "0 or more seconds"),
        ({"at": datetime(2030, 1, 1)}, "has no time zone"),
    ],
)
def test_retry_refuses_what_it_cannot_mean(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Retry(**args)
