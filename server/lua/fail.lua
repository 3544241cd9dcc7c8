--[[
  fail: ends a live lease as a failed attempt. The item is retried after the given delay or after
  exponential backoff, or goes to the dead letters when asked to or when its attempts are spent.

  KEYS and ARGV[1..8]: see lib.lua.
  ARGV[9]  id                 ARGV[10] token           ARGV[11] error text
  ARGV[12] retry delay (ms, -1 = backoff)
  ARGV[13] backoff base (ms)  ARGV[14] backoff factor  ARGV[15] backoff cap (ms)
  ARGV[16] jitter in [0, 1)   ARGV[17] dead-letter now (1/0)

  Returns {ok, state, next_attempt_ms}: ok 0 = lease lost (nothing changed); state is
  'r' (ready now; next_attempt_ms is now), 'd' (delayed until next_attempt_ms) or 'x' (dead).
]]

local id, token, err = ARGV[9], ARGV[10], ARGV[11]
local retry_ms = tonumber(ARGV[12])
local base_ms, factor, cap_ms = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local jitter, dead_now = tonumber(ARGV[16]), ARGV[17] == '1'

local item_key = item_prefix .. id
local f = redis.call('HMGET', item_key, 's', 'k', 'm')
if f[1] ~= 'l' or f[2] ~= token then
  return {0, '', 0}
end

local now = now_ms()
redis.call('ZREM', K.leased, id)
redis.call('HINCRBY', K.meta, 'fail', 1)
local attempts = redis.call('HINCRBY', item_key, 'a', 1)
redis.call('HSET', item_key, 'err', err)

if dead_now or attempts >= tonumber(f[3]) then
  make_dead(item_key, id, now, err)
  notify_if_drained()
  return {1, 'x', 0}
end

local delay = retry_ms
if delay < 0 then
  -- Exponential backoff with "equal jitter": half the step is fixed, half random, so retries
  -- of a batch that failed together spread out without any retry coming back at once.
  local step = math.min(cap_ms, base_ms * math.pow(factor, attempts - 1))
  delay = math.floor(step / 2 + step / 2 * jitter)
end

if delay <= 0 then
  make_ready(item_key, id)
  notify_ready(1)
  return {1, 'r', now}
end
local due = now + delay
redis.call('HSET', item_key, 's', 'd', 't', due)
redis.call('HDEL', item_key, 'x', 'k')
redis.call('ZADD', K.delayed, due, id)
return {1, 'd', due}
