--[[
  due: the reaper's claim on the queues whose next pass is due. Reads the queue index, and moves
  every due queue it returns to now + the claim period, so another broker replica does not visit
  it meanwhile; after its pass the reaper lowers the entry to when the queue next needs one.
  This script touches one global key of its own and no queue's keys.

  KEYS[1] <prefix>:queues:due   sorted set of queue names by next pass (ms)

  ARGV[1] most queues to claim
  ARGV[2] claim period (ms)

  Returns {now_ms, queue_1, ..., queue_N}.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, name in ipairs(due) do
  claimed[#claimed + 1] = now + tonumber(ARGV[2])
  claimed[#claimed + 1] = name
end
if #claimed > 0 then
  redis.call('ZADD', KEYS[1], 'XX', unpack(claimed))
end
local result = {now}
for _, name in ipairs(due) do result[#result + 1] = name end
return result
