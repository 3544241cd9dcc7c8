--[[
  purge: deletes items of the given states, at most `limit` per call; the caller repeats while
  `more` is 1. Leases of purged items are lost (their item is gone).

  KEYS[1] <prefix>:{<queue>}:ready    KEYS[2] <prefix>:{<queue>}:delayed
  KEYS[3] <prefix>:{<queue>}:leased   KEYS[4] <prefix>:{<queue>}:dead

  ARGV[1] item key prefix
  ARGV[2] limit per call
  ARGV[3..] states to purge: any of 'r', 'd', 'l', 'x'

  Returns {purged, more}.
]]

local item_prefix, limit = ARGV[1], tonumber(ARGV[2])
local sets = {r = KEYS[1], d = KEYS[2], l = KEYS[3], x = KEYS[4]}

local purged = 0
local more = 0
for i = 3, #ARGV do
  local state = ARGV[i]
  local key = sets[state]
  local budget = limit - purged
  if key and budget > 0 then
    local popped = redis.call('ZPOPMIN', key, budget)
    for j = 1, #popped, 2 do
      local id = popped[j]
      if state == 'r' then
        id = id_of_member(id)
      end
      redis.call('DEL', item_prefix .. id)
    end
    purged = purged + #popped / 2
  end
  if key and redis.call('ZCARD', key) > 0 then
    more = 1
  end
end
return {purged, more}
