--[[
  delete_trash: deletes one step (ARGV[5]) of the items of deleted generations (see
  delete_queue.lua); the caller repeats while `more` is 1.

  KEYS and ARGV[1..8]: see lib.lua. No arguments of its own.

  Once no trash is left, a queue that holds nothing but its generation number (nothing was
  enqueued since the delete) loses its meta too, so a deleted queue leaves no key behind.

  Returns {deleted, more}: how many item keys were deleted, and 1 while trash is left.
]]

local budget = step_limit
local deleted = 0
for _, g in ipairs(redis.call('SMEMBERS', K.trash)) do
  local prefix = items_of_generation(g)
  local left = 0
  for name, key in pairs({ready = K.ready, delayed = K.delayed, leased = K.leased,
    dead = K.dead, done = K.done}) do
    local trashed = key .. ':trash:' .. g
    if budget > 0 then
      local popped = redis.call('ZPOPMIN', trashed, budget)
      local gone = {}
      for j = 1, #popped, 2 do
        local id = popped[j]
        if name == 'ready' then id = id_of_member(id) end
        gone[#gone + 1] = prefix .. id
      end
      call_in_chunks('DEL', nil, gone)
      budget = budget - #popped / 2
      deleted = deleted + #popped / 2
    end
    left = left + redis.call('ZCARD', trashed)
  end
  if left == 0 then
    redis.call('SREM', K.trash, g)
  end
end
local more = 0
if redis.call('SCARD', K.trash) > 0 then
  more = 1
elseif redis.call('HLEN', K.meta) == 1 and redis.call('HEXISTS', K.meta, 'g') == 1
  and redis.call('ZCARD', K.done) == 0 and is_drained() and redis.call('ZCARD', K.dead) == 0 then
  -- Nothing of any generation is left and nothing new arrived: the queue leaves no key behind,
  -- and its generations start again at 0.
  redis.call('DEL', K.meta)
end
return {deleted, more}
