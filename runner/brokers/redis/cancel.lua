-- KEYS: count, dlq, dlq index, held, then per distinct type: stream, delayed.
-- ARGV: group, then per task: type index, entry id ('' when delayed), delayed-set member (''
-- when ready), task id, dead-letter record, dead_at.
-- Dead-letters each task that is still where it was read and not leased (a ready entry that
-- is not pending, or pending only for ``RELEASED``; a delayed member still in its set), as a
-- ``dead`` settle would: the entry dropped (or the member removed), its capacity slot freed,
-- its id no longer held, the record stored. Returns per task 1 (dead-lettered) or 0 (handed
-- out, settled or moved since it was read: left as it is).
local count, dlq, dlq_idx, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group = ARGV[1]
local result, freed = {}, 0
for base = 2, #ARGV, 6 do
  local idx, entry, member = tonumber(ARGV[base]), ARGV[base + 1], ARGV[base + 2]
  local stream, delayed = KEYS[3 + 2 * idx], KEYS[4 + 2 * idx]
  local waiting = false
  if entry ~= '' then
    if redis.call('XRANGE', stream, entry, entry)[1] then
      local p = redis.call('XPENDING', stream, group, entry, entry, 1)[1]
      waiting = not p or p[2] == '~released'
      if waiting then
        if p then redis.call('XACK', stream, group, entry) end
        redis.call('XDEL', stream, entry)
      end
    end
  else
    waiting = redis.call('ZREM', delayed, member) == 1
  end
  if waiting then
    local id = ARGV[base + 3]
    redis.call('HSET', dlq, id, ARGV[base + 4])
    redis.call('ZADD', dlq_idx, ARGV[base + 5], id)
    unhold(held, id)
    freed = freed + 1
  end
  result[#result + 1] = waiting and 1 or 0
end
if freed > 0 then redis.call('INCRBY', count, -freed) end
return result
