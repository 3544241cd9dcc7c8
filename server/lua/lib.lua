--[[
  Helpers shared by the wq scripts. This file is not a script of its own: the broker prepends it
  to every script that moves items between states (see server/src/scripts.rs), so each operation
  stays one atomic EVALSHA.

  Item hash fields (KEY <prefix>:{<queue>}:i:<id>):
    p   payload              s   state: r ready, d delayed, l leased, c completed, x dead
    a   attempts ended       m   max attempts        pr  priority
    n   enqueue sequence     e   enqueue time (ms)   t   next attempt time (ms, delayed only)
    x   lease expiry (ms)    k   lease token         h   headers (opaque, optional)
    err last error           res result              ct  completion or death time (ms)

  Ready sorted set member: 12 hex digits of the enqueue sequence followed by the id, scored by
  -priority, so ZPOPMIN yields the highest priority first and enqueue order within a priority.

  Item keys are built here from the item prefix passed in ARGV. That prefix carries the queue's
  hash tag, so every key lies in the queue's Redis Cluster slot.
]]

-- Time comes from Redis, so broker replicas with skewed clocks agree.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ready_member(seq, id)
  return string.format('%012x', seq) .. id
end

local function id_of_member(member)
  return string.sub(member, 13)
end

-- Runs `command` once per chunk of `args` instead of once per item: each redis.call costs a few
-- microseconds of its own. `key` (or nil) comes first in every chunk; the chunk size is even, so
-- score-member pairs stay together, and well within what Lua's unpack can pass.
local function call_in_chunks(command, key, args)
  local chunk = 2000
  for i = 1, #args, chunk do
    local last = math.min(i + chunk - 1, #args)
    if key then
      redis.call(command, key, unpack(args, i, last))
    else
      redis.call(command, unpack(args, i, last))
    end
  end
end

-- Puts a stored item back into the ready set with its original sequence, so released and
-- retried items keep their place in line.
local function make_ready(ready_key, item_key, id)
  local f = redis.call('HMGET', item_key, 'pr', 'n')
  redis.call('ZADD', ready_key, -tonumber(f[1]), ready_member(tonumber(f[2]), id))
  redis.call('HSET', item_key, 's', 'r')
  redis.call('HDEL', item_key, 'x', 'k', 't')
end

-- Drops the oldest dead letters beyond max_dead (0 = no count bound); returns how many.
local function trim_dead_count(dead_key, meta_key, item_prefix, max_dead)
  if max_dead <= 0 then return 0 end
  local over = redis.call('ZCARD', dead_key) - max_dead
  if over <= 0 then return 0 end
  local oldest = redis.call('ZPOPMIN', dead_key, over)
  for i = 1, #oldest, 2 do
    redis.call('DEL', item_prefix .. oldest[i])
  end
  redis.call('HINCRBY', meta_key, 'dropped', over)
  return over
end

local function make_dead(dead_key, meta_key, item_prefix, item_key, id, now, err, max_dead)
  redis.call('HSET', item_key, 's', 'x', 'err', err, 'ct', now)
  redis.call('HDEL', item_key, 'x', 'k', 't')
  redis.call('ZADD', dead_key, now, id)
  trim_dead_count(dead_key, meta_key, item_prefix, max_dead)
end

-- Reclaims up to `limit` expired leases: each expiry counts as an attempt, so an item whose
-- worker dies every time ends in the dead letters. Returns how many became ready again.
local function reclaim_expired(k_ready, k_leased, k_dead, k_meta, item_prefix, now, limit, max_dead)
  local expired = redis.call('ZRANGEBYSCORE', k_leased, '-inf', now, 'LIMIT', 0, limit)
  local readied = 0
  for _, id in ipairs(expired) do
    redis.call('ZREM', k_leased, id)
    local item_key = item_prefix .. id
    if redis.call('EXISTS', item_key) == 1 then
      local attempts = redis.call('HINCRBY', item_key, 'a', 1)
      local max_attempts = tonumber(redis.call('HGET', item_key, 'm'))
      if attempts >= max_attempts then
        make_dead(k_dead, k_meta, item_prefix, item_key, id, now, 'lease expired', max_dead)
      else
        redis.call('HSET', item_key, 'err', 'lease expired')
        make_ready(k_ready, item_key, id)
        readied = readied + 1
      end
    end
  end
  if #expired > 0 then
    redis.call('HINCRBY', k_meta, 'recl', #expired)
  end
  return readied, #expired
end

-- Moves up to `limit` delayed items whose time has come into the ready set.
local function promote_due(k_ready, k_delayed, item_prefix, now, limit)
  local due = redis.call('ZRANGEBYSCORE', k_delayed, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', k_delayed, id)
    local item_key = item_prefix .. id
    if redis.call('EXISTS', item_key) == 1 then
      make_ready(k_ready, item_key, id)
    end
  end
  return #due
end

-- Wakes Lease calls waiting on this queue in every broker replica.
local function notify_ready(channel, queue, count)
  if count > 0 then
    redis.call('PUBLISH', channel, count .. ':' .. queue)
  end
end

local function is_drained(k_ready, k_leased, k_delayed)
  return redis.call('ZCARD', k_ready) + redis.call('ZCARD', k_leased)
    + redis.call('ZCARD', k_delayed) == 0
end

-- Announces that the queue just became drained (message count 0), so waiting workers that exit
-- on a drained queue learn it at once instead of at the end of their wait.
local function notify_if_drained(k_ready, k_leased, k_delayed, channel, queue)
  if is_drained(k_ready, k_leased, k_delayed) then
    redis.call('PUBLISH', channel, '0:' .. queue)
  end
end

-- The earliest delayed item's due time, or 0, so an idle waiter knows when to look again.
local function next_due(k_delayed)
  local first = redis.call('ZRANGE', k_delayed, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return 0
end
