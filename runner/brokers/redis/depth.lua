-- KEYS: per type: stream, delayed. ARGV: group, now.
-- Returns per type: {entries in the stream, pending (leased) entries, delayed, delayed but due}.
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
