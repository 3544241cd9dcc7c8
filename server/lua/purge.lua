--[[
  purge: deletes items of the given states, at most one step (ARGV[5]) per call; the caller
  repeats while `more` is 1. Leases of purged items are lost (their item is gone). Purged ids
  are not remembered for deduplication. When the call leaves the queue drained, the drain is
  announced.

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9..] states to purge: any of 'r', 'd', 'l', 'x'

  Returns {purged, more}.
]]

local sets = {r = K.ready, d = K.delayed, l = K.leased, x = K.dead}

local purged = 0
local more = 0
for i = 9, #ARGV do
  local state = ARGV[i]
  local key = sets[state]
  local budget = step_limit - purged
  if key and budget > 0 then
    local popped = redis.call('ZPOPMIN', key, budget)
    local gone, bands = {}, {}
    for j = 1, #popped, 2 do
      local id = popped[j]
      if state == 'r' then
        id = id_of_member(id)
        bands[0 - tonumber(popped[j + 1])] = true
      end
      gone[#gone + 1] = item_prefix .. id
    end
    call_in_chunks('DEL', nil, gone)
    heads_refresh(bands)
    purged = purged + #popped / 2
  end
  if key and redis.call('ZCARD', key) > 0 then
    more = 1
  end
end
if purged > 0 then
  redis.call('HSET', K.meta, 'la', now_ms())
  if more == 0 then
    notify_if_drained()
  end
end
return {purged, more}
