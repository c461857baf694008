-- Takes what replicas saw of jobs: states move forward only; a job's start
-- is counted once for its owner (or the service that enqueued it), a
-- completed export's bytes once for the day and its owner; a job that
-- leaves its queue ends that queue's pause. Replies the day's counts it
-- changed, as field, new total.
local jobs, extract_queue, import_queue, day = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local extract_paused, import_paused = KEYS[5], KEYS[6]
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rank = {created = 1, queued = 2, processing = 3, completed = 4, failed = 5, cancelled = 6}
local function active(state) return state == 'queued' or state == 'processing' end
local changed = {}
local function add(field, amount)
  table.insert(changed, field)
  table.insert(changed, tostring(redis.call('HINCRBY', day, field, amount)))
end
for _, seen in ipairs(a.jobs) do
  local raw = redis.call('HGET', jobs, seen.id)
  local job
  if raw then
    job = cjson.decode(raw)
  else
    job = {k = seen.kind, q = seen.queue, b = seen.base, s = 'created', o = seen.owner, c = 0, n = 0}
  end
  local was = job.s
  if rank[seen.state] >= rank[was] then job.s = seen.state end
  job.h = now
  if seen.started and not active(was) and job.n == 0 then
    job.n = 1
    local who = job.o ~= '' and job.o or seen.owner
    if who ~= '' then add('jobs:' .. who, 1) end
  end
  if job.s == 'completed' and job.q == 'extract' and job.c == 0 and seen.file_size ~= cjson.null then
    job.c = 1
    add('bytes', seen.file_size)
    if job.o ~= '' then add('bytes:' .. job.o, seen.file_size) end
  end
  if rank[job.s] >= 4 and not job.d then job.d = a.today end
  local queue, pause = extract_queue, extract_paused
  if job.q == 'import' then queue, pause = import_queue, import_paused end
  if active(job.s) then
    redis.call('HSET', queue, seen.id, job.o)
  elseif redis.call('HDEL', queue, seen.id) == 1 then
    redis.call('DEL', pause)
  end
  redis.call('HSET', jobs, seen.id, cjson.encode(job))
end
for _, key in ipairs({jobs, extract_queue, import_queue, day}) do redis.call('PEXPIRE', key, a.keep_ms) end
return changed
