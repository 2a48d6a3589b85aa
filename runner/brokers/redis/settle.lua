-- KEYS: leases, count, dlq, dlq index, the two settled-token sets (parity 0, 1), types,
-- breakers, circuits, then per distinct type: stream, delayed, then each value key the effects
-- touch (``v:<key>``).
-- ARGV: group, visibility timeout in ms, ntypes, then per operation 8 fields: kind, type
-- index, entry id, token, x, y, z, n, followed by its n effects, then the ntypes type names
-- (in KEYS' order), where kind is one of
-- ``ack``      (x, y, z unused): drop the entry, free its capacity slot;
-- ``retry``    x = not_before, y = delayed-set member, z = now: drop the entry and queue the
-- task again (it keeps its capacity slot while it waits; one already due goes
-- straight back to the stream);
-- ``dead``     x = task id, y = dead-letter record, z = dead_at: drop the entry, free its
-- slot, store the record;
-- ``release``  (x, y, z unused): leave the entry in its place, pending for ``RELEASED``,
-- giving back the delivery count (the attempt) this delivery used, so a
-- released task is ready at once, before newer ones (see POLL);
-- and each effect is 4 fields, applied in order only when its op answers 1 (done now):
-- ``put``   type index, a, envelope: a task put ready (XADD), as put.lua;
-- ``later`` type index, not_before, delayed-set member: a task put delayed (ZADD);
-- ``set``   value index, value, ttl in ms ('' = none): SET the value key (PX);
-- ``del``   value index, '', '': DEL the value key;
-- ``circuit`` type index, 1 (succeeded) or 0 (failed), '': an outcome of the type for its
-- circuit breaker: when the type has one (``breakers``), its circuit is moved on to TIME and
-- the outcome recorded (circuit.lua, as runner/brokers/flow.py does); else it is not kept.
-- Puts take capacity slots (INCRBY) but are never refused for capacity, and add their type to
-- ``types``. A value index i is KEYS[9 + 2 * ntypes + i].
-- Operations run in order, each fenced by its own lease token, exactly as if each had been its
-- own script call (an op on an entry an earlier op of the call dropped answers as it would
-- after that call). The drops themselves are gathered into one HDEL, one XACK and one XDEL per
-- stream, one INCRBY of ``count`` (puts less freed slots) and one SADD of the settled tokens
-- at the end. Returns per op: 1 (done now), 2 (already done: this token settled the entry
-- before, in this call or an earlier one) or 0 (fenced: another delivery owns the entry, or
-- its lease expired).
local function settle(KEYS, ARGV)
  local leases, count, dlq, dlq_idx = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local settled_even, settled_odd, types = KEYS[5], KEYS[6], KEYS[7]
  local breakers, circuits = KEYS[8], KEYS[9]
  local group, visibility, ntypes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
  local values, names = 9 + 2 * ntypes, #ARGV - ntypes
  local result = {}
  local gone, fields, by_stream, streams, freed, added = {}, {}, {}, {}, 0, 0
  local typed = {}
  local tokens, settled_now = {}, {}
  local breaker_of = {}  -- type name -> its breaker, or false: none (read once per call)

  local function answer(stream, id, token)
    local field = id .. '@' .. stream
    if not gone[field] and redis.call('HGET', leases, field) == token then return 1 end
    if settled_now[token] or was_settled(settled_even, settled_odd, token) then return 2 end
    return 0
  end

  -- kept: the entry stays in the stream and pending (a release)
  local function drop(stream, id, token, kept)
    local field = id .. '@' .. stream
    gone[field] = true
    fields[#fields + 1] = field
    settled_now[token] = true
    tokens[#tokens + 1] = token
    if kept then return end
    local ids = by_stream[stream]
    if not ids then
      ids = {}
      by_stream[stream] = ids
      streams[#streams + 1] = stream
    end
    ids[#ids + 1] = id
  end

  local function requeue(stream, member)
    local _, a, t = string.match(member, '^(%S+) (%d+) (.*)$')
    redis.call('XADD', stream, '*', 'a', a, 't', t)
  end

  local function release(stream, id, token)
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    drop(stream, id, token, true)
    if p[1] then
      redis.call('XCLAIM', stream, group, '~released', 0, id,
                 'RETRYCOUNT', math.max(p[1][4] - 1, 0), 'JUSTID')
    end
  end

  -- a ``circuit`` effect: the outcome joins the type's circuit, if the type has a breaker
  local function record(name, succeeded)
    local breaker = breaker_of[name]
    if breaker == nil then
      local field = redis.call('HGET', breakers, name)
      breaker = field and breaker_decode(field)
      breaker_of[name] = breaker
    end
    if not breaker then return end
    local now = redis_seconds()
    local circuit = circuit_at(breaker, circuit_decode(redis.call('HGET', circuits, name)), now)
    circuit = circuit_recorded(breaker, circuit, succeeded, now)
    redis.call('HSET', circuits, name, circuit_encode(circuit))
  end

  -- the n effects from ARGV[first] on (see the header)
  local function apply(first, n)
    for e = first, first + 4 * (n - 1), 4 do
      local what, i, x, y = ARGV[e], tonumber(ARGV[e + 1]), ARGV[e + 2], ARGV[e + 3]
      if what == 'set' then
        if y == '' then
          redis.call('SET', KEYS[values + i], x)
        else
          redis.call('SET', KEYS[values + i], x, 'PX', y)
        end
      elseif what == 'del' then
        redis.call('DEL', KEYS[values + i])
      elseif what == 'circuit' then
        record(ARGV[names + i], x == '1')
      else
        if what == 'put' then
          local stream = KEYS[8 + 2 * i]
          ensure_group(stream, group)
          redis.call('XADD', stream, '*', 'a', x, 't', y)
        else
          redis.call('ZADD', KEYS[9 + 2 * i], x, y)
        end
        added = added + 1
        if not typed[i] then
          typed[i] = true
          redis.call('SADD', types, ARGV[names + i])
        end
      end
    end
  end

  local base = 4
  while base <= names do
    local kind, idx = ARGV[base], tonumber(ARGV[base + 1])
    local id, token = ARGV[base + 2], ARGV[base + 3]
    local x, y, z = ARGV[base + 4], ARGV[base + 5], ARGV[base + 6]
    local n = tonumber(ARGV[base + 7])
    local stream, delayed = KEYS[8 + 2 * idx], KEYS[9 + 2 * idx]
    local ok = answer(stream, id, token)
    if ok == 1 then
      if kind == 'release' then
        release(stream, id, token)
      else
        drop(stream, id, token)
        if kind == 'retry' then
          if tonumber(x) <= tonumber(z) then
            requeue(stream, y)
          else
            redis.call('ZADD', delayed, x, y)
          end
        else
          freed = freed + 1
          if kind == 'dead' then
            redis.call('HSET', dlq, x, y)
            redis.call('ZADD', dlq_idx, z, x)
          end
        end
      end
      if n > 0 then apply(base + 8, n) end
    end
    result[#result + 1] = ok
    base = base + 8 + 4 * n
  end

  if #fields > 0 then redis.call('HDEL', leases, unpack(fields)) end
  for _, stream in ipairs(streams) do
    redis.call('XACK', stream, group, unpack(by_stream[stream]))
    redis.call('XDEL', stream, unpack(by_stream[stream]))
  end
  if added ~= freed then redis.call('INCRBY', count, added - freed) end
  if #tokens > 0 then remember(settled_even, settled_odd, visibility, tokens) end
  return result
end
