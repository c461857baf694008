-- A call is over: its concurrency leases go, and a tombstone keeps a
-- renewal already on its way from bringing them back.
local inflight, service_inflight, done = KEYS[1], KEYS[2], KEYS[3]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', done, now + a.tombstone_ms, a.id)
redis.call('PEXPIRE', done, a.tombstone_ms + 60000)
redis.call('ZREM', inflight, a.id)
redis.call('ZREM', service_inflight, a.id)
return 1
