-- Moves a call's window slots (KEYS: the instance's window, and the
-- service's when it has one) when its answer arrives: they free `free_in_ms`
-- from now. Replies the ms until each of the instance's window slots frees,
-- as the acquire script does.
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs(KEYS) do redis.call('ZADD', key, 'XX', now + a.free_in_ms, a.id) end
local slots = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local frees = {}
for i = 2, #slots, 2 do frees[#frees + 1] = math.max(0, tonumber(slots[i]) - now) end
return frees
