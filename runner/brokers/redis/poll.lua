-- KEYS: leases, gates, rates, buckets, breakers, circuits, then per type: stream, delayed.
-- ARGV: now, group, consumer, min_idle_ms, limit, nonce, waits (1/0), then per type: name,
-- free slots, reclaim (1/0).
-- First the gates. A type whose pause is in force (its ``gates`` field is '' or a time after
-- Redis' TIME) has 0 free slots; a pause found over is deleted. A type with a rate limit (and
-- no pause in force) has its bucket refilled to TIME (bucket.lua, as runner/brokers/flow.py
-- does), and no more free slots than the bucket's whole tokens; after its claim the bucket,
-- less one token per task handed out, is stored. A type with a circuit breaker (and no pause
-- in force) has its circuit moved on to TIME (circuit.lua, as runner/brokers/flow.py does), and
-- no more free slots than the circuit allows (none while open, the probes left while
-- half-open); after its claim the circuit, with the probes handed out, is stored when it
-- changed. TIME is read only when some wanted type has a gate, so a namespace without gates
-- pays one HMGET of a missing key for each kind.
-- For each type, in order: move due delayed tasks to the stream (a gated type's too; making
-- the stream and its group if need be), then, unless the stream is empty (an idle type costs
-- one XLEN), hand out released entries again (oldest first), reclaim deliveries idle longer
-- than the visibility timeout (XAUTOCLAIM, scanning on past live leases; only with the type's
-- ``reclaim``: the broker asks for it a few times per visibility timeout, not on every poll),
-- then read new entries (XREADGROUP), never more than the type's free slots nor ``limit`` in
-- all. Every hand-out gets a fresh lease token.
-- Returns {deliveries, cursors, next_due}: deliveries flat as (type index, id, a, t,
-- delivery count, token, redelivered 0/1); with ``waits`` (a get that will block when nothing
-- came), cursors = last entry id per type (for XREAD BLOCK), '' for a type held back (paused,
-- its bucket without a whole token, or its circuit open or out of probes: nothing of it can
-- come before the next poll, so the read leaves its stream out), and next_due = the earliest
-- of the delayed scores among these types, the next tokens of their empty buckets and the
-- times their held circuits may probe again (on the caller's clock, ``now``), or ''; without,
-- both empty.
local function poll(KEYS, ARGV)
  local now, group, consumer = ARGV[1], ARGV[2], ARGV[3]
  local min_idle, limit, nonce = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local waits = ARGV[7] == '1'
  local leases, gates, rates, buckets = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local breakers, circuits = KEYS[5], KEYS[6]
  local ntypes = (#KEYS - 6) / 2
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

  local clock = nil  -- Redis' TIME as epoch seconds, read once, when first needed
  local function redis_time()
    if not clock then clock = redis_seconds() end
    return clock
  end

  local function earlier(due)  -- ``due`` (a number or score string) joins next_due
    if next_due == '' or tonumber(due) < tonumber(next_due) then
      next_due = string.format('%.17g', tonumber(due))
    end
  end

  local names, pauses, limits, breaking = {}, {}, {}, {}
  for i = 1, ntypes do names[i] = ARGV[5 + 3 * i] end
  if ntypes > 0 then
    pauses = redis.call('HMGET', gates, unpack(names))
    limits = redis.call('HMGET', rates, unpack(names))
    breaking = redis.call('HMGET', breakers, unpack(names))
  end
  local gated = {}
  for i, pause in ipairs(pauses) do  -- HMGET answers false (not nil) for a missing field
    if pause == '' then
      gated[i] = true
    elseif pause then
      if tonumber(pause) > redis_time() then
        gated[i] = true
      else
        redis.call('HDEL', gates, names[i])
      end
    end
  end
  -- The types with a gate of ``fields`` (HMGET's answer) that a pause does not hold back,
  -- as index -> the gate's field and the type's state field in ``states`` (false: none).
  local function ungated(fields, states)
    local which, asked, found = {}, {}, {}
    for i, field in ipairs(fields) do
      if field and not gated[i] then
        which[#which + 1] = i
        asked[#asked + 1] = names[i]
      end
    end
    if #which > 0 then
      local kept = redis.call('HMGET', states, unpack(asked))
      for k, i in ipairs(which) do found[i] = {field = fields[i], state = kept[k]} end
    end
    return found
  end
  -- The rate-limited types: index -> {rate, refilled bucket}.
  local limited = {}
  for i, stored in pairs(ungated(limits, buckets)) do
    local rate, burst = string.match(stored.field, '^(%S+) (%S+)$')
    rate, burst = tonumber(rate), tonumber(burst)
    limited[i] = {rate, bucket_refilled(rate, burst, bucket_decode(stored.state), redis_time())}
  end
  -- The circuit-broken types: index -> {breaker, circuit as of TIME, its stored field (false:
  -- none yet)}.
  local broken = {}
  for i, stored in pairs(ungated(breaking, circuits)) do
    local breaker = breaker_decode(stored.field)
    local circuit = circuit_at(breaker, circuit_decode(stored.state), redis_time())
    broken[i] = {breaker, circuit, stored.state}
  end

  for i = 1, ntypes do
    local stream, delayed = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
    local free, reclaim = tonumber(ARGV[6 + 3 * i]), ARGV[7 + 3 * i] == '1'
    if gated[i] then free = 0 end
    if limited[i] then free = math.min(free, bucket_whole(limited[i][2])) end
    if broken[i] then
      local allowed = circuit_allows(broken[i][1], broken[i][2])
      if allowed then free = math.min(free, allowed) end
    end
    local before = handed
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
    if #due > 0 then ensure_group(stream, group) end
    for _, member in ipairs(due) do
      local _, a, t = string.match(member, '^(%S+) (%d+) (.*)$')
      if t then redis.call('XADD', stream, '*', 'a', a, 't', t) end
      redis.call('ZREM', delayed, member)
    end
    -- An empty stream (or none yet) has no entry to hand out, released, expired or new (an
    -- entry stays in it until its ack or dead-letter): an idle type costs this one call.
    local empty = redis.call('XLEN', stream) == 0
    local want = math.min(free, limit - handed)
    if want > 0 and not empty then
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
    local held = false  -- nothing of the type can be handed out before next_due
    if limited[i] then
      local rate, bucket = limited[i][1], bucket_taken(limited[i][2], handed - before)
      redis.call('HSET', buckets, names[i], bucket_encode(bucket))
      if waits and bucket_whole(bucket) == 0 then
        -- Its next token is the earliest a blocked get can hand one out (whether or not any
        -- wait: waking for none costs one poll). Told on the caller's clock, as delayed
        -- scores are: now + the time to the token on Redis'.
        held = true
        earlier(tonumber(now) + (bucket_next_token_at(rate, bucket) - redis_time()))
      end
    end
    if broken[i] then
      local breaker, field = broken[i][1], broken[i][3]
      local circuit = circuit_handed(broken[i][2], handed - before)
      local encoded = circuit_encode(circuit)
      if encoded ~= field then redis.call('HSET', circuits, names[i], encoded) end
      local reopens = waits and circuit_reopens_at(breaker, circuit)
      if reopens then  -- it may probe then (told on the caller's clock, as above)
        held = true
        earlier(tonumber(now) + (reopens - redis_time()))
      end
    end
    if waits then
      if gated[i] or held then
        cursors[i] = ''
      else
        local last = not empty and redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
        cursors[i] = last and last[1] and last[1][1] or '0-0'
      end
      local head = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
      if head[2] then earlier(head[2]) end
    end
  end
  return {out, cursors, next_due}
end
