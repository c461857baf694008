-- Writes what a replica did while Redis was unreachable, so that writing
-- it again changes nothing: the window slots of its answered calls that
-- still run, by call id (ms left on each), its calls still in flight by id
-- (a window slot if they have none, and the concurrency lease unless the
-- call is over), and the calls per service in numbered batches, each
-- counted once, to the day it names (KEYS[5] on: an outage may cross
-- midnight).
local window, inflight, batches, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, slot in ipairs(a.slots) do
  redis.call('ZADD', window, now + slot[2], slot[1])
end
for _, id in ipairs(a.live) do
  redis.call('ZADD', window, 'NX', now + a.pending_ms, id)
  if not redis.call('ZSCORE', done, id) then redis.call('ZADD', inflight, now + a.lease_ms, id) end
end
redis.call('ZREMRANGEBYSCORE', batches, '-inf', now)
for _, batch in ipairs(a.batches) do
  if not redis.call('ZSCORE', batches, batch.id) then
    local day = KEYS[5 + batch.day]
    for _, count in ipairs(batch.calls) do
      redis.call('HINCRBY', day, count[1], count[2])
      redis.call('HINCRBY', day, 'total', count[2])
    end
    redis.call('ZADD', batches, now + a.day_ttl_s * 1000, batch.id)
  end
end
for i = 5, #KEYS do redis.call('EXPIRE', KEYS[i], a.day_ttl_s) end
redis.call('PEXPIRE', batches, a.day_ttl_s * 1000)
redis.call('PEXPIRE', window, a.pending_ms + 60000)
redis.call('PEXPIRE', inflight, a.lease_ms + 60000)
return 1
