--[[
  queue_state: a consistent snapshot of one queue's counts and flags. Reads only.

  The oldest ready item is found per priority band (within a band the first member is the oldest),
  looking at no more than ARGV[2] bands, so the cost stays O(bands * log n), not O(n).

  KEYS[1] <prefix>:{<queue>}:ready    KEYS[2] <prefix>:{<queue>}:leased
  KEYS[3] <prefix>:{<queue>}:delayed  KEYS[4] <prefix>:{<queue>}:dead
  KEYS[5] <prefix>:{<queue>}:meta

  ARGV[1] item key prefix
  ARGV[2] most priority bands to inspect for the oldest ready item

  Returns {ready, leased, delayed, dead, oldest_ready_enqueue_ms (0 = none), meta} where meta is
  the meta hash as a flat field/value list (counters enq, done, fail, recl, dropped; flags
  paused, sealed).
]]

local k_ready, k_leased, k_delayed, k_dead, k_meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local item_prefix, max_bands = ARGV[1], tonumber(ARGV[2])

local oldest = 0
local head = redis.call('ZRANGE', k_ready, 0, 0, 'WITHSCORES')
local bands = 0
while head[1] and bands < max_bands do
  local enqueued = tonumber(redis.call('HGET', item_prefix .. id_of_member(head[1]), 'e'))
  if enqueued and (oldest == 0 or enqueued < oldest) then
    oldest = enqueued
  end
  bands = bands + 1
  head = redis.call('ZRANGE', k_ready, '(' .. head[2], '+inf', 'BYSCORE', 'LIMIT', 0, 1,
    'WITHSCORES')
end

return {
  redis.call('ZCARD', k_ready), redis.call('ZCARD', k_leased), redis.call('ZCARD', k_delayed),
  redis.call('ZCARD', k_dead), oldest, redis.call('HGETALL', k_meta),
}
