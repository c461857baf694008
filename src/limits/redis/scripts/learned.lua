-- The learned limits, as LEARN keeps them.
local learned = KEYS[1]
return redis.call('HGETALL', learned)
