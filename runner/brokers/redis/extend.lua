-- KEYS: leases, the two settled-token sets (parity 0, 1), then one stream per delivery.
-- ARGV: group, consumer, then per delivery: id, token.
-- Resets the idle time of each delivery still ours (XCLAIM JUSTID does not bump the delivery
-- count). Returns per delivery: 1 (renewed), 2 (already done: its token settled the entry,
-- e.g. a renewal racing the ack) or 0 (fenced).
local group, consumer = ARGV[1], ARGV[2]
local result = {}
for i = 4, #KEYS do
  local id, token = ARGV[2 * i - 5], ARGV[2 * i - 4]
  local ok = 0
  if redis.call('HGET', KEYS[1], id .. '@' .. KEYS[i]) == token then
    local claimed = redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'JUSTID')
    if #claimed > 0 then ok = 1 end
  elseif was_settled(KEYS[2], KEYS[3], token) then
    ok = 2
  end
  result[i - 3] = ok
end
return result
