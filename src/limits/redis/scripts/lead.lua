-- Takes or keeps the lock of the replica that reads Marketo's usage report
-- for all of them. Replies 1 when this replica holds it.
local lock = KEYS[1]
local a = cjson.decode(ARGV[1])
local holder = redis.call('GET', lock)
if holder and holder ~= a.replica then return 0 end
redis.call('SET', lock, a.replica, 'PX', a.hold_ms)
return 1
