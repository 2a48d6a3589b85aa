-- Redis' clock (TIME) as epoch seconds, computed as admin.py's _seconds computes it. A script
-- may write after it, as scripts replicate their effects (the only mode Redis 7 has).
local function redis_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
