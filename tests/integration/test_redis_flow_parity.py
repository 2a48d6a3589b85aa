"""The Redis broker's bucket.lua and circuit.lua against runner.brokers.flow, step for step.

The memory and SQLite brokers run flow.py's functions; Redis runs their Lua mirrors inside its
scripts. Random sequences of steps (seeded, so a failure repeats) go through both, on a real
redis-server, and every state after every step must be the same, to the last bit of each float
(both sides print them with %.17g).
"""

from __future__ import annotations

import random
from dataclasses import astuple

import pytest
import redis

from runner.brokers import flow
from runner.brokers.base import Bucket, Circuit, CircuitBreaker, RateLimit
from runner.brokers.redis import scripts
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

SEQUENCES = 150
STEPS = 40

_BUCKET_DRIVER = (
    scripts._BUCKET
    + """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket, out = nil, {}
for i = 3, #ARGV do
  local op, a = string.match(ARGV[i], '^(%a) (%S+)$')
  if op == 'r' then
    bucket = bucket_refilled(rate, burst, bucket, tonumber(a))
  else
    bucket = bucket_taken(bucket, math.min(tonumber(a), bucket_whole(bucket)))
  end
  out[#out + 1] = string.format('%.17g %.17g %.17g %d %.17g', bucket[1], bucket[2], bucket[3],
                                bucket_whole(bucket), bucket_next_token_at(rate, bucket))
end
return out
"""
)

_CIRCUIT_DRIVER = (
    scripts._CIRCUIT
    + """
local breaker = {failure_rate = tonumber(ARGV[1]), min_calls = tonumber(ARGV[2]),
                 window_s = tonumber(ARGV[3]), open_for_s = tonumber(ARGV[4]),
                 half_open_calls = tonumber(ARGV[5])}
local circuit, out = nil, {}
for i = 6, #ARGV do
  local op, a, b = string.match(ARGV[i], '^(%a) (%S+) ?(%S*)$')
  if op == 'a' then
    circuit = circuit_at(breaker, circuit, tonumber(a))
  elseif op == 'h' then
    local allowed = circuit_allows(breaker, circuit)
    local n = tonumber(a)
    if allowed then n = math.min(n, allowed) end
    circuit = circuit_handed(circuit, n)
  else
    local now = tonumber(b)
    circuit = circuit_recorded(breaker, circuit_at(breaker, circuit, now), a == '1', now)
  end
  local allowed = circuit_allows(breaker, circuit)
  local reopens = circuit_reopens_at(breaker, circuit)
  out[#out + 1] = circuit_encode(circuit) .. ' ' .. (allowed and tostring(allowed) or '-')
                  .. ' ' .. (reopens and string.format('%.17g', reopens) or '-')
end
return out
"""
)


def _g(value: float) -> str:
    return format(value, ".17g")


def _bucket_steps(rng: random.Random) -> tuple[RateLimit, list[str]]:
    limit = RateLimit(rate=rng.choice([0.3, 1, 2.5, 50, 7 / 3]), burst=rng.choice([1, 2, 5, 50]))
    now = 1_800_000_000.0 + rng.random()
    steps = [f"r {_g(now)}"]  # a new bucket: full
    for _ in range(STEPS):
        if rng.random() < 0.5:
            now += rng.choice([0.0, 0.001, 0.05, 0.3, 1.7, -0.2])  # a clock may step back
            steps.append(f"r {_g(now)}")
        else:
            steps.append(f"t {rng.randint(0, 4)}")
    return limit, steps


def _bucket_python(limit: RateLimit, steps: list[str]) -> list[str]:
    bucket: Bucket | None = None
    out = []
    for step in steps:
        op, value = step.split()
        if op == "r":
            bucket = flow.refilled(limit, bucket, float(value))
        else:
            assert bucket is not None
            bucket = flow.taken(bucket, min(int(value), flow.whole(bucket)))
        out.append(
            f"{_g(bucket.tokens)} {_g(bucket.at)} {_g(bucket.limited_s)} "
            f"{flow.whole(bucket)} {_g(flow.next_token_at(limit, bucket))}"
        )
    return out


def _circuit_steps(rng: random.Random) -> tuple[CircuitBreaker, list[str]]:
    breaker = CircuitBreaker(
        failure_rate=rng.choice([0.25, 0.5, 1.0, 1 / 3]),
        min_calls=rng.choice([1, 3, 5]),
        window_s=rng.choice([1.0, 2.5, 10.0]),
        open_for_s=rng.choice([0.5, 1.0, 3.0]),
        half_open_calls=rng.choice([1, 2, 3]),
    )
    now, steps = 1_800_000_000.0 + rng.random(), [f"a {_g(1_800_000_000.0)}"]
    for _ in range(STEPS):
        now += rng.choice([0.0, 0.01, 0.2, 0.7, 1.3, 4.0])
        pick = rng.random()
        if pick < 0.3:
            steps.append(f"a {_g(now)}")
        elif pick < 0.45:
            steps.append(f"h {rng.randint(0, 3)}")
        else:
            steps.append(f"o {1 if rng.random() < 0.4 else 0} {_g(now)}")
    return breaker, steps


def _circuit_text(breaker: CircuitBreaker, circuit: Circuit) -> str:
    state, since, window_start, *counts = astuple(circuit)
    allowed = flow.circuit_allows(breaker, circuit)
    reopens = flow.circuit_reopens_at(breaker, circuit)
    return " ".join(
        [
            state,
            _g(since),
            _g(window_start),
            *(str(int(c)) for c in counts),
            "-" if allowed is None else str(allowed),
            "-" if reopens is None else _g(reopens),
        ]
    )


def _circuit_python(breaker: CircuitBreaker, steps: list[str]) -> list[str]:
    circuit: Circuit | None = None
    out = []
    for step in steps:
        op, *args = step.split()
        if op == "a":
            circuit = flow.circuit_at(breaker, circuit, float(args[0]))
        elif op == "h":
            assert circuit is not None
            allowed = flow.circuit_allows(breaker, circuit)
            wanted = int(args[0])
            circuit = flow.circuit_handed(
                circuit, wanted if allowed is None else min(wanted, allowed)
            )
        else:
            now = float(args[1])
            at = flow.circuit_at(breaker, circuit, now)
            circuit = flow.circuit_recorded(breaker, at, args[0] == "1", now)
        out.append(_circuit_text(breaker, circuit))
    return out


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url, decode_responses=True)


def test_bucket_lua_is_flow_py_step_for_step(client: redis.Redis) -> None:
    driver = client.register_script(_BUCKET_DRIVER)
    rng = random.Random(2212)
    for _ in range(SEQUENCES):
        limit, steps = _bucket_steps(rng)
        lua = driver(keys=[], args=[_g(limit.rate), _g(limit.burst), *steps])
        assert lua == _bucket_python(limit, steps), (limit, steps)


def test_circuit_lua_is_flow_py_step_for_step(client: redis.Redis) -> None:
    driver = client.register_script(_CIRCUIT_DRIVER)
    rng = random.Random(2222)
    states = set()
    for _ in range(SEQUENCES):
        breaker, steps = _circuit_steps(rng)
        args = [_g(v) for v in astuple(breaker)]
        lua = driver(keys=[], args=[*args, *steps])
        python = _circuit_python(breaker, steps)
        assert lua == python, (breaker, steps)
        states |= {line.split()[0] for line in python}
    assert states == {"closed", "open", "half_open"}  # every state was reached and compared
