-- Marketo said a bulk queue is full: no replica enqueues there for a while.
local paused = KEYS[1]
local a = cjson.decode(ARGV[1])
redis.call('SET', paused, 1, 'PX', a.pause_ms)
return 1
