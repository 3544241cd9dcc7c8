--[[
  lease: grants up to N ready items to one caller, after reclaiming expired leases and promoting
  due delayed items (both bounded), so a queue with an idle reaper still makes progress.

  A paused queue grants nothing. Each grant gets a fresh token (fencing): only the holder of the
  current token can extend, complete, fail or release the item.

  KEYS[1] <prefix>:{<queue>}:ready    KEYS[2] <prefix>:{<queue>}:delayed
  KEYS[3] <prefix>:{<queue>}:leased   (sorted set of ids by lease expiry, ms)
  KEYS[4] <prefix>:{<queue>}:dead     (sorted set of ids by time of death, ms)
  KEYS[5] <prefix>:{<queue>}:meta

  ARGV[1] item key prefix             ARGV[2] max items N (>= 1)
  ARGV[3] lease duration (ms)         ARGV[4] token base (random, unique per call)
  ARGV[5] reclaim/promote limit       ARGV[6] dead-letter count bound (0 = none)
  ARGV[7] notification channel        ARGV[8] queue name

  Returns {now_ms, expire_ms, drained, next_due_ms, ready_left, items}, where drained is 1 when
  no item is ready, leased or delayed after the call, next_due_ms is the earliest delayed item's
  due time (0 = none), and items is a list of
    {id, token, payload, attempts_ended, max_attempts, priority, enqueue_ms, headers|nil}
]]

local k_ready, k_delayed, k_leased, k_dead, k_meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local item_prefix = ARGV[1]
local max_items, lease_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local token_base, limit, max_dead = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local channel, queue = ARGV[7], ARGV[8]

local now = now_ms()
local readied = reclaim_expired(k_ready, k_leased, k_dead, k_meta, item_prefix, now, limit, max_dead)
  + promote_due(k_ready, k_delayed, item_prefix, now, limit)

local items = {}
local expire = now + lease_ms
if redis.call('HGET', k_meta, 'paused') ~= '1' then
  local popped = redis.call('ZPOPMIN', k_ready, max_items)
  local leased = {}
  for i = 1, #popped, 2 do
    local id = id_of_member(popped[i])
    local item_key = item_prefix .. id
    local f = redis.call('HMGET', item_key, 'p', 'a', 'm', 'pr', 'e', 'h')
    -- Every stored item has max attempts (m); a ready member without its hash cannot be
    -- served, and dropping it keeps the set consistent.
    if f[3] then
      local token = token_base .. i
      redis.call('HSET', item_key, 's', 'l', 'x', expire, 'k', token)
      leased[#leased + 1] = expire
      leased[#leased + 1] = id
      items[#items + 1] = {id, token, f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]),
        tonumber(f[5]), f[6]}
    end
  end
  call_in_chunks('ZADD', k_leased, leased)
end

local ready_left = redis.call('ZCARD', k_ready)
-- Items this call made ready but did not take are announced to the other waiters.
if readied > 0 and ready_left > 0 then
  notify_ready(channel, queue, math.min(readied, ready_left))
end
local drained = 0
if ready_left == 0 and is_drained(k_ready, k_leased, k_delayed) then
  drained = 1
end
return {now, expire, drained, next_due(k_delayed), ready_left, items}
