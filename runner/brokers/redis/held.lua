-- The ``held`` index (scripts.py): task id -> how many copies of it are queued.
local function hold(held, id)
  redis.call('HINCRBY', held, id, 1)
end

local function unhold(held, id)
  if redis.call('HINCRBY', held, id, -1) <= 0 then redis.call('HDEL', held, id) end
end

local function is_held(held, id)
  return redis.call('HEXISTS', held, id) == 1
end
