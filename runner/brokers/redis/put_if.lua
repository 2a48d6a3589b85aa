-- A compare-and-set of a value key, then PUT, in one step (the broker's ``put_if``).
-- KEYS: the value key (``v:<key>``), then PUT's KEYS (none for a bare compare-and-set).
-- ARGV: '1' when a value is expected ('0': the key must be absent), the expected value ('' when
-- absent), the new value, then PUT's ARGV (none for a bare compare-and-set).
-- Returns 1 when the key held what was expected: the key is SET to the new value (no ttl) and
-- the tasks are stored as PUT stores them; 0 when it held something else, -1 when the tasks
-- would exceed capacity. Either way, 0 or -1, nothing changed. An expired key is absent here,
-- as Redis never returns one.
local held = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if held ~= ARGV[2] then return 0 end
elseif held then
  return 0
end
if #ARGV > 3 then
  local put_keys, put_args = {}, {}
  for i = 2, #KEYS do put_keys[#put_keys + 1] = KEYS[i] end
  for i = 4, #ARGV do put_args[#put_args + 1] = ARGV[i] end
  if put(put_keys, put_args) == 0 then return -1 end
end
redis.call('SET', KEYS[1], ARGV[3])
return 1
