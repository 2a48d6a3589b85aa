-- TIME is Redis' clock; a script may write after it, as scripts replicate their effects (the
-- only mode Redis 7 has).
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
