-- Counts a refusal of Marketo's in the day hash (its error report counts
-- every replica's) and keeps the latest lowering of each learned limit, so
-- that what one replica learns from Marketo's refusals holds for all.
-- Replies the learned hash.
local learned, day = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[1])
redis.call('HINCRBY', day, 'refused', 1)
redis.call('EXPIRE', day, a.day_ttl_s)
local changed = false
for _, kind in ipairs({'window', 'concurrency'}) do
  local episode = a[kind]
  local stored = tonumber(redis.call('HGET', learned, kind .. '_at') or '0')
  local stored_floor = tonumber(redis.call('HGET', learned, kind .. '_floor') or '0')
  local at = episode.at_ms
  if at > stored or (at == stored and at > 0 and episode.floor < stored_floor) then
    redis.call('HSET', learned, kind .. '_floor', episode.floor, kind .. '_at', at, kind .. '_hold', episode.hold_ms)
    changed = true
  end
end
if changed then redis.call('HINCRBY', learned, 'version', 1) end
redis.call('PEXPIRE', learned, a.learned_ttl_ms)
return redis.call('HGETALL', learned)
