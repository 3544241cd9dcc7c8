--[[
  set_flag: sets or clears a queue flag (paused, sealed). Clearing `paused` wakes the queue's
  waiting Lease calls in every replica.

  KEYS[1] <prefix>:{<queue>}:meta
  KEYS[2] <prefix>:{<queue>}:ready

  ARGV[1] flag name: 'paused' or 'sealed'
  ARGV[2] '1' to set, '0' to clear
  ARGV[3] notification channel
  ARGV[4] queue name

  Returns the number of ready items.
]]

local k_meta, k_ready = KEYS[1], KEYS[2]
local flag, value, channel, queue = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if value == '1' then
  redis.call('HSET', k_meta, flag, '1')
else
  redis.call('HDEL', k_meta, flag)
end
local ready = redis.call('ZCARD', k_ready)
if flag == 'paused' and value == '0' then
  notify_ready(channel, queue, ready)
end
return ready
