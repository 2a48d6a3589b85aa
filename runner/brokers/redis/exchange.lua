-- SETTLE then POLL in one script call (the dispatcher's ``exchange``).
-- KEYS: SETTLE's keys, then POLL's. ARGV: how many of KEYS are SETTLE's, how many of the
-- following ARGV are SETTLE's, SETTLE's ARGV, then POLL's. Returns {SETTLE's reply, POLL's}.
local nkeys, nargs = tonumber(ARGV[1]), tonumber(ARGV[2])
local settle_keys, settle_args, poll_keys, poll_args = {}, {}, {}, {}
for i = 1, #KEYS do
  if i <= nkeys then settle_keys[#settle_keys + 1] = KEYS[i]
  else poll_keys[#poll_keys + 1] = KEYS[i] end
end
for i = 3, #ARGV do
  if i < 3 + nargs then settle_args[#settle_args + 1] = ARGV[i]
  else poll_args[#poll_args + 1] = ARGV[i] end
end
return {settle(settle_keys, settle_args), poll(poll_keys, poll_args)}
