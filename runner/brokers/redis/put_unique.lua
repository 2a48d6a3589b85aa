-- PUT of the tasks whose unique key is free, holding their keys, in one step (the broker's
-- ``put_unique``).
-- KEYS: the value key (``v:unique:<key>``) of each distinct unique key, then PUT's KEYS.
-- ARGV: the number of value keys, the number of tasks, then per task: its value key's index
-- among KEYS (0: no unique key) and its id; then PUT's ARGV with every task, in the same order.
-- Which tasks are fresh only this script knows (the keys may change between calls), so every
-- task's PUT fields come along and the fresh ones are picked out: PUT reads its task count off
-- its ARGV's length, so the head and the picked fields make a valid PUT call as they are.
-- A task is answered by the id its key holds, or by the id an earlier task of this call took
-- the key with; the others are fresh, and answered by their own id.
-- Returns the answers, one id per task, when the fresh tasks were stored as PUT stores them
-- and each fresh task's key was SET to its id (no ttl); the number of fresh tasks (an integer,
-- never 0) when they would exceed capacity: then nothing changed. A type all of whose tasks
-- were answered is still added to ``types`` (as the head names it; harmless, as ``types``
-- lists every type ever put).
local nvalues, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local head = 3 + 2 * n -- PUT's ARGV starts here
local first = head + 3 + tonumber(ARGV[head + 2]) -- PUT's first task field
local holders = {}
for i = 1, nvalues do holders[i] = redis.call('GET', KEYS[i]) end -- false when absent

local answers, taken, put_args, fresh = {}, {}, {}, 0
for i = head, first - 1 do put_args[#put_args + 1] = ARGV[i] end
for j = 1, n do
  local index, id = tonumber(ARGV[1 + 2 * j]), ARGV[2 + 2 * j]
  local holder = index > 0 and holders[index]
  if holder then
    answers[j] = holder
  else
    answers[j] = id
    if index > 0 then
      holders[index] = id
      taken[#taken + 1] = index
    end
    local base = first + 5 * (j - 1)
    for k = base, base + 4 do put_args[#put_args + 1] = ARGV[k] end
    fresh = fresh + 1
  end
end

if fresh > 0 then
  local put_keys = {}
  for i = nvalues + 1, #KEYS do put_keys[#put_keys + 1] = KEYS[i] end
  if put(put_keys, put_args) == 0 then return fresh end
end
for _, index in ipairs(taken) do redis.call('SET', KEYS[index], holders[index]) end
return answers
