-- The day's export bytes and whether Marketo said they are spent (1 or 0).
local day = KEYS[1]
return {tonumber(redis.call('HGET', day, 'bytes') or '0'), redis.call('HEXISTS', day, 'spent')}
