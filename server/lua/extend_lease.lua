--[[
  extend_lease: pushes live leases to now + duration (a heartbeat). A lease whose expiry has
  passed but which has not been reclaimed yet is still live.

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9] lease duration (ms)
  then 2 values per lease: id, token

  Returns {expire_ms, ok_1, ..., ok_N}: ok_i is 1 when lease i was live and extended, else 0.
]]

local lease_ms = tonumber(ARGV[9])
local expire = now_ms() + lease_ms
local result = {expire}
for i = 10, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local item_key = item_prefix .. id
  local f = redis.call('HMGET', item_key, 's', 'k')
  if f[1] == 'l' and f[2] == token then
    redis.call('HSET', item_key, 'x', expire)
    redis.call('ZADD', K.leased, expire, id)
    result[#result + 1] = 1
  else
    result[#result + 1] = 0
  end
end
return result
