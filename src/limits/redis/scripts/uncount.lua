-- Gives back what a call took of the window and the day when Marketo did
-- not count it (its answer's code says so): its window slots go, and the
-- day's unit with them, once. Its concurrency lease stays until the call
-- is over. KEYS: day, the instance's window, and the service's when it has
-- one. Replies how many windows held it.
local day = KEYS[1]
local a = cjson.decode(ARGV[1])
local took = 0
for i = 2, #KEYS do
  took = took + redis.call('ZREM', KEYS[i], a.id)
end
if took > 0 and redis.call('EXISTS', day) == 1 then
  redis.call('HINCRBY', day, 'total', -1)
  redis.call('HINCRBY', day, a.field, -1)
end
return took
