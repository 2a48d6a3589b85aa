-- The memory of settled tokens (the ``settled:<ms>:*`` sets of the module docstring).
local function was_settled(even, odd, token)
  return redis.call('SISMEMBER', even, token) == 1 or redis.call('SISMEMBER', odd, token) == 1
end
