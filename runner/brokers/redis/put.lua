-- KEYS: count, types, held, then per distinct type: stream, delayed.
-- ARGV: capacity, group, ntypes, type names..., then per task: type index, not_before, a, data,
-- task id. ``data`` is the envelope for a ready task and the delayed-set member for a delayed
-- one.
-- Returns 1 when every task was stored (and held under its id), 0 (and stores nothing) when
-- capacity would be exceeded.
local function put(KEYS, ARGV)
  local capacity, group, ntypes = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
  local first = 4 + ntypes
  local n = (#ARGV - first + 1) / 5
  local current = tonumber(redis.call('GET', KEYS[1]) or '0')
  if current + n > capacity then return 0 end
  redis.call('INCRBY', KEYS[1], n)
  for i = 1, ntypes do
    redis.call('SADD', KEYS[2], ARGV[3 + i])
  end
  local grouped = {}
  for j = 0, n - 1 do
    local base = first + 5 * j
    local idx = tonumber(ARGV[base])
    local stream, delayed = KEYS[2 + 2 * idx], KEYS[3 + 2 * idx]
    if ARGV[base + 1] == '' then
      ensure_group_once(grouped, idx, stream, group)
      redis.call('XADD', stream, '*', 'a', ARGV[base + 2], 't', ARGV[base + 3])
    else
      redis.call('ZADD', delayed, ARGV[base + 1], ARGV[base + 3])
    end
    hold(KEYS[3], ARGV[base + 4])
  end
  return 1
end
