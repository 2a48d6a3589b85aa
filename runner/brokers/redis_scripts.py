"""The Lua scripts of the Redis broker; each one runs atomically inside Redis.

Data model (every key starts with ``{namespace}:``, a hash tag, so all keys of one namespace live
in one Redis Cluster slot and a script may touch any of them):

- ``q:<type>``   stream of ready and leased tasks, one consumer group ``GROUP``. Entry fields:
  ``a`` = hand-outs before this entry (attempts already used), ``t`` = the JSON envelope.
  A task's attempt at hand-out is ``a`` + the entry's delivery count, which Redis keeps in the
  pending entries list (XREADGROUP sets it to 1, XAUTOCLAIM adds 1, ``XCLAIM JUSTID`` does not).
- ``d:<type>``   sorted set of delayed tasks scored by not_before; member ``"<nonce> <a> <t>"``
  (the nonce keeps two equal envelopes apart).
- ``leases``     hash ``"<entry id>@<stream key>"`` -> lease token of the current delivery. Every
  ack / retry / dead / release / extend checks the token first: XACK alone does not check who
  owns an entry, so this is what fences a worker whose delivery was reclaimed.
- ``count``      the capacity counter: tasks from put until ack or dead (XLEN cannot serve, as it
  would count what another consumer has read, and a stream is never trimmed below its unacked
  entries; acked entries are XDEL-ed instead).
- ``types``      set of every type ever put (for depth and the operator commands).
- ``dlq`` / ``dlq:idx``  hash task id -> dead-letter JSON, and a sorted set by dead_at.
"""

from __future__ import annotations

#: The one consumer group of every stream.
GROUP = "dq"

# Shared helpers, prepended to the scripts that need them.
_ENSURE_GROUP = """
local function ensure_group(stream, group)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  end
end
"""

#: KEYS: count, types, then per distinct type: stream, delayed.
#: ARGV: capacity, group, ntypes, type names..., then per task: type index, not_before, a, data.
#: ``data`` is the envelope for a ready task and the delayed-set member for a delayed one.
#: Returns 1 when every task was stored, 0 (and stores nothing) when capacity would be exceeded.
PUT = (
    _ENSURE_GROUP
    + """
local capacity, group, ntypes = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local first = 4 + ntypes
local n = (#ARGV - first + 1) / 4
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current + n > capacity then return 0 end
redis.call('INCRBY', KEYS[1], n)
for i = 1, ntypes do
  redis.call('SADD', KEYS[2], ARGV[3 + i])
end
for j = 0, n - 1 do
  local base = first + 4 * j
  local idx = tonumber(ARGV[base])
  local stream, delayed = KEYS[1 + 2 * idx], KEYS[2 + 2 * idx]
  if ARGV[base + 1] == '' then
    ensure_group(stream, group)
    redis.call('XADD', stream, '*', 'a', ARGV[base + 2], 't', ARGV[base + 3])
  else
    redis.call('ZADD', delayed, ARGV[base + 1], ARGV[base + 3])
  end
end
return 1
"""
)

#: KEYS: leases, then per type: stream, delayed.
#: ARGV: now, group, consumer, min_idle_ms, limit, nonce, reclaim (1/0), waits (1/0), then per
#: type: free slots.
#: For each type, in order: move due delayed tasks to the stream, reclaim deliveries idle longer
#: than the visibility timeout (XAUTOCLAIM; only with ``reclaim``: the broker asks for it a few
#: times per visibility timeout, not on every poll), then read new entries (XREADGROUP), never
#: more than the type's free slots nor ``limit`` in all. Every hand-out gets a fresh lease token.
#: Returns {deliveries, cursors, next_due}: deliveries flat as (type index, id, a, t,
#: delivery count, token, redelivered 0/1); with ``waits`` (a get that will block when nothing
#: came), cursors = last entry id per type (for XREAD BLOCK) and next_due = earliest delayed
#: score among these types, or ''; without, both empty.
_POLL_FN = """
local function poll(KEYS, ARGV)
  local now, group, consumer = ARGV[1], ARGV[2], ARGV[3]
  local min_idle, limit, nonce = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local reclaim, waits = ARGV[7] == '1', ARGV[8] == '1'
  local leases = KEYS[1]
  local ntypes = (#KEYS - 1) / 2
  local out, cursors, next_due = {}, {}, ''
  local handed, seq = 0, 0

  local function fields_of(entry_fields)
    local f = {}
    for k = 1, #entry_fields, 2 do f[entry_fields[k]] = entry_fields[k + 1] end
    return f
  end

  local function hand_out(i, stream, id, entry_fields, count, redelivered)
    local f = fields_of(entry_fields)
    seq = seq + 1
    local token = nonce .. ':' .. seq
    redis.call('HSET', leases, id .. '@' .. stream, token)
    local n = #out
    out[n + 1] = i; out[n + 2] = id; out[n + 3] = f['a'] or '0'; out[n + 4] = f['t'] or ''
    out[n + 5] = count; out[n + 6] = token; out[n + 7] = redelivered
    handed = handed + 1
  end

  for i = 1, ntypes do
    local stream, delayed = KEYS[2 * i], KEYS[2 * i + 1]
    local free = tonumber(ARGV[8 + i])
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
      if reclaim then
        local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, '0-0',
                                   'COUNT', want)
        for _, e in ipairs(claimed[2]) do
          if e[2] then
            local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
            hand_out(i, stream, e[1], e[2], p[1][4], 1)
            got = got + 1
          end
        end
      end
      want = math.min(free - got, limit - handed)
      if want > 0 then
        local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
                             'STREAMS', stream, '>')
        if r then
          for _, e in ipairs(r[1][2]) do hand_out(i, stream, e[1], e[2], 1, 0) end
        end
      end
    end
    if waits then
      local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
      cursors[i] = last[1] and last[1][1] or '0-0'
      local head = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
      if head[2] and (next_due == '' or tonumber(head[2]) < tonumber(next_due)) then
        next_due = head[2]
      end
    end
  end
  return {out, cursors, next_due}
end
"""
POLL = _ENSURE_GROUP + _POLL_FN + "return poll(KEYS, ARGV)\n"

#: KEYS: leases, count, dlq, dlq index, then per distinct type: stream, delayed.
#: ARGV: group, then per operation 7 fields: kind, type index, entry id, token, x, y, z, where
#: kind is one of
#:   ``ack``      (x, y, z unused): drop the entry, free its capacity slot;
#:   ``retry``    x = not_before, y = delayed-set member, z = now: drop the entry and queue the
#:                task again (it keeps its capacity slot while it waits; one already due goes
#:                straight back to the stream);
#:   ``dead``     x = task id, y = dead-letter record, z = dead_at: drop the entry, free its
#:                slot, store the record;
#:   ``release``  (x, y, z unused): copy the entry's bytes to a new entry at the tail (a stream
#:                cannot insert at its head) giving back the attempt this delivery used, so a
#:                released task is ready at once.
#: Operations run in order, each fenced by its own lease token, exactly as if each had been its
#: own script call (an entry dropped by an earlier op of the call fences later ones). The drops
#: themselves are gathered into one HDEL, one XACK and one XDEL per stream and one DECRBY at
#: the end. Returns one 1 (done) or 0 (fenced: another delivery owns the entry) per op.
_SETTLE_FN = """
local function settle(KEYS, ARGV)
  local leases, count, dlq, dlq_idx = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local group = ARGV[1]
  local result = {}
  local gone, fields, by_stream, streams, freed = {}, {}, {}, {}, 0

  local function lease_matches(stream, id, token)
    local field = id .. '@' .. stream
    return not gone[field] and redis.call('HGET', leases, field) == token
  end

  local function drop(stream, id)
    local field = id .. '@' .. stream
    gone[field] = true
    fields[#fields + 1] = field
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

  local function release(stream, id)
    local entry = redis.call('XRANGE', stream, id, id)
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    drop(stream, id)
    if entry[1] then
      local f = {}
      for k = 1, #entry[1][2], 2 do f[entry[1][2][k]] = entry[1][2][k + 1] end
      local used = (p[1] and p[1][4] or 1) - 1
      redis.call('XADD', stream, '*', 'a', tonumber(f['a'] or '0') + used, 't', f['t'] or '')
    end
  end

  for base = 2, #ARGV, 7 do
    local kind, idx = ARGV[base], tonumber(ARGV[base + 1])
    local id, token = ARGV[base + 2], ARGV[base + 3]
    local x, y, z = ARGV[base + 4], ARGV[base + 5], ARGV[base + 6]
    local stream, delayed = KEYS[3 + 2 * idx], KEYS[4 + 2 * idx]
    local ok = 0
    if lease_matches(stream, id, token) then
      ok = 1
      if kind == 'release' then
        release(stream, id)
      else
        drop(stream, id)
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
  return result
end
"""
SETTLE = _SETTLE_FN + "return settle(KEYS, ARGV)\n"

#: SETTLE then POLL in one script call (the dispatcher's ``exchange``).
#: KEYS: SETTLE's keys, then POLL's. ARGV: how many of KEYS are SETTLE's, how many of the
#: following ARGV are SETTLE's, SETTLE's ARGV, then POLL's. Returns {SETTLE's reply, POLL's}.
EXCHANGE = (
    _ENSURE_GROUP
    + _SETTLE_FN
    + _POLL_FN
    + """
local nkeys, nargs = tonumber(ARGV[1]), tonumber(ARGV[2])
local settle_keys, settle_args, poll_keys, poll_args = {}, {}, {}, {}
for i = 1, #KEYS do
  if i <= nkeys then settle_keys[#settle_keys + 1] = KEYS[i]
  else poll_keys[#poll_keys + 1] = KEYS[i] end
end
for i = 3, #ARGV do
  if i < 3 + nargs then settle_args[#settle_args + 1] = ARGV[i]
  else poll_args[#poll_args + 1] = ARGV[i] end
end
return {settle(settle_keys, settle_args), poll(poll_keys, poll_args)}
"""
)

#: KEYS: leases, then one stream per delivery. ARGV: group, consumer, then per delivery: id, token.
#: Resets the idle time of each delivery still ours (XCLAIM JUSTID does not bump the delivery
#: count). Returns a list of 1/0.
EXTEND = """
local group, consumer = ARGV[1], ARGV[2]
local result = {}
for i = 2, #KEYS do
  local id, token = ARGV[2 * i - 1], ARGV[2 * i]
  local ok = 0
  if redis.call('HGET', KEYS[1], id .. '@' .. KEYS[i]) == token then
    local claimed = redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'JUSTID')
    if #claimed > 0 then ok = 1 end
  end
  result[i - 1] = ok
end
return result
"""

#: KEYS: count, dlq, dlq index, types, then per distinct type: stream.
#: ARGV: capacity, group, ntypes, type names..., then per record: type index, task id, envelope.
#: Moves dead letters that still exist back to their streams with attempts reset; all or nothing
#: against capacity. Returns the number moved, or -1 when capacity would be exceeded.
REPLAY = (
    _ENSURE_GROUP
    + """
local capacity, group, ntypes = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local first = 4 + ntypes
local present = {}
for base = first, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[2], ARGV[base + 1]) == 1 then present[#present + 1] = base end
end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if #present > 0 and current + #present > capacity then return -1 end
for i = 1, ntypes do redis.call('SADD', KEYS[4], ARGV[3 + i]) end
for _, base in ipairs(present) do
  local stream = KEYS[4 + tonumber(ARGV[base])]
  ensure_group(stream, group)
  redis.call('XADD', stream, '*', 'a', '0', 't', ARGV[base + 2])
  redis.call('HDEL', KEYS[2], ARGV[base + 1])
  redis.call('ZREM', KEYS[3], ARGV[base + 1])
end
redis.call('INCRBY', KEYS[1], #present)
return #present
"""
)

#: KEYS: per type: stream, delayed. ARGV: group, now.
#: Returns per type: {entries in the stream, pending (leased) entries, delayed, delayed but due}.
DEPTH = """
local result = {}
for i = 1, #KEYS, 2 do
  local stream, delayed = KEYS[i], KEYS[i + 1]
  local length, pending = 0, 0
  if redis.call('EXISTS', stream) == 1 then
    length = redis.call('XLEN', stream)
    local ok, summary = pcall(redis.call, 'XPENDING', stream, ARGV[1])
    if ok then pending = summary[1] end
  end
  result[#result + 1] = {length, pending, redis.call('ZCARD', delayed),
                        redis.call('ZCOUNT', delayed, '-inf', ARGV[2])}
end
return result
"""
