-- The mark of this Redis's data: made by the first replica to find it
-- missing, so a Redis that lost its data (restarted without persistence,
-- or failed over to an empty replica) has a new one, and grants nothing
-- while it settles. Replies {the mark, the learned limits' version}, so
-- that a replica without calls of its own learns of a change within a tick.
local epoch, settling, learned = KEYS[1], KEYS[2], KEYS[3]
local a = cjson.decode(ARGV[1])
local version = tonumber(redis.call('HGET', learned, 'version') or '0')
local mark = redis.call('GET', epoch)
if mark then return {mark, version} end
redis.call('SET', epoch, a.new_mark)
redis.call('SET', settling, '1', 'PX', a.settle_ms)
return {a.new_mark, version}
