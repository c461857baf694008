-- Marketo said the day's export bytes are spent.
local day = KEYS[1]
local a = cjson.decode(ARGV[1])
redis.call('HSET', day, 'spent', 1)
redis.call('PEXPIRE', day, a.keep_ms)
return 1
