--[[
  reap: the background pass over one queue. Reclaims expired leases, promotes due delayed items
  and drops dead letters older than the age bound, each bounded by a limit so Redis is never
  blocked for long; the caller repeats while `more` is 1.

  KEYS[1] <prefix>:{<queue>}:ready    KEYS[2] <prefix>:{<queue>}:delayed
  KEYS[3] <prefix>:{<queue>}:leased   KEYS[4] <prefix>:{<queue>}:dead
  KEYS[5] <prefix>:{<queue>}:meta

  ARGV[1] item key prefix             ARGV[2] limit per step
  ARGV[3] dead-letter count bound (0 = none)
  ARGV[4] dead-letter age bound (ms, 0 = none)
  ARGV[5] notification channel        ARGV[6] queue name

  Returns {reclaimed, promoted, dropped, ready, more, drained, paused}: ready is the ready count
  afterwards; more is 1 when a limit was reached and another pass has work to do; drained is 1
  when no item is ready, leased or delayed; paused is 1 when the queue grants nothing. The
  reaper uses the last three to wake waiting Lease calls whose notification was lost.
]]

local k_ready, k_delayed, k_leased, k_dead, k_meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local item_prefix, limit = ARGV[1], tonumber(ARGV[2])
local max_dead, max_dead_age = tonumber(ARGV[3]), tonumber(ARGV[4])
local channel, queue = ARGV[5], ARGV[6]

local now = now_ms()
local readied, reclaimed = reclaim_expired(k_ready, k_leased, k_dead, k_meta, item_prefix, now,
  limit, max_dead)
local promoted = promote_due(k_ready, k_delayed, item_prefix, now, limit)

local dropped = 0
if max_dead_age > 0 then
  local old = redis.call('ZRANGEBYSCORE', k_dead, '-inf', now - max_dead_age, 'LIMIT', 0, limit)
  for _, id in ipairs(old) do
    redis.call('ZREM', k_dead, id)
    redis.call('DEL', item_prefix .. id)
  end
  dropped = #old
  if dropped > 0 then
    redis.call('HINCRBY', k_meta, 'dropped', dropped)
  end
end
dropped = dropped + trim_dead_count(k_dead, k_meta, item_prefix, max_dead)

notify_ready(channel, queue, readied + promoted)
if reclaimed > readied then
  -- Some reclaimed leases went to the dead letters: that may have drained the queue.
  notify_if_drained(k_ready, k_leased, k_delayed, channel, queue)
end
local more = 0
if reclaimed >= limit or promoted >= limit or dropped >= limit then
  more = 1
end
local drained = 0
if is_drained(k_ready, k_leased, k_delayed) then
  drained = 1
end
local paused = 0
if redis.call('HGET', k_meta, 'paused') == '1' then
  paused = 1
end
return {reclaimed, promoted, dropped, redis.call('ZCARD', k_ready), more, drained, paused}
