--[[
  enqueue: adds a batch of items to one queue, all or nothing.

  An id the queue still knows is not added again and is flagged as a duplicate: an id stored in
  any state, an id finished (completed or dead) within the dedup window, and an id repeated
  within the batch. Items with a due time in the future go to the delayed set, the others to the
  ready set; waiters are notified once per call (not while the queue is paused).

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9]  number of items N
  ARGV[10] most items the queue may hold in ready + delayed + leased (0 = no limit)
  then 7 values per item:
    id, payload, priority, delay (ms, -1 = none), not_before (unix ms, -1 = none),
    max_attempts (resolved, >= 1), headers (opaque bytes, '' = none)

  Every id is looked up, those the broker made up too: a script call whose reply was lost may be
  run again by a Redis client that retries it, and must then add nothing twice.

  Returns {status, now_ms, dup_1, ..., dup_N}:
    status 0 = ok, 1 = the queue is sealed (nothing written)
    dup_i  1 when item i was a duplicate, else 0
  or {2, held, new}: the batch's `new` items would take the queue past ARGV[10] while it holds
    `held` (nothing written)
]]

local n, max_length = tonumber(ARGV[9]), tonumber(ARGV[10])
local first = 11

if redis.call('HGET', K.meta, 'sealed') == '1' then
  return {1, 0}
end

local now = now_ms()
-- Numbers passed to redis.call are formatted with %.17g each time: values written for every item
-- are formatted once per call (or per priority band) instead.
local now_arg = tostring(now)
local band_score = {}
-- Finished ids are looked up only when the queue remembers any; an id is known for exactly its
-- window, however late the reaper forgets it.
local remembers = keep_ms > 0 and redis.call('ZCARD', K.done) > 0
local function known(id)
  if redis.call('EXISTS', item_prefix .. id) == 1 then return true end
  if not remembers then return false end
  local finished = redis.call('ZSCORE', K.done, id)
  return finished ~= false and tonumber(finished) + keep_ms > now
end

if max_length > 0 then
  -- Count what the batch would add before writing anything, so a full queue refuses the
  -- whole batch rather than half of it.
  local held = redis.call('ZCARD', K.ready) + redis.call('ZCARD', K.delayed)
    + redis.call('ZCARD', K.leased)
  local fresh, seen = 0, {}
  for i = 0, n - 1 do
    local id = ARGV[first + i * 7]
    if not seen[id] and not known(id) then
      fresh = fresh + 1
    end
    seen[id] = true
  end
  if held + fresh > max_length then
    return {2, held, fresh}
  end
end

local seq = tonumber(redis.call('HGET', K.meta, 'seq') or 0)
local result = {0, now}
local added, readied = 0, 0
-- Score-member pairs, added with one ZADD per set at the end.
local to_ready, to_delay = {}, {}
local bands = {}

for i = 0, n - 1 do
  local base = first + i * 7
  local id = ARGV[base]
  local item_key = item_prefix .. id
  if known(id) then
    result[#result + 1] = 1
  else
    result[#result + 1] = 0
    seq = seq + 1
    added = added + 1
    local priority = tonumber(ARGV[base + 2])
    local delay, not_before = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    local due = now
    if delay >= 0 then
      due = now + delay
    elseif not_before >= 0 then
      due = not_before
    end
    local fields = {'p', ARGV[base + 1], 'a', '0', 'm', ARGV[base + 5], 'pr', ARGV[base + 2],
      'n', seq, 'e', now_arg}
    if ARGV[base + 6] ~= '' then
      fields[#fields + 1] = 'h'
      fields[#fields + 1] = ARGV[base + 6]
    end
    if due > now then
      fields[#fields + 1] = 's'
      fields[#fields + 1] = 'd'
      fields[#fields + 1] = 't'
      fields[#fields + 1] = due
      to_delay[#to_delay + 1] = due
      to_delay[#to_delay + 1] = id
    else
      fields[#fields + 1] = 's'
      fields[#fields + 1] = 'r'
      local score = band_score[priority]
      if not score then
        -- 0 - priority, not -priority: a band of priority 0 must be named '0', never '-0'.
        score = tostring(0 - priority)
        band_score[priority] = score
      end
      to_ready[#to_ready + 1] = score
      to_ready[#to_ready + 1] = ready_member(seq, id)
      bands[priority] = true
      readied = readied + 1
    end
    redis.call('HSET', item_key, unpack(fields))
  end
end

call_in_chunks('ZADD', K.ready, to_ready)
call_in_chunks('ZADD', K.delayed, to_delay)
for priority in pairs(bands) do
  head_added(priority, now)
end
-- The last activity is kept even for a batch of duplicates: it is what an idle queue's expiry
-- counts from.
redis.call('HSET', K.meta, 'la', now)
if added > 0 then
  -- The heads set is kept from the queue's first items on (see lib.lua).
  if not meta_head[2] then
    redis.call('HSET', K.meta, 'hv', '1')
  end
  redis.call('HSET', K.meta, 'seq', seq)
  redis.call('HINCRBY', K.meta, 'enq', added)
end
notify_ready(readied)
return result
