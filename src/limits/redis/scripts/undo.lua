-- Gives back everything an acquisition took, when its asker never got the
-- answer, and leaves a tombstone so that an acquisition still on its way
-- takes nothing. Counts the day's unit back only if it was taken. Replies
-- how many of the four sets held it.
local window, inflight, service_window, service_inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local day, done = KEYS[5], KEYS[6]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', done, now + a.tombstone_ms, a.id)
redis.call('PEXPIRE', done, a.tombstone_ms + 60000)
local took = 0
for _, key in ipairs({window, inflight, service_window, service_inflight}) do
  took = took + redis.call('ZREM', key, a.id)
end
if took > 0 then
  redis.call('HINCRBY', day, 'total', -1)
  redis.call('HINCRBY', day, a.field, -1)
end
return took
