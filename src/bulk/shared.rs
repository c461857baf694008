//! The bulk state of one Marketo instance, shared by replicas through
//! Redis (`state.backend: redis`), so that they keep to its queues and its
//! export bytes as one proxy would.
//!
//! Under the configured key prefix, changed only by Lua scripts that read
//! Redis `TIME`:
//! - `bulk:jobs`, a hash of every job seen, by id: kind, state, owner,
//!   whether its start and its export bytes were counted, when a replica
//!   last heard of it, and the day it ended (a job that ended before
//!   today goes with the next snapshot);
//! - `bulk:queue:{extract,import}`, the jobs in each queue (id → owner);
//! - `bulk:reserved:{queue}`, places taken for enqueues not yet answered,
//!   a sorted set of ids scored by when they lapse (a replica that dies
//!   holding one loses it after the longest an enqueue can take);
//!   `bulk:released`, ids given back, so that a place taken late (its
//!   answer lost to a timeout) takes nothing;
//! - `bulk:waiting:{queue}`, the services with an enqueue waiting on some
//!   replica, each for a moment after its replica last asked, so that a
//!   place goes to the service with the fewest jobs in the queue whichever
//!   replica it waits on;
//! - `bulk:paused:{queue}`, set for `bulk.pause` after Marketo said the
//!   queue was full, cleared when a job leaves it;
//! - `bulk:day:{date}`, the day's export bytes, whether Marketo said they
//!   are spent, and per service the jobs started and export bytes, on
//!   Redis's day in the quota's zone; it lapses three days later.
//!
//! Writing what a job did is idempotent (states only move forward, a job's
//! start and its bytes are counted once, by the flags on its entry), so a
//! replica that lost Redis writes again everything it saw meanwhile and
//! nothing is counted twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;

use super::endpoint::{JobState, Kind, Queue};
use super::jobs::ServiceDay;
use crate::admission::shared::{SharedError, SharedLimits, millis};
use crate::config::Config;

/// Day hashes, the jobs and the queues outlive their last write by this.
const KEEP: Duration = Duration::from_secs(3 * 24 * 3600);
/// A job created and never enqueued is forgotten after this.
const STALE_CREATED: Duration = Duration::from_secs(24 * 3600);

/// Takes a place in a queue for a service if the queue has room and no
/// service waiting elsewhere has fewer jobs in it. KEYS: queue, reserved,
/// paused, released, waiting. ARGV: place id, queue limit, ms the place is
/// held, service ('' for none), ms the service is remembered as waiting
/// (0: it does not wait).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs({KEYS[2], KEYS[4], KEYS[5]}) do redis.call('ZREMRANGEBYSCORE', key, '-inf', now) end
local service, waits = ARGV[4], tonumber(ARGV[5])
if service ~= '' and waits > 0 then
  redis.call('ZADD', KEYS[5], now + waits, service)
  redis.call('PEXPIRE', KEYS[5], waits + 60000)
end
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local owners = redis.call('HVALS', KEYS[1])
if #owners + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
local function owned(name)
  local jobs = 0
  for _, owner in ipairs(owners) do if owner == name then jobs = jobs + 1 end end
  return jobs
end
local mine = owned(service)
for _, other in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if other ~= service and owned(other) < mine then return 0 end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 60000)
return 1
";

/// Holds the places a replica took while Redis was unreachable, unless
/// given back, and gives places back. KEYS: reserved, released. ARGV: ms a
/// place is held, ms a given-back id is remembered, n, n ids to hold, then
/// the ids to give back.
const PLACES: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
for i = 4, 3 + n do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then redis.call('ZADD', KEYS[1], now + hold, ARGV[i]) end
end
for i = 4 + n, #ARGV do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], hold + 60000)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 60000)
return 1
";

/// Takes what replicas saw of jobs: states move forward only; a job's
/// start is counted once for its owner (or the service that enqueued it),
/// a completed export's bytes once for the day and its owner; a job that
/// leaves its queue ends that queue's pause. Returns the day's counts it
/// changed, as field, new total. KEYS: jobs, extract queue, import queue, day,
/// extract pause, import pause. ARGV: today, ms to keep, then per job id,
/// kind, queue, base, state, owner ('' for none), started (0 or 1), file
/// size ('' if unknown).
const OBSERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rank = {created = 1, queued = 2, processing = 3, completed = 4, failed = 5, cancelled = 6}
local function active(state) return state == 'queued' or state == 'processing' end
local changed = {}
local function add(field, amount)
  table.insert(changed, field)
  table.insert(changed, tostring(redis.call('HINCRBY', KEYS[4], field, amount)))
end
for i = 3, #ARGV, 8 do
  local id, state, owner = ARGV[i], ARGV[i + 4], ARGV[i + 5]
  local raw = redis.call('HGET', KEYS[1], id)
  local job
  if raw then
    job = cjson.decode(raw)
  else
    job = {k = ARGV[i + 1], q = ARGV[i + 2], b = ARGV[i + 3], s = 'created', o = owner, c = 0, n = 0}
  end
  local was = job.s
  if rank[state] >= rank[was] then job.s = state end
  job.h = now
  if ARGV[i + 6] == '1' and not active(was) and job.n == 0 then
    job.n = 1
    local who = job.o ~= '' and job.o or owner
    if who ~= '' then add('jobs:' .. who, 1) end
  end
  if job.s == 'completed' and job.q == 'extract' and job.c == 0 and ARGV[i + 7] ~= '' then
    job.c = 1
    add('bytes', tonumber(ARGV[i + 7]))
    if job.o ~= '' then add('bytes:' .. job.o, tonumber(ARGV[i + 7])) end
  end
  if rank[job.s] >= 4 and not job.d then job.d = ARGV[1] end
  local queue, pause = KEYS[2], KEYS[5]
  if job.q == 'import' then queue, pause = KEYS[3], KEYS[6] end
  if active(job.s) then
    redis.call('HSET', queue, id, job.o)
  elseif redis.call('HDEL', queue, id) == 1 then
    redis.call('DEL', pause)
  end
  redis.call('HSET', KEYS[1], id, cjson.encode(job))
end
local keep = tonumber(ARGV[2])
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
return changed
";

/// Every job seen (those that ended before today, and those created and
/// never enqueued for long, are forgotten first), the day's counts and
/// the places taken in each queue. KEYS: jobs, day, extract reserved,
/// import reserved. ARGV: today, ms after which a created job is stale.
const SNAPSHOT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local jobs = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local id, job = all[i], cjson.decode(all[i + 1])
  local stale = job.s == 'created' and now - job.h > tonumber(ARGV[2])
  if stale or (job.d and job.d < ARGV[1]) then
    redis.call('HDEL', KEYS[1], id)
  else
    for _, value in ipairs({id, job.k, job.b, job.s, job.o, tostring(job.c), tostring(job.n), tostring(now - job.h)}) do
      table.insert(jobs, value)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
return {jobs, redis.call('HGETALL', KEYS[2]), redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[4])}
";

/// The day's export bytes and whether Marketo said they are spent. KEYS:
/// day.
const EXPORT_DAY: &str = r"
return {tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0'), redis.call('HEXISTS', KEYS[1], 'spent')}
";

/// Marketo said the day's export bytes are spent. KEYS: day. ARGV: ms to
/// keep.
const SPENT: &str = r"
redis.call('HSET', KEYS[1], 'spent', 1)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
";

/// Marketo said a queue is full. KEYS: pause. ARGV: ms.
const PAUSE: &str = r"
redis.call('SET', KEYS[1], 1, 'PX', tonumber(ARGV[1]))
return 1
";

/// What one answer (or a catch-up) says of one job.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub kind: Kind,
    pub base: String,
    pub state: JobState,
    /// Its owner, or the service that called.
    pub owner: Option<usize>,
    /// The call put it in its queue.
    pub started: bool,
    pub file_size: Option<u64>,
}

/// A job as Redis holds it.
#[derive(Debug, Clone)]
pub struct SharedJob {
    pub kind: Kind,
    pub base: String,
    pub state: JobState,
    pub owner: Option<usize>,
    /// Its export bytes are counted.
    pub charged: bool,
    /// Its start is counted.
    pub counted: bool,
    /// Since a replica last heard of it.
    pub quiet: Duration,
}

/// The day's counts (after a write, those it changed; the others are 0).
#[derive(Debug, Clone, Default)]
pub struct DayCounts {
    pub export_bytes: u64,
    pub spent: bool,
    /// Per service, in the order of the configured names.
    pub services: Vec<ServiceDay>,
}

/// Everything the replicas share, as of one moment.
pub struct Snapshot {
    pub jobs: Vec<(String, SharedJob)>,
    pub day: DayCounts,
    /// Places taken in each queue, by every replica.
    pub reserved: [usize; 2],
}

/// The bulk keys and scripts of one instance; see the module documentation.
pub struct SharedBulk {
    redis: Arc<SharedLimits>,
    names: Vec<String>,
    /// How long a place is held before its enqueue has surely been
    /// answered: the longest wait and two request timeouts.
    hold: Duration,
    admit: redis::Script,
    places: redis::Script,
    observe: redis::Script,
    snapshot: redis::Script,
    export_day: redis::Script,
    spent: redis::Script,
    pause: redis::Script,
}

impl SharedBulk {
    pub fn new(config: &Config, redis: Arc<SharedLimits>) -> Self {
        let longest_wait = config
            .services
            .iter()
            .map(|service| service.effective_max_queue_wait(&config.limits))
            .fold(config.limits.max_queue_wait, Duration::max);
        Self {
            redis,
            names: config.counted_names(),
            hold: longest_wait + config.marketo.request_timeout * 2,
            admit: redis::Script::new(ADMIT),
            places: redis::Script::new(PLACES),
            observe: redis::Script::new(OBSERVE),
            snapshot: redis::Script::new(SNAPSHOT),
            export_day: redis::Script::new(EXPORT_DAY),
            spent: redis::Script::new(SPENT),
            pause: redis::Script::new(PAUSE),
        }
    }

    /// Today by Redis's clock, in the quota's zone.
    pub fn day(&self) -> NaiveDate {
        self.redis.day()
    }

    fn key(&self, name: &str) -> String {
        self.redis.key(&format!("bulk:{name}"))
    }

    fn queue_key(&self, name: &str, queue: Queue) -> String {
        self.key(&format!("{name}:{}", queue.label()))
    }

    fn day_key(&self, day: NaiveDate) -> String {
        self.key(&format!("day:{day}"))
    }

    /// How long a given-back place's id is remembered: longer than a place
    /// taken late can be on its way.
    fn tombstone(&self) -> Duration {
        (self.hold * 2).max(Duration::from_secs(60))
    }

    /// Takes a place in `queue` (`limit` jobs) under `id` for `service`, if
    /// it has room and no service waiting has fewer jobs in it. `waits`:
    /// the service waits, and counts as waiting for that long.
    pub async fn admit(
        &self,
        queue: Queue,
        id: &str,
        limit: usize,
        service: Option<usize>,
        waits: Option<Duration>,
    ) -> Result<bool, SharedError> {
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(self.queue_key("queue", queue))
            .key(self.queue_key("reserved", queue))
            .key(self.queue_key("paused", queue))
            .key(self.key("released"))
            .key(self.queue_key("waiting", queue))
            .arg(id)
            .arg(limit)
            .arg(millis(self.hold))
            .arg(self.name(service))
            .arg(waits.map_or(0, millis));
        self.redis
            .call::<u8>(&invocation)
            .await
            .map(|granted| granted == 1)
    }

    /// Holds the places `hold` (taken while Redis was unreachable) and
    /// gives back `release`.
    pub async fn places(&self, queue: Queue, hold: &[String], release: &[String]) -> Result<(), SharedError> {
        let mut invocation = self.places.prepare_invoke();
        invocation
            .key(self.queue_key("reserved", queue))
            .key(self.key("released"))
            .arg(millis(self.hold))
            .arg(millis(self.tombstone()))
            .arg(hold.len())
            .arg(hold)
            .arg(release);
        self.redis.call::<u8>(&invocation).await.map(drop)
    }

    /// Writes what was seen of `jobs` on `day`; answers the day's counts
    /// that changed.
    pub async fn observe(&self, day: NaiveDate, jobs: &[Seen]) -> Result<DayCounts, SharedError> {
        let mut invocation = self.observe.prepare_invoke();
        invocation
            .key(self.key("jobs"))
            .key(self.queue_key("queue", Queue::Extract))
            .key(self.queue_key("queue", Queue::Import))
            .key(self.day_key(day))
            .key(self.queue_key("paused", Queue::Extract))
            .key(self.queue_key("paused", Queue::Import))
            .arg(day.to_string())
            .arg(millis(KEEP));
        for job in jobs {
            invocation
                .arg(&job.id)
                .arg(job.kind.label())
                .arg(job.kind.queue().label())
                .arg(&job.base)
                .arg(job.state.label())
                .arg(self.name(job.owner))
                .arg(u8::from(job.started))
                .arg(job.file_size.map(|size| size.to_string()).unwrap_or_default());
        }
        let changed: Vec<String> = self.redis.call(&invocation).await?;
        Ok(self.day_counts(&changed))
    }

    /// Every job, the day's counts and the places taken.
    pub async fn snapshot(&self, day: NaiveDate) -> Result<Snapshot, SharedError> {
        let mut invocation = self.snapshot.prepare_invoke();
        invocation
            .key(self.key("jobs"))
            .key(self.day_key(day))
            .key(self.queue_key("reserved", Queue::Extract))
            .key(self.queue_key("reserved", Queue::Import))
            .arg(day.to_string())
            .arg(millis(STALE_CREATED));
        let (jobs, counts, extract, import): (Vec<String>, Vec<String>, usize, usize) =
            self.redis.call(&invocation).await?;
        let jobs = jobs
            .chunks_exact(8)
            .filter_map(|job| {
                let [id, kind, base, state, owner, charged, counted, quiet] = job else {
                    return None;
                };
                let quiet = quiet.parse::<f64>().ok()?.max(0.0);
                Some((
                    id.clone(),
                    SharedJob {
                        kind: Kind::from_label(kind)?,
                        base: base.clone(),
                        state: JobState::from_label(state)?,
                        owner: self.names.iter().position(|name| name == owner),
                        charged: charged == "1",
                        counted: counted == "1",
                        quiet: Duration::from_secs_f64(quiet / 1000.0),
                    },
                ))
            })
            .collect();
        Ok(Snapshot {
            jobs,
            day: self.day_counts(&counts),
            reserved: [extract, import],
        })
    }

    /// The day's export bytes and whether Marketo said they are spent.
    pub async fn export_day(&self, day: NaiveDate) -> Result<(u64, bool), SharedError> {
        let mut invocation = self.export_day.prepare_invoke();
        invocation.key(self.day_key(day));
        let (bytes, spent): (u64, u8) = self.redis.call(&invocation).await?;
        Ok((bytes, spent == 1))
    }

    /// Marketo said the day's export bytes are spent.
    pub async fn mark_spent(&self, day: NaiveDate) -> Result<(), SharedError> {
        let mut invocation = self.spent.prepare_invoke();
        invocation.key(self.day_key(day)).arg(millis(KEEP));
        self.redis.call::<u8>(&invocation).await.map(drop)
    }

    /// Marketo said `queue` is full: no replica enqueues there for `pause`,
    /// unless a job leaves it.
    pub async fn pause(&self, queue: Queue, pause: Duration) -> Result<(), SharedError> {
        let mut invocation = self.pause.prepare_invoke();
        invocation
            .key(self.queue_key("paused", queue))
            .arg(millis(pause).max(1));
        self.redis.call::<u8>(&invocation).await.map(drop)
    }

    fn name(&self, service: Option<usize>) -> &str {
        service
            .and_then(|service| self.names.get(service))
            .map_or("", String::as_str)
    }

    /// Reads a day hash's fields (`bytes`, `spent`, `jobs:NAME`,
    /// `bytes:NAME`, as pairs); fields of services no longer configured
    /// are left out.
    fn day_counts(&self, fields: &[String]) -> DayCounts {
        let mut counts = DayCounts {
            services: vec![ServiceDay::default(); self.names.len()],
            ..DayCounts::default()
        };
        for pair in fields.chunks_exact(2) {
            let amount = pair[1].parse::<u64>().unwrap_or(0);
            let (what, name) = pair[0].split_once(':').unwrap_or((pair[0].as_str(), ""));
            let service = self.names.iter().position(|known| known == name);
            match (what, service) {
                ("bytes", _) if name.is_empty() => counts.export_bytes += amount,
                ("spent", _) => counts.spent = true,
                ("jobs", Some(service)) => counts.services[service].jobs += amount,
                ("bytes", Some(service)) => counts.services[service].export_bytes += amount,
                _ => {}
            }
        }
        counts
    }
}
