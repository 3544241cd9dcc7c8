--[[
  requeue_dead: moves dead letters back to ready with their attempts and error reset, at most
  `limit` per call; in 'all' mode the caller repeats while `more` is 1.

  KEYS[1] <prefix>:{<queue>}:ready
  KEYS[2] <prefix>:{<queue>}:dead

  ARGV[1] item key prefix
  ARGV[2] notification channel
  ARGV[3] queue name
  ARGV[4] limit per call
  ARGV[5] mode: 'all' (the oldest dead letters) or 'ids' (the ids that follow)
  ARGV[6..] ids, in 'ids' mode

  Returns {requeued, more}.
]]

local k_ready, k_dead = KEYS[1], KEYS[2]
local item_prefix, channel, queue = ARGV[1], ARGV[2], ARGV[3]
local limit, mode = tonumber(ARGV[4]), ARGV[5]

local ids
if mode == 'all' then
  ids = redis.call('ZRANGE', k_dead, 0, limit - 1)
else
  ids = {}
  for i = 6, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end

local requeued = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', k_dead, id) == 1 then
    local item_key = item_prefix .. id
    if redis.call('EXISTS', item_key) == 1 then
      redis.call('HSET', item_key, 'a', 0)
      redis.call('HDEL', item_key, 'err', 'ct')
      make_ready(k_ready, item_key, id)
      requeued = requeued + 1
    end
  end
end
notify_ready(channel, queue, requeued)

local more = 0
if mode == 'all' and redis.call('ZCARD', k_dead) > 0 and #ids >= limit then
  more = 1
end
return {requeued, more}
