--[[
  fail: ends a live lease as a failed attempt. The item is retried after the given delay or after
  exponential backoff, or goes to the dead letters when asked to or when its attempts are spent.

  KEYS[1] <prefix>:{<queue>}:ready    KEYS[2] <prefix>:{<queue>}:delayed
  KEYS[3] <prefix>:{<queue>}:leased   KEYS[4] <prefix>:{<queue>}:dead
  KEYS[5] <prefix>:{<queue>}:meta

  ARGV[1] item key prefix     ARGV[2] id            ARGV[3] token
  ARGV[4] error text          ARGV[5] retry delay (ms, -1 = backoff)
  ARGV[6] backoff base (ms)   ARGV[7] backoff factor ARGV[8] backoff cap (ms)
  ARGV[9] jitter in [0, 1)    ARGV[10] dead-letter now (1/0)
  ARGV[11] dead-letter count bound (0 = none)
  ARGV[12] notification channel                     ARGV[13] queue name

  Returns {ok, state, next_attempt_ms}: ok 0 = lease lost (nothing changed); state is
  'r' (ready now), 'd' (delayed until next_attempt_ms) or 'x' (dead).
]]

local k_ready, k_delayed, k_leased, k_dead, k_meta = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local item_prefix, id, token, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retry_ms = tonumber(ARGV[5])
local base_ms, factor, cap_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local jitter, dead_now, max_dead = tonumber(ARGV[9]), ARGV[10] == '1', tonumber(ARGV[11])
local channel, queue = ARGV[12], ARGV[13]

local item_key = item_prefix .. id
local f = redis.call('HMGET', item_key, 's', 'k', 'm')
if f[1] ~= 'l' or f[2] ~= token then
  return {0, '', 0}
end

local now = now_ms()
redis.call('ZREM', k_leased, id)
redis.call('HINCRBY', k_meta, 'fail', 1)
local attempts = redis.call('HINCRBY', item_key, 'a', 1)
redis.call('HSET', item_key, 'err', err)

if dead_now or attempts >= tonumber(f[3]) then
  make_dead(k_dead, k_meta, item_prefix, item_key, id, now, err, max_dead)
  notify_if_drained(k_ready, k_leased, k_delayed, channel, queue)
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
  make_ready(k_ready, item_key, id)
  notify_ready(channel, queue, 1)
  return {1, 'r', now}
end
local due = now + delay
redis.call('HSET', item_key, 's', 'd', 't', due)
redis.call('HDEL', item_key, 'x', 'k')
redis.call('ZADD', k_delayed, due, id)
return {1, 'd', due}
