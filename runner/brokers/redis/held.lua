-- The ``held`` index (scripts.py): task id -> how many copies of it are queued.
local function hold(held, id)
  redis.call('HINCRBY', held, id, 1)
end

local function unhold(held, id)
  if redis.call('HINCRBY', held, id, -1) <= 0 then redis.call('HDEL', held, id) end
end

-- Holds ``id`` once when no copy of it is queued (one call: HSETNX sets it to 1 only when it
-- is absent); true when it did, false when the id was held already.
local function hold_if_free(held, id)
  return redis.call('HSETNX', held, id, 1) == 1
end
