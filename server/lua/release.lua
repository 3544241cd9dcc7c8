--[[
  release: gives live leases back unprocessed. The items are ready again at once, in their
  original order (they keep their enqueue sequence), and the attempt is not counted.

  KEYS[1] <prefix>:{<queue>}:ready
  KEYS[2] <prefix>:{<queue>}:leased

  ARGV[1] item key prefix
  ARGV[2] notification channel
  ARGV[3] queue name
  then 2 values per lease: id, token

  Returns {ok_1, ..., ok_N}: ok_i is 1 when lease i was live and the item is ready again.
]]

local k_ready, k_leased = KEYS[1], KEYS[2]
local item_prefix, channel, queue = ARGV[1], ARGV[2], ARGV[3]
local result = {}
local released = 0
for i = 4, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local item_key = item_prefix .. id
  local f = redis.call('HMGET', item_key, 's', 'k')
  if f[1] == 'l' and f[2] == token then
    redis.call('ZREM', k_leased, id)
    make_ready(k_ready, item_key, id)
    released = released + 1
    result[#result + 1] = 1
  else
    result[#result + 1] = 0
  end
end
notify_ready(channel, queue, released)
return result
