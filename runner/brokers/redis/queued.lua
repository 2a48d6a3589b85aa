-- KEYS: stream, delayed (of one type). ARGV: group.
-- Returns {entries, pending, members}, read at one instant (the operator's ``tasks_of`` and
-- ``cancel``): the stream's entries (XRANGE), its pending entries (XPENDING's extended form:
-- id, consumer, idle ms, delivery count) and the delayed set's members.
local stream, delayed = KEYS[1], KEYS[2]
local entries, pending = {}, {}
if redis.call('EXISTS', stream) == 1 then
  entries = redis.call('XRANGE', stream, '-', '+')
  if #entries > 0 then
    local ok, found = pcall(redis.call, 'XPENDING', stream, ARGV[1], '-', '+', #entries)
    if ok then pending = found end
  end
end
return {entries, pending, redis.call('ZRANGE', delayed, 0, -1)}
