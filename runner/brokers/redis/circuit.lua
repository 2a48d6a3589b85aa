-- The state machine of a CircuitBreaker gate (the ``breakers`` and ``circuits`` hashes of
-- scripts.py), for POLL and SETTLE. This mirrors the circuit functions of
-- runner/brokers/flow.py step for step: the same tests in the same order and the same
-- arithmetic, so Redis opens, probes and closes where the memory and SQLite brokers would.
-- Keep the two in step. A breaker is {failure_rate, min_calls, window_s, open_for_s,
-- half_open_calls}; a circuit is {state, since, window_start, calls, failures, prev_calls,
-- prev_failures, probes} (runner.brokers.base.Circuit's fields); time is Redis' clock (TIME).

-- Circuit(state, since, window_start): nothing counted, no probes.
local function circuit_new(state, since, window_start)
  return {state = state, since = since, window_start = window_start, calls = 0, failures = 0,
          prev_calls = 0, prev_failures = 0, probes = 0}
end

-- dataclasses.replace: a copy of ``circuit`` with ``changes``.
local function circuit_replaced(circuit, changes)
  local copy = {}
  for k, v in pairs(circuit) do copy[k] = v end
  for k, v in pairs(changes) do copy[k] = v end
  return copy
end

-- flow.circuit_at: ``circuit`` (nil: none yet) as of ``now``.
local function circuit_at(breaker, circuit, now)
  if not circuit then return circuit_new('closed', now, now) end
  if circuit.state == 'open' then
    if now < circuit.since + breaker.open_for_s then return circuit end
    return circuit_new('half_open', now, now)
  end
  if circuit.state == 'half_open' then
    if circuit.probes ~= 0 and now >= circuit.since + breaker.open_for_s then
      return circuit_new('half_open', now, now)
    end
    return circuit
  end
  local elapsed = now - circuit.window_start
  if elapsed < breaker.window_s then return circuit end
  if elapsed < 2 * breaker.window_s then  -- one window on: the current becomes the previous
    local moved = circuit_new('closed', circuit.since, circuit.window_start + breaker.window_s)
    return circuit_replaced(moved, {prev_calls = circuit.calls, prev_failures = circuit.failures})
  end
  return circuit_new('closed', circuit.since, now)
end

-- flow.circuit_allows: how many of the type a claim may hand out (nil: no bound).
local function circuit_allows(breaker, circuit)
  if circuit.state == 'closed' then return nil end
  if circuit.state == 'open' then return 0 end
  return math.max(breaker.half_open_calls - circuit.probes, 0)
end

-- flow.circuit_handed: the circuit after a claim handed out ``handed`` of the type.
local function circuit_handed(circuit, handed)
  if circuit.state ~= 'half_open' or handed == 0 then return circuit end
  return circuit_replaced(circuit, {probes = circuit.probes + handed})
end

-- flow.circuit_recorded: the circuit after one outcome (``circuit`` as of ``now``).
local function circuit_recorded(breaker, circuit, succeeded, now)
  if circuit.state == 'open' then return circuit end  -- a task started before it opened
  if circuit.state == 'half_open' then
    return circuit_new(succeeded and 'closed' or 'open', now, now)
  end
  local calls, failures = circuit.calls + 1, circuit.failures + (succeeded and 0 or 1)
  local overlap = math.max(0.0, 1.0 - (now - circuit.window_start) / breaker.window_s)
  local seen = calls + circuit.prev_calls * overlap
  local failed = failures + circuit.prev_failures * overlap
  if seen >= breaker.min_calls and failed >= breaker.failure_rate * seen then
    return circuit_new('open', now, now)
  end
  return circuit_replaced(circuit, {calls = calls, failures = failures})
end

-- flow.circuit_reopens_at: when a claim may hand the type out again (nil: not held).
local function circuit_reopens_at(breaker, circuit)
  if circuit.state == 'open' then return circuit.since + breaker.open_for_s end
  if circuit.state == 'half_open' and circuit.probes >= breaker.half_open_calls then
    return circuit.since + breaker.open_for_s  -- the probes' time to report back
  end
  return nil
end

-- A ``breakers`` field (``"<failure_rate> <min_calls> <window_s> <open_for_s>
-- <half_open_calls>"``, as admin.py writes it) as a breaker.
local function breaker_decode(field)
  local rate, calls, window, open_for, probes =
    string.match(field, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
  return {failure_rate = tonumber(rate), min_calls = tonumber(calls),
          window_s = tonumber(window), open_for_s = tonumber(open_for),
          half_open_calls = tonumber(probes)}
end

local CIRCUIT_STATES = {closed = true, open = true, half_open = true}

-- A ``circuits`` field and back: '%.17g' reads back as the very same double.
local function circuit_decode(field)
  if not field then return nil end
  local state, since, window_start, calls, failures, prev_calls, prev_failures, probes =
    string.match(field, '^(%S+) (%S+) (%S+) (%d+) (%d+) (%d+) (%d+) (%d+)$')
  -- Not ours (no match: state is nil): start afresh rather than fail every poll.
  if not CIRCUIT_STATES[state] then return nil end
  return {state = state, since = tonumber(since), window_start = tonumber(window_start),
          calls = tonumber(calls), failures = tonumber(failures),
          prev_calls = tonumber(prev_calls), prev_failures = tonumber(prev_failures),
          probes = tonumber(probes)}
end

local function circuit_encode(c)
  return string.format('%s %.17g %.17g %d %d %d %d %d', c.state, c.since, c.window_start,
                       c.calls, c.failures, c.prev_calls, c.prev_failures, c.probes)
end
