-- Every job seen (those that ended before today, and those created and
-- never enqueued for long, are forgotten first), the day's counts and the
-- places taken in each queue. Replies {jobs (8 fields each), the day hash,
-- extract places, import places}.
local jobs, day, extract_reserved, import_reserved = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local listed = {}
local all = redis.call('HGETALL', jobs)
for i = 1, #all, 2 do
  local id, job = all[i], cjson.decode(all[i + 1])
  local stale = job.s == 'created' and now - job.h > a.stale_created_ms
  if stale or (job.d and job.d < a.today) then
    redis.call('HDEL', jobs, id)
  else
    for _, value in ipairs({id, job.k, job.b, job.s, job.o, tostring(job.c), tostring(job.n), tostring(now - job.h)}) do
      table.insert(listed, value)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', extract_reserved, '-inf', now)
redis.call('ZREMRANGEBYSCORE', import_reserved, '-inf', now)
return {listed, redis.call('HGETALL', day), redis.call('ZCARD', extract_reserved), redis.call('ZCARD', import_reserved)}
