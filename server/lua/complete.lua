--[[
  complete: finishes live leases successfully. The item is forgotten at once, or kept with its
  result for the retention period (then Redis expires it); either way its id stays known for
  deduplication (see lib.lua, ARGV[4]). When the last item of the queue is completed, the drain
  is announced (see lib.lua).

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9] completed-item retention (ms, 0 = forget at once)
  then 3 values per completion: id, token, result ('' = none)

  Returns {ok_1, ..., ok_N}: ok_i is 1 when lease i was live and the item completed, else 0.
]]

local retention_ms = tonumber(ARGV[9])
local now = now_ms()
-- Formatted once, not once per item by redis.call.
local now_arg = tostring(now)
local result = {}
local done = 0
local seen, finished, gone, known = {}, {}, {}, {}
for i = 10, #ARGV, 3 do
  local id, token, res = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local item_key = item_prefix .. id
  local f = redis.call('HMGET', item_key, 's', 'k')
  -- The same lease twice in one call completes once (its removal is deferred to the end).
  if f[1] == 'l' and f[2] == token and not seen[id] then
    seen[id] = true
    finished[#finished + 1] = id
    known[#known + 1] = now_arg
    known[#known + 1] = id
    if retention_ms > 0 then
      redis.call('HSET', item_key, 's', 'c', 'ct', now_arg)
      redis.call('HDEL', item_key, 'x', 'k')
      if res ~= '' then
        redis.call('HSET', item_key, 'res', res)
      end
      redis.call('PEXPIRE', item_key, retention_ms)
    else
      gone[#gone + 1] = item_key
    end
    done = done + 1
    result[#result + 1] = 1
  else
    result[#result + 1] = 0
  end
end
call_in_chunks('ZREM', K.leased, finished)
call_in_chunks('DEL', nil, gone)
remember_finished(known)
if done > 0 then
  redis.call('HINCRBY', K.meta, 'done', done)
  -- An idle queue's expiry counts from its last activity, this included.
  redis.call('HSET', K.meta, 'la', now)
  notify_if_drained()
end
return result
