-- Takes Marketo's count of today's calls: what it counted beyond all
-- replicas' calls came from outside. Replies {today's calls from outside,
-- the replicas' calls Marketo refused today}.
local day = KEYS[1]
local a = cjson.decode(ARGV[1])
local total = tonumber(redis.call('HGET', day, 'total') or '0')
local foreign = math.max(0, a.marketo_total - total)
local known = tonumber(redis.call('HGET', day, 'foreign') or '0')
if foreign > known then
  redis.call('HSET', day, 'foreign', foreign)
  known = foreign
end
redis.call('EXPIRE', day, a.day_ttl_s)
return {known, tonumber(redis.call('HGET', day, 'refused') or '0')}
