-- Marketo said 607: no replica calls before the probe time (Redis time
-- plus `probe_after_ms`).
local day = KEYS[1]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', day, 'spent', now + a.probe_after_ms)
redis.call('EXPIRE', day, a.day_ttl_s)
return 1
