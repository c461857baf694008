-- Holds the places a replica took while Redis was unreachable, unless
-- given back, and gives places back.
local reserved, released = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(a.hold) do
  if not redis.call('ZSCORE', released, id) then redis.call('ZADD', reserved, now + a.hold_ms, id) end
end
for _, id in ipairs(a.release) do
  redis.call('ZADD', released, now + a.tombstone_ms, id)
  redis.call('ZREM', reserved, id)
end
redis.call('PEXPIRE', reserved, a.hold_ms + 60000)
redis.call('PEXPIRE', released, a.tombstone_ms + 60000)
return 1
