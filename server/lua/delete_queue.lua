--[[
  delete_queue: deletes a queue in one atomic step. Its sets (ready, delayed, leased, dead,
  done) are renamed aside under the current item generation, the generation is recorded in the
  trash set, and the meta hash is replaced by one holding only the next generation. From this
  instant the queue is fresh: an enqueue that follows starts a new queue whose item keys cannot
  collide with the old ones, which delete_trash.lua then deletes in bounded steps. Waiting
  Leases that return on a drained queue are woken.

  KEYS and ARGV[1..8]: see lib.lua. No arguments of its own.

  Returns {items, generation}: how many items (ready, delayed, leased, dead) were deleted, and
  the generation now in the trash.
]]

local items = 0
local sets = {ready = K.ready, delayed = K.delayed, leased = K.leased, dead = K.dead,
  done = K.done}
for name, key in pairs(sets) do
  local count = redis.call('ZCARD', key)
  if count > 0 then
    if name ~= 'done' then items = items + count end
    redis.call('RENAME', key, key .. ':trash:' .. generation)
  end
end
redis.call('SADD', K.trash, generation)
redis.call('DEL', K.heads, K.meta)
redis.call('HSET', K.meta, 'g', tonumber(generation) + 1)
redis.call('SPUBLISH', channel, '0:' .. queue)
return {items, tonumber(generation)}
