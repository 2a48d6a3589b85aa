"""The Lua scripts of the Redis broker; each one runs atomically inside Redis.

Data model (every key starts with ``{namespace}:``, a hash tag, so all keys of one namespace live
in one Redis Cluster slot and a script may touch any of them):

- ``q:<type>``   stream of ready and leased tasks, one consumer group ``GROUP``. Entry fields:
  ``a`` = hand-outs before this entry (attempts already used), ``t`` = the JSON envelope.
  A task's attempt at hand-out is ``a`` + the entry's delivery count, which Redis keeps in the
  pending entries list (XREADGROUP sets it to 1, XAUTOCLAIM adds 1, ``XCLAIM JUSTID`` does not).
  A delivery count of 2 or more means a lease of the entry expired: it is handed out as
  *redelivered*. A released entry stays where it is, pending for the consumer ``RELEASED``
  with its delivery count lowered by one, so it is handed out again before newer entries, with
  the same attempt and redelivered flag (as on the other brokers).
- ``d:<type>``   sorted set of delayed tasks scored by not_before; member ``"<nonce> <a> <t>"``
  (the nonce keeps two equal envelopes apart).
- ``leases``     hash ``"<entry id>@<stream key>"`` -> lease token of the current delivery. Every
  ack / retry / dead / release / extend checks the token first: XACK alone does not check who
  owns an entry, so this is what fences a worker whose delivery was reclaimed.
- ``settled:<ms>:0`` / ``settled:<ms>:1``  sets of the lease tokens settled recently by brokers
  whose visibility timeout is ``<ms>`` milliseconds, so that a settle or renewal under a token
  that already settled answers *already done*, not *fenced* (a resent call whose reply was
  lost, a renewal racing the settle). Redis' clock cuts time into buckets one visibility
  timeout wide; bucket ``b`` writes the set of parity ``b % 2``, which holds the member
  ``#<b>``: a settle finding another bucket's mark there empties the set first. A set expires
  at the end of bucket ``b + 1``, so a token is remembered for one to two visibility timeouts,
  and the two sets hold at most two buckets' settles (at 10,000 settles/s and a 30 s visibility
  timeout, about 0.6 million tokens, roughly 50 MB). Tokens are unique (a random nonce per
  broker), so any token found in either set did settle. Only the broker that settled a token
  sends it again, so brokers of one namespace with different visibility timeouts keep
  separate sets.
- ``count``      the capacity counter: tasks from put until ack or dead (XLEN cannot serve, as it
  would count what another consumer has read, and a stream is never trimmed below its unacked
  entries; acked entries are XDEL-ed instead).
- ``types``      set of every type ever put (for depth and the operator commands).
- ``dlq`` / ``dlq:idx``  hash task id -> dead-letter JSON, and a sorted set by dead_at.
- ``wake:<consumer>``  one broker's wake stream (one entry, expiring): ``wake()`` adds to it to
  end that broker's blocked XREAD (runner/brokers/redis.py), never read by a script.
"""

from __future__ import annotations

#: The one consumer group of every stream.
GROUP = "dq"
#: The consumer that released entries are pending for until a poll hands them out again (no
#: real consumer has this name: theirs are "host:pid:random"). Spelled out in the scripts.
RELEASED = "~released"

# Shared helpers, prepended to the scripts that need them.
_ENSURE_GROUP = """
local function ensure_group(stream, group)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  end
end
"""

# The memory of settled tokens (the ``settled:<ms>:*`` sets of the module docstring).
_WAS_SETTLED = """
local function was_settled(even, odd, token)
  return redis.call('SISMEMBER', even, token) == 1 or redis.call('SISMEMBER', odd, token) == 1
end
"""

# TIME is Redis' clock; a script may write after it, as scripts replicate their effects (the
# only mode Redis 7 has).
_REMEMBER = """
local function remember(even, odd, visibility, tokens)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local bucket = math.floor(ms / visibility)
  local key = even
  if bucket % 2 == 1 then key = odd end
  local mark = string.format('#%d', bucket)
  if redis.call('SISMEMBER', key, mark) == 0 then
    redis.call('DEL', key)
    redis.call('SADD', key, mark)
    redis.call('PEXPIREAT', key, string.format('%d', (bucket + 2) * visibility))
  end
  redis.call('SADD', key, unpack(tokens))
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
#: ARGV: now, group, consumer, min_idle_ms, limit, nonce, waits (1/0), then per type: free
#: slots, reclaim (1/0).
#: For each type, in order: move due delayed tasks to the stream, hand out released entries
#: again (oldest first), reclaim deliveries idle longer than the visibility timeout (XAUTOCLAIM,
#: scanning on past live leases; only with the type's ``reclaim``: the broker asks for it a few
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
  local waits = ARGV[7] == '1'
  local leases = KEYS[1]
  local ntypes = (#KEYS - 1) / 2
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

  for i = 1, ntypes do
    local stream, delayed = KEYS[2 * i], KEYS[2 * i + 1]
    local free, reclaim = tonumber(ARGV[6 + 2 * i]), ARGV[7 + 2 * i] == '1'
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

#: KEYS: leases, count, dlq, dlq index, the two settled-token sets (parity 0, 1), then per
#: distinct type: stream, delayed.
#: ARGV: group, visibility timeout in ms, then per operation 7 fields: kind, type index, entry
#: id, token, x, y, z, where
#: kind is one of
#:   ``ack``      (x, y, z unused): drop the entry, free its capacity slot;
#:   ``retry``    x = not_before, y = delayed-set member, z = now: drop the entry and queue the
#:                task again (it keeps its capacity slot while it waits; one already due goes
#:                straight back to the stream);
#:   ``dead``     x = task id, y = dead-letter record, z = dead_at: drop the entry, free its
#:                slot, store the record;
#:   ``release``  (x, y, z unused): leave the entry in its place, pending for ``RELEASED``,
#:                giving back the delivery count (the attempt) this delivery used, so a
#:                released task is ready at once, before newer ones (see POLL).
#: Operations run in order, each fenced by its own lease token, exactly as if each had been its
#: own script call (an op on an entry an earlier op of the call dropped answers as it would
#: after that call). The drops themselves are gathered into one HDEL, one XACK and one XDEL per
#: stream, one DECRBY and one SADD of the settled tokens at the end. Returns per op: 1 (done
#: now), 2 (already done: this token settled the entry before, in this call or an earlier one)
#: or 0 (fenced: another delivery owns the entry, or its lease expired).
_SETTLE_FN = """
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
"""
SETTLE = _WAS_SETTLED + _REMEMBER + _SETTLE_FN + "return settle(KEYS, ARGV)\n"

#: SETTLE then POLL in one script call (the dispatcher's ``exchange``).
#: KEYS: SETTLE's keys, then POLL's. ARGV: how many of KEYS are SETTLE's, how many of the
#: following ARGV are SETTLE's, SETTLE's ARGV, then POLL's. Returns {SETTLE's reply, POLL's}.
EXCHANGE = (
    _ENSURE_GROUP
    + _WAS_SETTLED
    + _REMEMBER
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

#: KEYS: leases, the two settled-token sets (parity 0, 1), then one stream per delivery.
#: ARGV: group, consumer, then per delivery: id, token.
#: Resets the idle time of each delivery still ours (XCLAIM JUSTID does not bump the delivery
#: count). Returns per delivery: 1 (renewed), 2 (already done: its token settled the entry,
#: e.g. a renewal racing the ack) or 0 (fenced).
EXTEND = (
    _WAS_SETTLED
    + """
local group, consumer = ARGV[1], ARGV[2]
local result = {}
for i = 4, #KEYS do
  local id, token = ARGV[2 * i - 5], ARGV[2 * i - 4]
  local ok = 0
  if redis.call('HGET', KEYS[1], id .. '@' .. KEYS[i]) == token then
    local claimed = redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'JUSTID')
    if #claimed > 0 then ok = 1 end
  elseif was_settled(KEYS[2], KEYS[3], token) then
    ok = 2
  end
  result[i - 3] = ok
end
return result
"""
)

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
    if ok then
      pending = summary[1]
      for _, c in ipairs(summary[4] or {}) do  -- released entries are ready, not leased
        if c[1] == '~released' then pending = pending - tonumber(c[2]) end
      end
    end
  end
  result[#result + 1] = {length, pending, redis.call('ZCARD', delayed),
                        redis.call('ZCOUNT', delayed, '-inf', ARGV[2])}
end
return result
"""
