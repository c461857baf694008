-- Moves a call's window slots (KEYS: the instance's window, and the
-- service's when it has one) when its answer arrives: they free `free_in_ms`
-- from now.
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs(KEYS) do redis.call('ZADD', key, 'XX', now + a.free_in_ms, a.id) end
return 1
