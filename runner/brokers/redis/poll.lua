-- KEYS: leases, gates, then per type: stream, delayed.
-- ARGV: now, group, consumer, min_idle_ms, limit, nonce, waits (1/0), then per type: name,
-- free slots, reclaim (1/0).
-- First the gates: a type whose pause is in force (its ``gates`` field is '' or a time after
-- Redis' TIME) has 0 free slots; a pause found over is deleted. TIME is read only when some
-- wanted type has a gate, so a namespace without gates pays one HMGET of a missing key.
-- For each type, in order: move due delayed tasks to the stream (a gated type's too), hand out
-- released entries again (oldest first), reclaim deliveries idle longer than the visibility
-- timeout (XAUTOCLAIM, scanning on past live leases; only with the type's ``reclaim``: the
-- broker asks for it a few times per visibility timeout, not on every poll), then read new
-- entries (XREADGROUP), never more than the type's free slots nor ``limit`` in all. Every
-- hand-out gets a fresh lease token.
-- Returns {deliveries, cursors, next_due}: deliveries flat as (type index, id, a, t,
-- delivery count, token, redelivered 0/1); with ``waits`` (a get that will block when nothing
-- came), cursors = last entry id per type (for XREAD BLOCK), '' for a gated type (nothing of
-- it can come, so the read leaves its stream out), and next_due = earliest delayed score among
-- these types, or ''; without, both empty.
local function poll(KEYS, ARGV)
  local now, group, consumer = ARGV[1], ARGV[2], ARGV[3]
  local min_idle, limit, nonce = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local waits = ARGV[7] == '1'
  local leases, gates = KEYS[1], KEYS[2]
  local ntypes = (#KEYS - 2) / 2
  local out, cursors, next_due = {}, {}, ''
  local handed, seq = 0, 0

  local function fields_of(entry_fields)
    local f = {}
    for k = 1, #entry_fields, 2 do f[entry_fields[k]] = entry_fields[k + 1] end
    return f
  end

  local function hand_out(i, stream, id, entry_fields, count)
    local f = fields_of(entry_fields)
    seq = seq + 1
    local token = nonce .. ':' .. seq
    redis.call('HSET', leases, id .. '@' .. stream, token)
    local n = #out
    out[n + 1] = i; out[n + 2] = id; out[n + 3] = f['a'] or '0'; out[n + 4] = f['t'] or ''
    out[n + 5] = count; out[n + 6] = token; out[n + 7] = tonumber(count) >= 2 and 1 or 0
    handed = handed + 1
  end

  local function pending_count(stream, id)
    return redis.call('XPENDING', stream, group, id, id, 1)[1][4]
  end

  local names, pauses = {}, {}
  for i = 1, ntypes do names[i] = ARGV[5 + 3 * i] end
  if ntypes > 0 then pauses = redis.call('HMGET', gates, unpack(names)) end
  local gated, clock = {}, nil
  for i, pause in ipairs(pauses) do  -- HMGET answers false (not nil) for a missing field
    if pause == '' then
      gated[i] = true
    elseif pause then
      if not clock then
        local t = redis.call('TIME')
        clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
      end
      if tonumber(pause) > clock then
        gated[i] = true
      else
        redis.call('HDEL', gates, names[i])
      end
    end
  end

  for i = 1, ntypes do
    local stream, delayed = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
    local free, reclaim = tonumber(ARGV[6 + 3 * i]), ARGV[7 + 3 * i] == '1'
    if gated[i] then free = 0 end
    ensure_group(stream, group)
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
    for _, member in ipairs(due) do
      local _, a, t = string.match(member, '^(%S+) (%d+) (.*)$')
      if t then redis.call('XADD', stream, '*', 'a', a, 't', t) end
      redis.call('ZREM', delayed, member)
    end
    local want = math.min(free, limit - handed)
    if want > 0 then
      local got = 0
      for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', want, '~released')) do
        local e = redis.call('XCLAIM', stream, group, consumer, 0, p[1])[1]  -- count + 1
        if e then
          hand_out(i, stream, e[1], e[2], p[4] + 1)
          got = got + 1
        end
      end
      want = math.min(free - got, limit - handed)
      -- XAUTOCLAIM looks at COUNT x 10 pending entries per call: go on past live leases
      -- (bounded, as this runs inside Redis) to find the expired ones behind them.
      local start, scans = '0-0', 0
      while reclaim and want > 0 and scans < 100 do
        local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, start,
                                   'COUNT', want)
        for _, e in ipairs(claimed[2]) do
          if e[2] then
            hand_out(i, stream, e[1], e[2], pending_count(stream, e[1]))
            got = got + 1
          end
        end
        start, scans = claimed[1], scans + 1
        if start == '0-0' then break end
        want = math.min(free - got, limit - handed)
      end
      want = math.min(free - got, limit - handed)
      if want > 0 then
        local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                             'STREAMS', stream, '>')
        if r then
          for _, e in ipairs(r[1][2]) do hand_out(i, stream, e[1], e[2], 1) end
        end
      end
    end
    if waits then
      if gated[i] then
        cursors[i] = ''
      else
        local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
        cursors[i] = last[1] and last[1][1] or '0-0'
      end
      local head = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
      if head[2] and (next_due == '' or tonumber(head[2]) < tonumber(next_due)) then
        next_due = head[2]
      end
    end
  end
  return {out, cursors, next_due}
end
