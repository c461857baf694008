-- Renews a call's concurrency leases, re-creating any that lapsed (an
-- outage longer than the lease), unless the call is over. Replies 1 when
-- renewed, 0 when the call is over.
local inflight, service_inflight, done = KEYS[1], KEYS[2], KEYS[3]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', done, a.id) then return 0 end
for _, key in ipairs({inflight, service_inflight}) do
  redis.call('ZADD', key, now + a.lease_ms, a.id)
  redis.call('PEXPIRE', key, a.lease_ms + 60000)
end
return 1
