-- Shared helpers, prepended to the scripts that need them.
local function ensure_group(stream, group)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  end
end

-- ensure_group, once per ``key`` of ``seen`` (a table one script call keeps): the check is a
-- call into Redis, and one script call may put many tasks of a type.
local function ensure_group_once(seen, key, stream, group)
  if not seen[key] then
    ensure_group(stream, group)
    seen[key] = true
  end
end
