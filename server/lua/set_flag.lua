--[[
  set_flag: sets or clears a queue flag (paused, sealed). Clearing `paused` wakes the queue's
  waiting Lease calls in every replica; setting `sealed` on a drained queue wakes those that
  return once it is sealed and drained. Clearing a flag of a queue that holds nothing creates
  nothing.

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9]  flag name: 'paused' or 'sealed'
  ARGV[10] '1' to set, '0' to clear

  Returns {ready, exists}: the number of ready items, and 1 when the queue's meta exists
  afterwards (the caller then keeps it in the queue index).
]]

local flag, value = ARGV[9], ARGV[10]
if value == '1' then
  redis.call('HSET', K.meta, flag, '1', 'la', now_ms())
elseif redis.call('HDEL', K.meta, flag) == 1 then
  redis.call('HSET', K.meta, 'la', now_ms())
end
local ready = redis.call('ZCARD', K.ready)
if flag == 'paused' and value == '0' then
  notify_ready(ready)
elseif flag == 'sealed' and value == '1' then
  notify_if_drained()
end
return {ready, redis.call('EXISTS', K.meta)}
