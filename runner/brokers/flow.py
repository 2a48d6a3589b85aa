"""The token bucket of a ``RateLimit`` gate and the state machine of a ``CircuitBreaker`` gate, as
plain functions on a ``Bucket`` and a ``Circuit``.

The memory and SQLite brokers keep a bucket per rate-limited type and run these functions inside
their claim (under the lock, in the claim's transaction); the Redis broker runs the same steps in
poll.lua (kept in step with this module: same order, same rounding). Time is the broker's clock.

A bucket holds ``tokens`` as of ``at``. Before a claim it is refilled: ``rate`` tokens per
second since ``at``, at most ``burst``. A claim hands out at most ``whole(tokens)`` tasks of the
type and takes one token per task handed out. ``limited_s`` adds up the time the bucket held
less than one token: the time the type was throttled (its ready tasks, if any, waited on it).
"""

from __future__ import annotations

import math
from dataclasses import replace

from runner.brokers.base import Bucket, Circuit, CircuitBreaker, CircuitState, RateLimit

#: Tokens a little short of a whole one still count as it: n / rate * rate is not always n.
_EPSILON = 1e-9


def refilled(limit: RateLimit, bucket: Bucket | None, now: float) -> Bucket:
    """``bucket`` as of ``now``; a type without one yet starts with a full bucket."""
    if bucket is None:
        return Bucket(tokens=float(limit.burst), at=now)
    if now <= bucket.at:  # a clock stepped back refills nothing, and is not counted
        return bucket
    limited = bucket.limited_s
    if bucket.tokens < 1 - _EPSILON:
        empty_until = bucket.at + (1 - bucket.tokens) / limit.rate
        limited += min(now, empty_until) - bucket.at
    tokens = min(float(limit.burst), bucket.tokens + (now - bucket.at) * limit.rate)
    return Bucket(tokens=tokens, at=now, limited_s=limited)


def whole(bucket: Bucket) -> int:
    """How many tasks the bucket lets a claim hand out now."""
    return max(math.floor(bucket.tokens + _EPSILON), 0)


def taken(bucket: Bucket, handed_out: int) -> Bucket:
    """The bucket after a claim handed out ``handed_out`` tasks."""
    if handed_out == 0:
        return bucket
    return Bucket(tokens=bucket.tokens - handed_out, at=bucket.at, limited_s=bucket.limited_s)


def next_token_at(limit: RateLimit, bucket: Bucket) -> float:
    """When the bucket holds a whole token again (``bucket.at`` when it does now)."""
    if bucket.tokens >= 1 - _EPSILON:
        return bucket.at
    return bucket.at + (1 - bucket.tokens) / limit.rate


def rate_text(rate: float) -> str:
    """A rate as the YAML writes it: ``50/s``, ``10/m`` (below one a second), ``2/h``."""
    if rate >= 1:
        return f"{rate:g}/s"
    if rate * 60 >= 1:
        return f"{round(rate * 60, 6):g}/m"
    return f"{round(rate * 3600, 6):g}/h"


# -- circuit breakers -------------------------------------------------------------------------
#
# A circuit-broken type's ``Circuit`` moves through closed -> open -> half_open -> closed (or back
# to open). The brokers call these functions inside their claim and their settle (the Redis
# broker runs the same steps in Lua): ``circuit_at`` first (the state as of now), then
# ``circuit_allows`` and ``circuit_handed`` in a claim, or ``circuit_recorded`` for an outcome.
#
# The window slides by the two-window estimate: the current window's counts plus the previous
# window's, weighted by the share of it that a window ending now still covers.


def circuit_at(breaker: CircuitBreaker, circuit: Circuit | None, now: float) -> Circuit:
    """``circuit`` as of ``now``: a new one is closed; an open one whose time is up is half-open;
    a half-open one whose probes never reported back within ``open_for_s`` (released, or their
    worker died) may probe again; a closed one's window has moved on."""
    if circuit is None:
        return Circuit("closed", since=now, window_start=now)
    if circuit.state == "open":
        if now < circuit.since + breaker.open_for_s:
            return circuit
        return Circuit("half_open", since=now, window_start=now)
    if circuit.state == "half_open":
        if circuit.probes and now >= circuit.since + breaker.open_for_s:
            return Circuit("half_open", since=now, window_start=now)
        return circuit
    elapsed = now - circuit.window_start
    if elapsed < breaker.window_s:
        return circuit
    if elapsed < 2 * breaker.window_s:  # one window on: the current becomes the previous
        return Circuit(
            "closed",
            since=circuit.since,
            window_start=circuit.window_start + breaker.window_s,
            prev_calls=circuit.calls,
            prev_failures=circuit.failures,
        )
    return Circuit("closed", since=circuit.since, window_start=now)


def circuit_allows(breaker: CircuitBreaker, circuit: Circuit) -> int | None:
    """How many of the type a claim may hand out: None (no bound) while closed, 0 while open,
    the probes left while half-open."""
    if circuit.state == "closed":
        return None
    if circuit.state == "open":
        return 0
    return max(breaker.half_open_calls - circuit.probes, 0)


def circuit_handed(circuit: Circuit, handed_out: int) -> Circuit:
    """The circuit after a claim handed out ``handed_out`` of the type (probes, if half-open)."""
    if circuit.state != "half_open" or handed_out == 0:
        return circuit
    return replace(circuit, probes=circuit.probes + handed_out)


def circuit_recorded(
    breaker: CircuitBreaker, circuit: Circuit, succeeded: bool, now: float
) -> Circuit:
    """The circuit after one outcome of the type (``circuit`` as of ``now``)."""
    if circuit.state == "open":
        return circuit  # a task started before it opened: says nothing new
    if circuit.state == "half_open":
        state: CircuitState = "closed" if succeeded else "open"
        return Circuit(state, since=now, window_start=now)
    calls, failures = circuit.calls + 1, circuit.failures + (0 if succeeded else 1)
    overlap = max(0.0, 1.0 - (now - circuit.window_start) / breaker.window_s)
    seen = calls + circuit.prev_calls * overlap
    failed = failures + circuit.prev_failures * overlap
    if seen >= breaker.min_calls and failed >= breaker.failure_rate * seen:
        return Circuit("open", since=now, window_start=now)
    return replace(circuit, calls=calls, failures=failures)


def circuit_reopens_at(breaker: CircuitBreaker, circuit: Circuit) -> float | None:
    """When a claim may hand the type out again, for a blocked get to wake (None: not held)."""
    if circuit.state == "open":
        return circuit.since + breaker.open_for_s
    if circuit.state == "half_open" and circuit.probes >= breaker.half_open_calls:
        return circuit.since + breaker.open_for_s  # the probes' time to report back
    return None
