-- KEYS: leases, count, dlq, dlq index, the two settled-token sets (parity 0, 1), then per
-- distinct type: stream, delayed.
-- ARGV: group, visibility timeout in ms, then per operation 7 fields: kind, type index, entry
-- id, token, x, y, z, where
-- kind is one of
-- ``ack``      (x, y, z unused): drop the entry, free its capacity slot;
-- ``retry``    x = not_before, y = delayed-set member, z = now: drop the entry and queue the
-- task again (it keeps its capacity slot while it waits; one already due goes
-- straight back to the stream);
-- ``dead``     x = task id, y = dead-letter record, z = dead_at: drop the entry, free its
-- slot, store the record;
-- ``release``  (x, y, z unused): leave the entry in its place, pending for ``RELEASED``,
-- giving back the delivery count (the attempt) this delivery used, so a
-- released task is ready at once, before newer ones (see POLL).
-- Operations run in order, each fenced by its own lease token, exactly as if each had been its
-- own script call (an op on an entry an earlier op of the call dropped answers as it would
-- after that call). The drops themselves are gathered into one HDEL, one XACK and one XDEL per
-- stream, one DECRBY and one SADD of the settled tokens at the end. Returns per op: 1 (done
-- now), 2 (already done: this token settled the entry before, in this call or an earlier one)
-- or 0 (fenced: another delivery owns the entry, or its lease expired).
local function settle(KEYS, ARGV)
  local leases, count, dlq, dlq_idx = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local settled_even, settled_odd = KEYS[5], KEYS[6]
  local group, visibility = ARGV[1], tonumber(ARGV[2])
  local result = {}
  local gone, fields, by_stream, streams, freed = {}, {}, {}, {}, 0
  local tokens, settled_now = {}, {}

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

  for base = 3, #ARGV, 7 do
    local kind, idx = ARGV[base], tonumber(ARGV[base + 1])
    local id, token = ARGV[base + 2], ARGV[base + 3]
    local x, y, z = ARGV[base + 4], ARGV[base + 5], ARGV[base + 6]
    local stream, delayed = KEYS[5 + 2 * idx], KEYS[6 + 2 * idx]
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
    end
    result[#result + 1] = ok
  end

  if #fields > 0 then redis.call('HDEL', leases, unpack(fields)) end
  for _, stream in ipairs(streams) do
    redis.call('XACK', stream, group, unpack(by_stream[stream]))
    redis.call('XDEL', stream, unpack(by_stream[stream]))
  end
  if freed > 0 then redis.call('DECRBY', count, freed) end
  if #tokens > 0 then remember(settled_even, settled_odd, visibility, tokens) end
  return result
end
