-- Checks and takes a window slot, a concurrency lease and a unit of the
-- day's quota for one call, or says which limit is in the way and for how
-- long. Replies {granted, verdict, wait ms, window slots taken, calls in
-- flight, day's calls, Redis ms, learned limits' version, ms until each
-- window slot frees (soonest first)}.
local window, inflight, service_window, service_inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local day, done, epoch, settling, learned = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs({window, inflight, service_window, service_inflight, done}) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
end
local total = tonumber(redis.call('HGET', day, 'total') or '0')
local foreign = tonumber(redis.call('HGET', day, 'foreign') or '0')
local function reply(granted, verdict, wait)
  local version = tonumber(redis.call('HGET', learned, 'version') or '0')
  local slots = redis.call('ZRANGE', window, 0, -1, 'WITHSCORES')
  local frees = {}
  for i = 2, #slots, 2 do frees[#frees + 1] = math.max(0, tonumber(slots[i]) - now) end
  return {granted, verdict, wait, redis.call('ZCARD', window), redis.call('ZCARD', inflight), total + foreign, now, version, frees}
end
local function wait(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(1, tonumber(first[2]) - now) end
  return 1000
end
-- Its asker gave up on it already and released it.
if redis.call('ZSCORE', done, a.id) then return reply(0, 'released', 0) end
-- Redis lost the data the asker wrote (its window slots among them).
if redis.call('GET', epoch) ~= a.epoch then return reply(0, 'lost', 0) end
-- It lost it just now: the replicas are still writing what they hold.
local settle = redis.call('PTTL', settling)
if settle > 0 then return reply(0, 'settling', settle) end
if redis.call('ZCARD', inflight) >= a.concurrency then return reply(0, 'concurrency', 25) end
if redis.call('ZCARD', service_inflight) >= a.service_concurrency then
  return reply(0, 'service_concurrency', 25)
end
if redis.call('ZCARD', window) >= a.window_calls then return reply(0, 'window', wait(window)) end
if a.service_window_calls > 0 and redis.call('ZCARD', service_window) >= a.service_window_calls then
  return reply(0, 'service_window', wait(service_window))
end
local spent = tonumber(redis.call('HGET', day, 'spent') or '0')
if spent > 0 and now < spent then return reply(0, 'spent', spent - now) end
local remaining = a.daily_quota - total - foreign
if remaining <= 0 then return reply(0, 'quota', 0) end
if tonumber(redis.call('HGET', day, a.field) or '0') >= a.cap then return reply(0, 'service_cap', 0) end
local held = 0
for _, reserve in ipairs(a.reserves) do
  local used = tonumber(redis.call('HGET', day, reserve[1]) or '0')
  held = held + math.max(0, reserve[2] - used)
end
if remaining <= held then return reply(0, 'reserved', 0) end
-- After Marketo's 607 this call is the probe: the others wait for it.
if spent > 0 then redis.call('HSET', day, 'spent', now + a.probe_after_ms) end
redis.call('ZADD', window, now + a.pending_ms, a.id)
redis.call('ZADD', inflight, now + a.lease_ms, a.id)
if a.service_window_calls > 0 then redis.call('ZADD', service_window, now + a.pending_ms, a.id) end
redis.call('ZADD', service_inflight, now + a.lease_ms, a.id)
total = total + 1
redis.call('HINCRBY', day, 'total', 1)
redis.call('HINCRBY', day, a.field, 1)
redis.call('EXPIRE', day, a.day_ttl_s)
for _, key in ipairs({window, inflight, service_window, service_inflight}) do
  redis.call('PEXPIRE', key, a.pending_ms + 60000)
end
if spent > 0 then return reply(1, 'probe', 0) end
return reply(1, 'granted', 0)
