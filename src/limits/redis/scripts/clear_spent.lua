-- A call went through after Marketo's 607: the day is not spent.
local day = KEYS[1]
redis.call('HDEL', day, 'spent')
return 1
