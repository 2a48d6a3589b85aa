-- KEYS: count, dlq, dlq index, types, held, then per distinct type: stream.
-- ARGV: capacity, group, ntypes, type names..., then per record: type index, task id, envelope.
-- Moves dead letters that still exist back to their streams with attempts reset (each held
-- under its id again); all or nothing against capacity. Returns the number moved, or -1 when
-- capacity would be exceeded.
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
  local stream = KEYS[5 + tonumber(ARGV[base])]
  ensure_group(stream, group)
  redis.call('XADD', stream, '*', 'a', '0', 't', ARGV[base + 2])
  redis.call('HDEL', KEYS[2], ARGV[base + 1])
  redis.call('ZREM', KEYS[3], ARGV[base + 1])
  hold(KEYS[5], ARGV[base + 1])
end
redis.call('INCRBY', KEYS[1], #present)
return #present
