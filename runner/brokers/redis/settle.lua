-- KEYS: leases, count, dlq, dlq index, the two settled-token sets (parity 0, 1), types,
-- breakers, circuits, held, then per distinct type: stream, delayed, then each value key the
-- effects touch (``v:<key>``).
-- ARGV: group, visibility timeout in ms, ntypes, then per operation 8 fields: kind, type
-- index, entry id, token, x, y, z, n, followed by its n effects, then the ntypes type names
-- (in KEYS' order), where kind is one of
-- ``ack``      x = task id (y, z unused): drop the entry, free its capacity slot;
-- ``retry``    x = not_before, y = delayed-set member, z = now: drop the entry and queue the
-- task again (it keeps its capacity slot while it waits; one already due goes
-- straight back to the stream);
-- ``dead``     x = task id, y = dead-letter record, z = dead_at: drop the entry, free its
-- slot, store the record;
-- ``release``  (x, y, z unused): leave the entry in its place, pending for ``RELEASED``,
-- giving back the delivery count (the attempt) this delivery used, so a
-- released task is ready at once, before newer ones (see POLL);
-- an ack or dead also drops the task's id from ``held`` at once, so its effects may put it
-- back (a task that could not be decoded is settled as ``redis:<entry id>``, broker.py: the
-- id it is held under is read off its envelope);
-- and each effect is 5 fields, applied in order only when its op answers 1 (done now):
-- ``unless``  value index, '', '', '': when the value key is set, the op's ``put``, ``later``,
-- ``part`` and ``dead`` effects that follow are skipped;
-- ``put``     type index, a, envelope, task id: a task put ready (XADD), as put.lua;
-- ``later``   type index, not_before, delayed-set member, task id: a task put delayed (ZADD);
-- ``part``    value index, part index, value, size: one part of a join, kept in the hash at the
-- value key (HSETNX: a part kept at that index stays). It is followed by the ``put`` or
-- ``later`` of the join's task, which applies only when this part makes ``size`` parts kept:
-- then the JSON array of the parts, in index order, is spliced in for its payload
-- (``JOINED``, scripts.py), the hash is deleted and so is the dead-letter record of the
-- task's id, if any;
-- ``dead``    '', task id, dead-letter record, dead_at: the record is stored (replacing one of
-- the same id);
-- ``set``     value index, value, ttl in ms ('' = none), '': SET the value key (PX);
-- ``del``     value index, '', '', '': DEL the value key;
-- ``circuit`` type index, 1 (succeeded) or 0 (failed), '', '': an outcome of the type for its
-- circuit breaker: when the type has one (``breakers``), its circuit is moved on to TIME and
-- the outcome recorded (circuit.lua, as runner/brokers/flow.py does); else it is not kept.
-- A put whose task id is held (ready, delayed or leased) is skipped. Puts take capacity slots
-- (INCRBY) but are never refused for capacity, and add their type to ``types``. A value index
-- i is KEYS[10 + 2 * ntypes + i].
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
  local breakers, circuits, held = KEYS[8], KEYS[9], KEYS[10]
  local group, visibility, ntypes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
  local values, names = 10 + 2 * ntypes, #ARGV - ntypes
  local result = {}
  local gone, fields, by_stream, streams, freed, added = {}, {}, {}, {}, 0, 0
  local typed, grouped = {}, {}
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

  -- the id that the task of entry ``id``, acked or dead as ``task_id``, is held under (nil:
  -- none; see the header)
  local function held_id(stream, id, task_id)
    if task_id ~= 'redis:' .. id then return task_id end
    local entry = redis.call('XRANGE', stream, id, id)[1]
    for k = 1, entry and #entry[2] or 0, 2 do
      if entry[2][k] == 't' then
        local ok, envelope = pcall(cjson.decode, entry[2][k + 1])
        if ok and type(envelope) == 'table' and type(envelope['id']) == 'string' then
          return envelope['id']
        end
      end
    end
    return nil
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

  -- a ``put`` or ``later`` effect of task ``id``, unless that id is held
  local function put(what, i, x, y, id)
    if not hold_if_free(held, id) then return end
    if what == 'put' then
      local stream = KEYS[9 + 2 * i]
      ensure_group_once(grouped, i, stream, group)
      redis.call('XADD', stream, '*', 'a', x, 't', y)
    else
      redis.call('ZADD', KEYS[10 + 2 * i], x, y)
    end
    added = added + 1
    if not typed[i] then
      typed[i] = true
      redis.call('SADD', types, ARGV[names + i])
    end
  end

  -- a ``part`` effect: the join's parts in index order once ``size`` are kept (its hash
  -- deleted), else nil
  local function arrive(key, index, value, size)
    redis.call('HSETNX', key, index, value)
    if redis.call('HLEN', key) < size then return nil end
    local kept, order, parts = redis.call('HGETALL', key), {}, {}
    for k = 1, #kept, 2 do order[#order + 1] = {tonumber(kept[k]), kept[k + 1]} end
    table.sort(order, function(a, b) return a[1] < b[1] end)
    for k, part in ipairs(order) do parts[k] = part[2] end
    redis.call('DEL', key)
    return parts
  end

  -- ``data`` (an envelope or delayed-set member) with the JSON array of ``parts`` for payload
  local function spliced(data, parts)
    local from, to = string.find(data, JOINED, 1, true)
    local payload = '"payload":[' .. table.concat(parts, ',') .. ']'
    return string.sub(data, 1, from - 1) .. payload .. string.sub(data, to + 1)
  end

  -- the n effects from ARGV[first] on (see the header)
  local function apply(first, n)
    local skip, joining, parts = false, false, nil
    for e = first, first + 5 * (n - 1), 5 do
      local what, i = ARGV[e], tonumber(ARGV[e + 1])
      local x, y, z = ARGV[e + 2], ARGV[e + 3], ARGV[e + 4]
      if what == 'unless' then
        skip = redis.call('EXISTS', KEYS[values + i]) == 1
      elseif what == 'set' then
        if y == '' then
          redis.call('SET', KEYS[values + i], x)
        else
          redis.call('SET', KEYS[values + i], x, 'PX', y)
        end
      elseif what == 'del' then
        redis.call('DEL', KEYS[values + i])
      elseif what == 'circuit' then
        record(ARGV[names + i], x == '1')
      elseif skip then  -- a hand-off (put, later, part, dead) of a cancelled pipeline
      elseif what == 'part' then
        joining, parts = true, arrive(KEYS[values + i], x, y, tonumber(z))
      elseif what == 'dead' then
        redis.call('HSET', dlq, x, y)
        redis.call('ZADD', dlq_idx, z, x)
      elseif not joining then
        put(what, i, x, y, z)
      else
        joining = false
        if parts then
          redis.call('HDEL', dlq, z)
          redis.call('ZREM', dlq_idx, z)
          put(what, i, x, spliced(y, parts), z)
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
    local stream, delayed = KEYS[9 + 2 * idx], KEYS[10 + 2 * idx]
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
          local task_id = held_id(stream, id, x)
          if task_id then unhold(held, task_id) end
          if kind == 'dead' then
            redis.call('HSET', dlq, x, y)
            redis.call('ZADD', dlq_idx, z, x)
          end
        end
      end
      if n > 0 then apply(base + 8, n) end
    end
    result[#result + 1] = ok
    base = base + 8 + 5 * n
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
