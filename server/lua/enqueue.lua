--[[
  enqueue: adds a batch of items to one queue, all or nothing.

  An id the queue still stores (in any state) is not added again and is flagged as a duplicate,
  also when it repeats within the batch. Items with a due time in the future go to the delayed
  set, the others to the ready set; waiters are notified once per call.

  KEYS[1] <prefix>:{<queue>}:ready    sorted set, see lib.lua
  KEYS[2] <prefix>:{<queue>}:delayed  sorted set of ids by due time (ms)
  KEYS[3] <prefix>:{<queue>}:meta     hash of counters and flags
  KEYS[4] <prefix>:{<queue>}:leased   sorted set of leased ids (counted for the length limit)

  ARGV[1] item key prefix, <prefix>:{<queue>}:i:
  ARGV[2] notification channel
  ARGV[3] queue name (notification message)
  ARGV[4] number of items N
  ARGV[5] most items the queue may hold in ready + delayed + leased (0 = no limit)
  then 7 values per item:
    id, payload, priority, delay (ms, -1 = none), not_before (unix ms, -1 = none),
    max_attempts (resolved, >= 1), headers (opaque bytes, '' = none)

  Returns {status, now_ms, dup_1, ..., dup_N}:
    status 0 = ok, 1 = the queue is sealed (nothing written)
    dup_i  1 when item i was a duplicate, else 0
  or {2, held, new}: the batch's `new` items would take the queue past ARGV[5] while it holds
    `held` (nothing written)
]]

local k_ready, k_delayed, k_meta, k_leased = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local item_prefix, channel, queue = ARGV[1], ARGV[2], ARGV[3]
local n, max_length = tonumber(ARGV[4]), tonumber(ARGV[5])
local first = 6

if redis.call('HGET', k_meta, 'sealed') == '1' then
  return {1, 0}
end

if max_length > 0 then
  -- Count what the batch would add before writing anything, so a full queue refuses the
  -- whole batch rather than half of it.
  local held = redis.call('ZCARD', k_ready) + redis.call('ZCARD', k_delayed)
    + redis.call('ZCARD', k_leased)
  local fresh, seen = 0, {}
  for i = 0, n - 1 do
    local id = ARGV[first + i * 7]
    if not seen[id] and redis.call('EXISTS', item_prefix .. id) == 0 then
      fresh = fresh + 1
    end
    seen[id] = true
  end
  if held + fresh > max_length then
    return {2, held, fresh}
  end
end

local now = now_ms()
local seq = tonumber(redis.call('HGET', k_meta, 'seq') or 0)
local result = {0, now}
local added, readied = 0, 0
-- Score-member pairs, added with one ZADD per set at the end.
local to_ready, to_delay = {}, {}

for i = 0, n - 1 do
  local base = first + i * 7
  local id = ARGV[base]
  local item_key = item_prefix .. id
  if redis.call('EXISTS', item_key) == 1 then
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
    local fields = {'p', ARGV[base + 1], 'a', 0, 'm', ARGV[base + 5], 'pr', priority,
      'n', seq, 'e', now}
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
      to_ready[#to_ready + 1] = -priority
      to_ready[#to_ready + 1] = ready_member(seq, id)
      readied = readied + 1
    end
    redis.call('HSET', item_key, unpack(fields))
  end
end

call_in_chunks('ZADD', k_ready, to_ready)
call_in_chunks('ZADD', k_delayed, to_delay)
if added > 0 then
  redis.call('HSET', k_meta, 'seq', seq)
  redis.call('HINCRBY', k_meta, 'enq', added)
end
notify_ready(channel, queue, readied)
return result
