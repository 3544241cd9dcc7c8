--[[
  reap: the background pass over one queue. Reclaims expired leases, promotes due delayed items,
  drops dead letters past their bounds and forgets finished ids past their dedup window, each
  bounded by one step (ARGV[5]) so Redis is never blocked for long; the caller repeats while
  `more` is 1. An empty queue that has been idle for ARGV[8] since its last enqueue, completion,
  purge or flag change (and holds no flags, dead letters or remembered ids) is forgotten: its
  meta is deleted and `expired` is 1.

  KEYS and ARGV[1..8]: see lib.lua. No arguments of its own.

  Returns {reclaimed, promoted, dropped, ready, more, drained, paused, next_ms, expired, trash}:
  ready is the ready count afterwards; more is 1 when a step limit was reached; drained is 1
  when no item is ready, leased or delayed; paused is 1 when the queue grants nothing; next_ms is
  when the queue next needs this pass (0 = never, unless something changes); trash is 1 when a
  deleted generation's items are still to be deleted (see delete_trash.lua). The reaper uses
  drained, paused and ready to wake waiting Lease calls whose notification was lost.
]]

local now = now_ms()
local readied, reclaimed = reclaim_expired(now)
local promoted = promote_due(now)

local aged = {}
if max_dead_age > 0 then
  aged = redis.call('ZRANGEBYSCORE', K.dead, '-inf', now - max_dead_age, 'WITHSCORES',
    'LIMIT', 0, step_limit)
  local ids, gone, known = {}, {}, {}
  for i = 1, #aged, 2 do
    ids[#ids + 1] = aged[i]
    gone[#gone + 1] = item_prefix .. aged[i]
    local died = tonumber(aged[i + 1])
    if died + keep_ms > now then
      known[#known + 1] = died
      known[#known + 1] = aged[i]
    end
  end
  call_in_chunks('ZREM', K.dead, ids)
  call_in_chunks('DEL', nil, gone)
  remember_finished(known)
  if #ids > 0 then
    redis.call('HINCRBY', K.meta, 'dropped', #ids)
  end
end
local trimmed, over = trim_dead_count(now)
local dropped = #aged / 2 + trimmed

-- Finished ids past their window are forgotten from the front of the done set (oldest first).
local stale = redis.call('ZCOUNT', K.done, '-inf', now - keep_ms)
local forgotten = math.min(stale, step_limit)
if forgotten > 0 then
  redis.call('ZREMRANGEBYRANK', K.done, 0, forgotten - 1)
end

notify_ready(readied + promoted)
if reclaimed > readied then
  -- Some reclaimed leases went to the dead letters: that may have drained the queue.
  notify_if_drained()
end

local more = 0
if reclaimed >= step_limit or promoted >= step_limit or #aged / 2 >= step_limit or over
  or stale > forgotten then
  more = 1
end
local drained = 0
if is_drained() then
  drained = 1
end
local flags = redis.call('HMGET', K.meta, 'paused', 'sealed', 'la')
local paused = 0
if flags[1] == '1' then
  paused = 1
end
local trash = 0
if redis.call('SCARD', K.trash) > 0 then
  trash = 1
end

local next_ms = 0
local function sooner(t)
  if t and (next_ms == 0 or t < next_ms) then next_ms = t end
end
local expired = 0
if more == 1 or trash == 1 then
  sooner(now)
else
  sooner(first_score(K.leased))
  sooner(first_score(K.delayed))
  local oldest_dead = first_score(K.dead)
  if oldest_dead and max_dead_age > 0 then sooner(oldest_dead + max_dead_age) end
  local oldest_done = first_score(K.done)
  if oldest_done then sooner(oldest_done + keep_ms) end
  local empty = oldest_dead == nil and oldest_done == nil and next_ms == 0
    and redis.call('ZCARD', K.ready) == 0
  if empty and flags[1] ~= '1' and flags[2] ~= '1' then
    local last = tonumber(flags[3])
    if redis.call('EXISTS', K.meta) == 0 then
      -- Nothing at all (a queue only leased from): nothing to keep, nothing to delete.
      expired = 1
    elseif last == nil then
      -- Counters written before the last-activity field existed: idle from now on.
      redis.call('HSET', K.meta, 'la', now)
      if idle_ttl > 0 then sooner(now + idle_ttl) end
    elseif idle_ttl > 0 and last + idle_ttl <= now then
      redis.call('DEL', K.meta, K.heads)
      expired = 1
    elseif idle_ttl > 0 then
      sooner(last + idle_ttl)
    end
  end
end
return {reclaimed, promoted, dropped, redis.call('ZCARD', K.ready), more, drained, paused,
  next_ms, expired, trash}
