--[[
  release: gives live leases back unprocessed. The items are ready again at once, in their
  original order (they keep their enqueue sequence), and the attempt is not counted.

  KEYS and ARGV[1..8]: see lib.lua.
  then 2 values per lease, from ARGV[9]: id, token

  Returns {ok_1, ..., ok_N}: ok_i is 1 when lease i was live and the item is ready again.
]]

local result = {}
local released = 0
for i = 9, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local item_key = item_prefix .. id
  local f = redis.call('HMGET', item_key, 's', 'k')
  if f[1] == 'l' and f[2] == token then
    redis.call('ZREM', K.leased, id)
    make_ready(item_key, id)
    released = released + 1
    result[#result + 1] = 1
  else
    result[#result + 1] = 0
  end
end
notify_ready(released)
return result
