-- The token bucket of a RateLimit gate (the ``rates`` and ``buckets`` hashes of scripts.py).
-- This mirrors runner/brokers/flow.py step for step: the same operations in the same order and
-- the same epsilon, so Redis hands out what the memory and SQLite brokers would. Keep the two
-- in step. A bucket is {tokens, at, limited_s}; time is Redis' clock (TIME).
local BUCKET_EPSILON = 1e-9  -- flow._EPSILON: tokens a little short of a whole one count as it

-- flow.refilled: ``bucket`` (nil: none yet, a full one) as of ``now``.
local function bucket_refilled(rate, burst, bucket, now)
  if not bucket then return {burst, now, 0} end
  local tokens, at, limited = bucket[1], bucket[2], bucket[3]
  if now <= at then return bucket end  -- a clock stepped back refills nothing
  if tokens < 1 - BUCKET_EPSILON then
    local empty_until = at + (1 - tokens) / rate
    limited = limited + (math.min(now, empty_until) - at)
  end
  tokens = math.min(burst, tokens + (now - at) * rate)
  return {tokens, now, limited}
end

-- flow.whole: how many tasks the bucket lets a claim hand out now.
local function bucket_whole(bucket)
  return math.max(math.floor(bucket[1] + BUCKET_EPSILON), 0)
end

-- flow.taken: the bucket after a claim handed out ``handed`` tasks.
local function bucket_taken(bucket, handed)
  if handed == 0 then return bucket end
  return {bucket[1] - handed, bucket[2], bucket[3]}
end

-- flow.next_token_at: when the bucket holds a whole token again.
local function bucket_next_token_at(rate, bucket)
  if bucket[1] >= 1 - BUCKET_EPSILON then return bucket[2] end
  return bucket[2] + (1 - bucket[1]) / rate
end

-- A ``buckets`` field and back: '%.17g' reads back as the very same double.
local function bucket_decode(field)
  if not field then return nil end
  local tokens, at, limited = string.match(field, '^(%S+) (%S+) (%S+)$')
  if not limited then return nil end  -- not ours: start afresh rather than fail every poll
  return {tonumber(tokens), tonumber(at), tonumber(limited)}
end

local function bucket_encode(bucket)
  return string.format('%.17g %.17g %.17g', bucket[1], bucket[2], bucket[3])
end
