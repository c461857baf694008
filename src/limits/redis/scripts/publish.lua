-- Keeps a text (Marketo's usage report as the reconciler read it) for a
-- while, for the other replicas.
local key = KEYS[1]
local a = cjson.decode(ARGV[1])
redis.call('SET', key, a.text, 'PX', a.keep_ms)
return 1
