-- Makes Redis grant nothing for a while, unless a hold is already on.
local settling = KEYS[1]
local a = cjson.decode(ARGV[1])
redis.call('SET', settling, '1', 'PX', a.hold_ms, 'NX')
return 1
