--[[
  Helpers shared by the wq queue scripts. This file is not a script of its own: the broker
  prepends it to every script of one queue (see server/src/store/scripts.rs), so each operation stays
  one atomic EVALSHA, and every such script gets the same keys and leading arguments:

  KEYS[1] <prefix>:{<queue>}:ready    sorted set of ready items (member format below)
  KEYS[2] <prefix>:{<queue>}:delayed  sorted set of delayed ids by due time (ms)
  KEYS[3] <prefix>:{<queue>}:leased   sorted set of leased ids by lease expiry (ms)
  KEYS[4] <prefix>:{<queue>}:dead     sorted set of dead ids by time of death (ms)
  KEYS[5] <prefix>:{<queue>}:meta     hash of counters and flags (fields below)
  KEYS[6] <prefix>:{<queue>}:done     sorted set of finished ids by finish time (ms): the ids
                                      still known for deduplication, and the index of retained
                                      completed items
  KEYS[7] <prefix>:{<queue>}:heads    sorted set of priority bands of the ready set, scored by
                                      the enqueue time (ms) of each band's first item
  KEYS[8] <prefix>:{<queue>}:trash    set of item generations still being deleted

  ARGV[1] item key base, <prefix>:{<queue>}:i
  ARGV[2] notification shard channel, <prefix>:{<queue>}:notify (SPUBLISH)
  ARGV[3] queue name
  ARGV[4] how long finished ids stay known (ms): the dedup window, or the completed-item
          retention if longer (0 = not at all)
  ARGV[5] most items one bulk step moves (--reap-batch)
  ARGV[6] dead-letter count bound (0 = none)
  ARGV[7] dead-letter age bound (ms, 0 = none)
  ARGV[8] idle queue expiry (ms, 0 = never)
  then each operation's own arguments, from ARGV[9].

  Item hash fields (KEY <item key base><generation>:<id>):
    p   payload              s   state: r ready, d delayed, l leased, c completed, x dead
    a   attempts ended       m   max attempts        pr  priority
    n   enqueue sequence     e   enqueue time (ms)   t   next attempt time (ms, delayed only)
    x   lease expiry (ms)    k   lease token         h   headers (opaque, optional)
    err last error           res result              ct  completion or death time (ms)

  Meta fields: seq (last enqueue sequence), enq, done, fail, recl, dropped (counters), paused,
  sealed (flags, '1'), la (last enqueue, completion, purge or flag change, ms), g (item
  generation, absent = 0), hv ('1' once the heads set is known to match the ready set; a queue
  written by a broker before heads existed gets it rebuilt by its next script).

  Ready sorted set member: 12 hex digits of the enqueue sequence followed by the id, scored by
  -priority, so ZPOPMIN yields the highest priority first and enqueue order within a priority.

  Generations: DeleteQueue moves the queue's sets aside and bumps `g` in one step, so items of
  the deleted queue (deleted in chunks afterwards) can never be mistaken for a new item with the
  same id. Item keys of generation 0 are <base>:<id>, of generation g > 0 <base><g>:<id>. Every
  item key is built here from the base passed in ARGV, which carries the queue's hash tag, so
  every key lies in the queue's Redis Cluster slot.
]]

local K = {
  ready = KEYS[1], delayed = KEYS[2], leased = KEYS[3], dead = KEYS[4], meta = KEYS[5],
  done = KEYS[6], heads = KEYS[7], trash = KEYS[8],
}
local item_base, channel, queue = ARGV[1], ARGV[2], ARGV[3]
local keep_ms, step_limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_dead, max_dead_age, idle_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local function items_of_generation(g)
  if g == nil or g == '0' or g == 0 then return item_base .. ':' end
  return item_base .. g .. ':'
end

local meta_head = redis.call('HMGET', K.meta, 'g', 'hv')
local generation = meta_head[1] or '0'
-- The prefix of the current generation's item keys.
local item_prefix = items_of_generation(generation)

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

-- Records that band `priority` holds an item enqueued at `enqueued`: a band's score is the
-- enqueue time of its oldest ready item, so the oldest ready item of the queue is one lookup
-- (QueueState) however many bands there are.
local function head_added(priority, enqueued)
  redis.call('ZADD', K.heads, 'LT', enqueued, priority)
end

-- Re-reads the first item of each band in `bands` (priority -> true) after items left the front
-- of the ready set.
local function heads_refresh(bands)
  for priority in pairs(bands) do
    local score = 0 - tonumber(priority)
    local first = redis.call('ZRANGE', K.ready, score, score, 'BYSCORE', 'LIMIT', 0, 1)
    local enqueued = first[1]
      and redis.call('HGET', item_prefix .. id_of_member(first[1]), 'e')
    if enqueued then
      redis.call('ZADD', K.heads, enqueued, priority)
    else
      redis.call('ZREM', K.heads, priority)
    end
  end
end

-- Rebuilds the heads set from the ready set, one lookup per priority band; runs once for a
-- queue whose ready set predates the heads set (meta field hv absent).
local function heads_rebuild()
  redis.call('DEL', K.heads)
  local head = redis.call('ZRANGE', K.ready, 0, 0, 'WITHSCORES')
  while head[1] do
    local enqueued = redis.call('HGET', item_prefix .. id_of_member(head[1]), 'e')
    if enqueued then
      redis.call('ZADD', K.heads, enqueued, 0 - tonumber(head[2]))
    end
    head = redis.call('ZRANGE', K.ready, '(' .. head[2], '+inf', 'BYSCORE', 'LIMIT', 0, 1,
      'WITHSCORES')
  end
end

if not meta_head[2] and redis.call('EXISTS', K.ready) == 1 then
  heads_rebuild()
  redis.call('HSET', K.meta, 'hv', '1')
end

-- Puts a stored item back into the ready set with its original sequence, so released and
-- retried items keep their place in line.
local function make_ready(item_key, id)
  local f = redis.call('HMGET', item_key, 'pr', 'n', 'e')
  redis.call('ZADD', K.ready, 0 - tonumber(f[1]), ready_member(tonumber(f[2]), id))
  head_added(f[1], tonumber(f[3]) or 0)
  redis.call('HSET', item_key, 's', 'r')
  redis.call('HDEL', item_key, 'x', 'k', 't')
end

-- Remembers finished ids (flat list of score, id) for deduplication, unless ids are not kept.
local function remember_finished(pairs_list)
  if keep_ms > 0 then
    call_in_chunks('ZADD', K.done, pairs_list)
  end
end

-- Drops the oldest dead letters beyond the count bound, at most one step's worth; the ids stay
-- known for the rest of their dedup window. Returns how many were dropped and whether more are
-- over the bound.
local function trim_dead_count(now)
  if max_dead <= 0 then return 0, false end
  local over = redis.call('ZCARD', K.dead) - max_dead
  if over <= 0 then return 0, false end
  local oldest = redis.call('ZPOPMIN', K.dead, math.min(over, step_limit))
  local gone, known = {}, {}
  for i = 1, #oldest, 2 do
    gone[#gone + 1] = item_prefix .. oldest[i]
    local died = tonumber(oldest[i + 1])
    if died + keep_ms > now then
      known[#known + 1] = died
      known[#known + 1] = oldest[i]
    end
  end
  call_in_chunks('DEL', nil, gone)
  remember_finished(known)
  local dropped = #oldest / 2
  redis.call('HINCRBY', K.meta, 'dropped', dropped)
  return dropped, over > dropped
end

local function make_dead(item_key, id, now, err)
  redis.call('HSET', item_key, 's', 'x', 'err', err, 'ct', now)
  redis.call('HDEL', item_key, 'x', 'k', 't')
  redis.call('ZADD', K.dead, now, id)
  trim_dead_count(now)
end

-- Reclaims up to one step of expired leases: each expiry counts as an attempt, so an item whose
-- worker dies every time ends in the dead letters. Returns how many became ready again and how
-- many were reclaimed.
local function reclaim_expired(now)
  local expired = redis.call('ZRANGEBYSCORE', K.leased, '-inf', now, 'LIMIT', 0, step_limit)
  local readied = 0
  for _, id in ipairs(expired) do
    redis.call('ZREM', K.leased, id)
    local item_key = item_prefix .. id
    if redis.call('EXISTS', item_key) == 1 then
      local attempts = redis.call('HINCRBY', item_key, 'a', 1)
      local max_attempts = tonumber(redis.call('HGET', item_key, 'm'))
      if attempts >= max_attempts then
        make_dead(item_key, id, now, 'lease expired')
      else
        redis.call('HSET', item_key, 'err', 'lease expired')
        make_ready(item_key, id)
        readied = readied + 1
      end
    end
  end
  if #expired > 0 then
    redis.call('HINCRBY', K.meta, 'recl', #expired)
  end
  return readied, #expired
end

-- Moves up to one step of delayed items whose time has come into the ready set.
local function promote_due(now)
  local due = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', now, 'LIMIT', 0, step_limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', K.delayed, id)
    local item_key = item_prefix .. id
    if redis.call('EXISTS', item_key) == 1 then
      make_ready(item_key, id)
    end
  end
  return #due
end

-- Wakes Lease calls waiting on this queue in every broker replica, unless the queue is paused:
-- its waiters could lease nothing (resuming wakes them).
local function notify_ready(count)
  if count > 0 and redis.call('HGET', K.meta, 'paused') ~= '1' then
    redis.call('SPUBLISH', channel, count .. ':' .. queue)
  end
end

local function is_drained()
  return redis.call('ZCARD', K.ready) + redis.call('ZCARD', K.leased)
    + redis.call('ZCARD', K.delayed) == 0
end

-- Announces that the queue is drained (message count 0), so waiting workers that exit on a
-- drained queue learn it at once instead of at the end of their wait.
local function notify_if_drained()
  if is_drained() then
    redis.call('SPUBLISH', channel, '0:' .. queue)
  end
end

-- The earliest delayed item's due time, or 0, so an idle waiter knows when to look again.
local function next_due()
  local first = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return 0
end

-- The first score of a sorted set, or nil.
local function first_score(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return nil
end
