--[[
  requeue_dead: moves dead letters back to ready with their attempts and error reset, at most
  one step (ARGV[5]) per call; in 'all' mode the caller repeats while `more` is 1.

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9]   mode: 'all' (the oldest dead letters) or 'ids' (the ids that follow)
  ARGV[10..] ids, in 'ids' mode

  Returns {requeued, more}.
]]

local mode = ARGV[9]

local ids
if mode == 'all' then
  ids = redis.call('ZRANGE', K.dead, 0, step_limit - 1)
else
  ids = {}
  for i = 10, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end

local requeued = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', K.dead, id) == 1 then
    local item_key = item_prefix .. id
    if redis.call('EXISTS', item_key) == 1 then
      redis.call('HSET', item_key, 'a', 0)
      redis.call('HDEL', item_key, 'err', 'ct')
      make_ready(item_key, id)
      requeued = requeued + 1
    end
  end
end
notify_ready(requeued)

local more = 0
if mode == 'all' and redis.call('ZCARD', K.dead) > 0 and #ids >= step_limit then
  more = 1
end
return {requeued, more}
