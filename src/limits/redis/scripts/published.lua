-- The text last published, or nothing.
local key = KEYS[1]
return redis.call('GET', key)
