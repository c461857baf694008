-- Takes a place in a bulk queue for a service if the queue has room and no
-- service waiting elsewhere has fewer jobs in it. Replies 1 when taken.
local queue, reserved, paused, released, waiting = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs({reserved, released, waiting}) do redis.call('ZREMRANGEBYSCORE', key, '-inf', now) end
local service = a.service
if service ~= '' and a.waits_ms > 0 then
  redis.call('ZADD', waiting, now + a.waits_ms, service)
  redis.call('PEXPIRE', waiting, a.waits_ms + 60000)
end
if redis.call('ZSCORE', released, a.id) then return 0 end
if redis.call('EXISTS', paused) == 1 then return 0 end
local owners = redis.call('HVALS', queue)
if #owners + redis.call('ZCARD', reserved) >= a.limit then return 0 end
local function owned(name)
  local jobs = 0
  for _, owner in ipairs(owners) do if owner == name then jobs = jobs + 1 end end
  return jobs
end
local mine = owned(service)
for _, other in ipairs(redis.call('ZRANGE', waiting, 0, -1)) do
  if other ~= service and owned(other) < mine then return 0 end
end
redis.call('ZADD', reserved, now + a.hold_ms, a.id)
redis.call('PEXPIRE', reserved, a.hold_ms + 60000)
return 1
