--[[
  lease: grants ready items to one or more callers (concurrent Lease calls combined into one
  script call), after reclaiming expired leases and promoting due delayed items (both bounded),
  so a queue with an idle reaper still makes progress.

  Items go to the callers in order, each up to its count and its reply budget: a caller's items
  stop before their estimated reply size would pass the budget, but every caller's first item
  is granted whatever its size, so any valid item can be leased. Items past the budget stay
  ready, untouched. A paused queue grants nothing. Each grant gets a token its item never had
  before (fencing; the call's random token, shared by the call's grants of different items): only
  the holder of the current token can extend, complete, fail or release the item.

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9]  lease duration (ms)        ARGV[10] token (random, unique per call; every grant of
                                      the call gets it)
  ARGV[11] reply budget per caller (bytes)
  ARGV[12] fixed reply bytes per item, besides its payload, headers and id
  ARGV[13] number of callers C, then C counts (>= 1 each)

  Returns {now_ms, expire_ms, drained, next_due_ms, ready_left, sealed, grants}, where drained
  is 1 when no item is ready, leased or delayed after the call, next_due_ms is the earliest
  delayed item's due time (0 = none), sealed is 1 when the queue accepts no more items, and
  grants holds one list per caller of
    {id, token, payload, attempts_ended, max_attempts, priority, enqueue_ms, headers|nil}
]]

local lease_ms, token = tonumber(ARGV[9]), ARGV[10]
local budget, per_item = tonumber(ARGV[11]), tonumber(ARGV[12])
local callers = tonumber(ARGV[13])

local now = now_ms()
local readied = reclaim_expired(now) + promote_due(now)

local flags = redis.call('HMGET', K.meta, 'paused', 'sealed')
local grants = {}
for c = 1, callers do grants[c] = {} end
local expire = now + lease_ms
-- Numbers passed to redis.call are formatted with %.17g each time; the expiry, written once per
-- item, is formatted once per call instead.
local expire_arg = tostring(expire)

if flags[1] ~= '1' then
  local total = 0
  for c = 1, callers do total = total + tonumber(ARGV[13 + c]) end
  local front = redis.call('ZRANGE', K.ready, 0, total - 1, 'WITHSCORES')
  local caller, count, bytes = 1, 0, 0
  local want = tonumber(ARGV[14])
  -- How many members from the front of the ready set this call consumes (granted or dropped).
  local consumed = 0
  local leased, bands, granted = {}, {}, {}
  for j = 1, #front, 2 do
    local id = id_of_member(front[j])
    local item_key = item_prefix .. id
    local f = redis.call('HMGET', item_key, 'p', 'a', 'm', 'pr', 'e', 'h')
    -- An id twice in the ready set (which no script writes) is granted once: its grants would
    -- share the call's token, and so one lease id.
    if f[3] and not granted[id] then
      granted[id] = true
      local size = #f[1] + 2 * #(f[6] or '') + 3 * #id + per_item
      if count >= want or (count > 0 and bytes + size > budget) then
        caller, count, bytes = caller + 1, 0, 0
        if caller > callers then break end
        want = tonumber(ARGV[13 + caller])
      end
      -- One token for the call's grants: each item is granted once per call, and every call
      -- has its own random token, so (item, token) still names one grant.
      redis.call('HSET', item_key, 's', 'l', 'x', expire_arg, 'k', token)
      leased[#leased + 1] = expire_arg
      leased[#leased + 1] = id
      local list = grants[caller]
      list[#list + 1] = {id, token, f[1], tonumber(f[2]), tonumber(f[3]), tonumber(f[4]),
        tonumber(f[5]), f[6]}
      count, bytes = count + 1, bytes + size
    end
    -- A ready member without its hash (every stored item has max attempts, m) cannot be
    -- served; it is consumed too, which keeps the set consistent.
    consumed = (j + 1) / 2
    -- 0 - score, not -score: a band of priority 0 must be named '0', never '-0'.
    bands[0 - tonumber(front[j + 1])] = true
  end
  if consumed > 0 then
    redis.call('ZREMRANGEBYRANK', K.ready, 0, consumed - 1)
    heads_refresh(bands)
  end
  call_in_chunks('ZADD', K.leased, leased)
end

local ready_left = redis.call('ZCARD', K.ready)
-- Items this call made ready but did not take are announced to the other waiters.
if readied > 0 and ready_left > 0 then
  notify_ready(math.min(readied, ready_left))
end
local drained = 0
if ready_left == 0 and is_drained() then
  drained = 1
end
local sealed = 0
if flags[2] == '1' then sealed = 1 end
return {now, expire, drained, next_due(), ready_left, sealed, grants}
