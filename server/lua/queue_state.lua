--[[
  queue_state: a consistent snapshot of one queue's counts and flags. Reads only; O(1) apart
  from the meta hash.

  KEYS and ARGV[1..8]: see lib.lua. No arguments of its own.

  Returns {ready, leased, delayed, dead, oldest_ready_enqueue_ms (0 = none), meta, exists} where
  meta is the meta hash as a flat field/value list (counters enq, done, fail, recl, dropped;
  flags paused, sealed) and exists is 1 when the queue holds anything: items, dead letters,
  remembered ids, flags or counters (a deleted or never-used queue holds none).
]]

local oldest = first_score(K.heads) or 0
local ready, leased = redis.call('ZCARD', K.ready), redis.call('ZCARD', K.leased)
local delayed, dead = redis.call('ZCARD', K.delayed), redis.call('ZCARD', K.dead)
local exists = 0
if ready + leased + delayed + dead > 0 or redis.call('ZCARD', K.done) > 0
  or redis.call('HEXISTS', K.meta, 'la') == 1 then
  exists = 1
end
return {ready, leased, delayed, dead, oldest, redis.call('HGETALL', K.meta), exists}
