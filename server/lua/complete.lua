--[[
  complete: finishes live leases successfully. The item is forgotten at once, or kept with its
  result for the retention period (then Redis expires it).

  KEYS[1] <prefix>:{<queue>}:leased   KEYS[2] <prefix>:{<queue>}:meta
  KEYS[3] <prefix>:{<queue>}:ready    KEYS[4] <prefix>:{<queue>}:delayed

  ARGV[1] item key prefix
  ARGV[2] completed-item retention (ms, 0 = forget at once)
  ARGV[3] notification channel        ARGV[4] queue name
  then 3 values per completion: id, token, result ('' = none)

  When the last item of the queue is completed, the drain is announced (see lib.lua).

  Returns {ok_1, ..., ok_N}: ok_i is 1 when lease i was live and the item completed, else 0.
]]

local k_leased, k_meta, k_ready, k_delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local item_prefix, retention_ms = ARGV[1], tonumber(ARGV[2])
local channel, queue = ARGV[3], ARGV[4]
local now = now_ms()
local result = {}
local done = 0
local seen, finished, gone = {}, {}, {}
for i = 5, #ARGV, 3 do
  local id, token, res = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local item_key = item_prefix .. id
  local f = redis.call('HMGET', item_key, 's', 'k')
  -- The same lease twice in one call completes once (its removal is deferred to the end).
  if f[1] == 'l' and f[2] == token and not seen[id] then
    seen[id] = true
    finished[#finished + 1] = id
    if retention_ms > 0 then
      redis.call('HSET', item_key, 's', 'c', 'ct', now)
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
call_in_chunks('ZREM', k_leased, finished)
call_in_chunks('DEL', nil, gone)
if done > 0 then
  redis.call('HINCRBY', k_meta, 'done', done)
  notify_if_drained(k_ready, k_leased, k_delayed, channel, queue)
end
return result
