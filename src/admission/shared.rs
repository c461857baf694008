//! The instance's limits shared by several replicas through Redis.
//!
//! Each replica still queues and orders its own requests (see the parent
//! module); before a call goes out it also needs a grant from Redis, where
//! one Lua script, in one round trip, checks and takes everything the call
//! needs across all replicas:
//! - a slot in the sliding window, a sorted set of call ids scored by when
//!   the slot frees (a call in flight is scored far enough ahead to cover
//!   its answer; the answer re-scores it to `answer + window + margin`);
//! - a concurrency lease, a sorted set scored by lease expiry, renewed
//!   while the call runs, so a crashed replica's leases lapse on their own;
//! - the day's counters, in a hash whose key names the local date of the
//!   quota's time zone.
//!
//! Scripts read the time with Redis `TIME`, so replica clocks do not matter:
//! even the day (whose hash a call counts in) is Redis's, in the quota's
//! zone, from the offset between Redis's clock and this replica's that
//! every acquisition reports.
//!
//! Every acquisition carries an id the replica chose. An acquisition whose
//! answer is lost (the Redis timeout, or a client that went away while it
//! waited) may still have run: its id is released in the background, and a
//! tombstone keeps a late-running acquisition from taking anything, so a
//! slow Redis never leaks a lease, a window slot or a unit of the quota.
//!
//! When Redis cannot be reached a replica falls back to its part of what
//! the instance had left when it last saw Redis (`1 / fallback_replicas`
//! of it; never the full limits), says so in `marketo_proxy_backend_up`
//! and the log, and keeps trying. Back in touch, it first writes what it
//! did meanwhile, by id and in numbered batches so that writing it twice
//! counts it once, and the others see it. A Redis that lost its data
//! (restarted empty) learns every replica's window slots and leases again
//! this way, and grants nothing until they all had time to write them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use tokio::time::Instant;

use super::learn::Episode;
use super::quota::QuotaScope;
use super::{Admission, InstanceUse, Permit};
use crate::config::{Config, INTERNAL_SERVICE, RedisConfig};
use crate::limits::day::MarketoDay;
use crate::metrics::Metrics;

/// How long a Redis call may take before Redis counts as unreachable.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often an unreachable Redis is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The longest a grant waits between two asks.
const MAX_ASK_INTERVAL: Duration = Duration::from_millis(500);
/// Acquisitions remembered for release while Redis is unreachable; past
/// this, the oldest lapse on their own (leases) or hold until midnight
/// (a unit of the quota each).
const MAX_TO_RELEASE: usize = 10_000;
/// What replicas learned from Marketo's refusals outlives the longest
/// hold by far.
const LEARNED_TTL: Duration = Duration::from_secs(3600);
/// Day hashes outlive their day by this much.
const DAY_TTL: Duration = Duration::from_secs(3 * 24 * 3600);
/// How long a Redis that lost its data, or that a replica reaches again
/// after an outage, grants nothing: every replica that reaches it finds
/// out within [`RETRY_EVERY`] (and a timeout) and writes its window slots,
/// leases and calls made on its share meanwhile, so that no acquisition
/// takes for free what the others still hold.
const SETTLE: Duration = Duration::from_secs(2);

/// Checks and takes a window slot, a concurrency lease and a unit of the
/// day's quota, or says which limit is in the way and for how long.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
for i = 1, 4 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) end
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
local total = tonumber(redis.call('HGET', KEYS[5], 'total') or '0')
local foreign = tonumber(redis.call('HGET', KEYS[5], 'foreign') or '0')
local function reply(granted, kind, wait)
  local learned = tonumber(redis.call('HGET', KEYS[9], 'version') or '0')
  return {granted, kind, wait, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), total + foreign, now, learned}
end
local function wait(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(1, tonumber(first[2]) - now) end
  return 1000
end
-- Its asker gave up on it already and released it.
if redis.call('ZSCORE', KEYS[6], id) then return reply(0, 'released', 0) end
-- Redis lost the data the asker wrote (its window slots among them).
if redis.call('GET', KEYS[7]) ~= ARGV[13] then return reply(0, 'lost', 0) end
-- It lost it just now: the replicas are still writing what they hold.
local settling = redis.call('PTTL', KEYS[8])
if settling > 0 then return reply(0, 'settling', settling) end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return reply(0, 'concurrency', 25) end
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[7]) then return reply(0, 'service_concurrency', 25) end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return reply(0, 'window', wait(KEYS[1])) end
local service_window = tonumber(ARGV[6])
if service_window > 0 and redis.call('ZCARD', KEYS[3]) >= service_window then
  return reply(0, 'service_window', wait(KEYS[3]))
end
local spent = tonumber(redis.call('HGET', KEYS[5], 'spent') or '0')
if spent > 0 and now < spent then return reply(0, 'spent', spent - now) end
local remaining = tonumber(ARGV[8]) - total - foreign
if remaining <= 0 then return reply(0, 'quota', 0) end
if tonumber(redis.call('HGET', KEYS[5], ARGV[9]) or '0') >= tonumber(ARGV[10]) then
  return reply(0, 'service_cap', 0)
end
local held = 0
for i = 14, #ARGV, 2 do
  local used = tonumber(redis.call('HGET', KEYS[5], ARGV[i]) or '0')
  held = held + math.max(0, tonumber(ARGV[i + 1]) - used)
end
if remaining <= held then return reply(0, 'reserved', 0) end
-- After Marketo's 607 this call is the probe: the others wait for it.
if spent > 0 then redis.call('HSET', KEYS[5], 'spent', now + tonumber(ARGV[12])) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), id)
if service_window > 0 then redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), id) end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), id)
total = total + 1
redis.call('HINCRBY', KEYS[5], 'total', 1)
redis.call('HINCRBY', KEYS[5], ARGV[9], 1)
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[11]))
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[3]) + 60000) end
if spent > 0 then return reply(1, 'probe', 0) end
return reply(1, 'ok', 0)
";

/// Counts a refusal of Marketo's in the day hash (its error report counts
/// every replica's), and keeps the latest lowering of each learned limit
/// (see [`super::learn`]), so that what one replica learns from Marketo's
/// refusals holds for all. KEYS: learned, day. ARGV: for the window, then
/// the concurrency: floor, when it was lowered (Redis ms; 0: never), hold
/// ms; then the hash's lifetime in ms, the day hash's in seconds. Answers
/// the learned hash.
const LEARN: &str = r"
redis.call('HINCRBY', KEYS[2], 'refused', 1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
local changed = false
for i, kind in ipairs({'window', 'concurrency'}) do
  local floor, at = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local stored = tonumber(redis.call('HGET', KEYS[1], kind .. '_at') or '0')
  local stored_floor = tonumber(redis.call('HGET', KEYS[1], kind .. '_floor') or '0')
  if at > stored or (at == stored and at > 0 and floor < stored_floor) then
    redis.call('HSET', KEYS[1], kind .. '_floor', floor, kind .. '_at', at, kind .. '_hold', ARGV[3 * i])
    changed = true
  end
end
if changed then redis.call('HINCRBY', KEYS[1], 'version', 1) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[7]))
return redis.call('HGETALL', KEYS[1])
";

/// Gives back everything an acquisition took, when its asker never got
/// the answer, and leaves a tombstone so that an acquisition still on its
/// way takes nothing. Counts the day's unit back only if it was taken.
/// KEYS: window, inflight, service window, service inflight, day, done.
/// ARGV: id, service field, tombstone ms.
const UNDO: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[3]), id)
redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[3]) + 60000)
local took = 0
for i = 1, 4 do took = took + redis.call('ZREM', KEYS[i], id) end
if took > 0 then
  redis.call('HINCRBY', KEYS[5], 'total', -1)
  redis.call('HINCRBY', KEYS[5], ARGV[2], -1)
end
return took
";

/// A call is over: its concurrency leases go, and a tombstone keeps a
/// renewal already on its way from bringing them back. KEYS: inflight,
/// service inflight, done. ARGV: id, tombstone ms.
const RELEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[2]) + 60000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
";

/// Renews a call's concurrency leases, re-creating any that lapsed (an
/// outage longer than the lease), unless the call is over. KEYS:
/// inflight, service inflight, done. ARGV: id, lease ms.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 60000)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) + 60000)
return 1
";

/// Moves a call's window slots when its answer arrives: they free
/// `window + margin` from now. ARGV: call id, ms from now.
const RESCORE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[2]), ARGV[1]) end
return 1
";

/// Writes what a replica did while Redis was unreachable, so that writing
/// it again changes nothing: the window slots of its answered calls that
/// still run, by call id (milliseconds left on each), its calls still in
/// flight by id (a window slot if they have none, and the concurrency
/// lease unless the call is over), and the day's calls per service in
/// numbered batches, each counted once. KEYS: window, inflight, day,
/// applied batches, done. ARGV: pending ms, lease ms, n, n x (id, ms
/// left), m, m x id, then batches: (batch id, k, k x (field, calls)).
const CATCH_UP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pending = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local i = 3
local slots = tonumber(ARGV[i])
for n = 1, slots do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[i + 2 * n]), ARGV[i + 2 * n - 1])
end
i = i + 2 * slots + 1
local live = tonumber(ARGV[i])
for n = 1, live do
  local id = ARGV[i + n]
  redis.call('ZADD', KEYS[1], 'NX', now + pending, id)
  if not redis.call('ZSCORE', KEYS[5], id) then redis.call('ZADD', KEYS[2], now + lease, id) end
end
i = i + live + 1
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
while i <= #ARGV do
  local batch = ARGV[i]
  local fields = tonumber(ARGV[i + 1])
  if not redis.call('ZSCORE', KEYS[4], batch) then
    for n = 1, fields do
      local field = ARGV[i + 2 * n]
      local calls = tonumber(ARGV[i + 2 * n + 1])
      redis.call('HINCRBY', KEYS[3], field, calls)
      redis.call('HINCRBY', KEYS[3], 'total', calls)
    end
    redis.call('ZADD', KEYS[4], now + 259200000, batch)
  end
  i = i + 2 + 2 * fields
end
redis.call('EXPIRE', KEYS[3], 259200)
redis.call('PEXPIRE', KEYS[4], 259200000)
redis.call('PEXPIRE', KEYS[1], pending + 60000)
redis.call('PEXPIRE', KEYS[2], lease + 60000)
return 1
";

/// Marketo said 607: no replica calls before the probe time (Redis time
/// plus ARGV[1] ms). ARGV[2]: the day hash's lifetime.
const MARK_SPENT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'spent', now + tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
";

/// Takes Marketo's count of today's calls: what it counted beyond all
/// replicas' calls came from outside. Answers today's calls from outside
/// and the replicas' calls Marketo refused today.
const RECONCILE: &str = r"
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local foreign = math.max(0, tonumber(ARGV[1]) - total)
local known = tonumber(redis.call('HGET', KEYS[1], 'foreign') or '0')
if foreign > known then
  redis.call('HSET', KEYS[1], 'foreign', foreign)
  known = foreign
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return {known, tonumber(redis.call('HGET', KEYS[1], 'refused') or '0')}
";

/// Takes or keeps the lock of the replica that reads Marketo's usage
/// report for all of them. KEYS: lock. ARGV: replica id, lock ms.
const LEAD: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
";

/// The mark of this Redis's data: made by the first replica to find it
/// missing, so a Redis that lost its data (restarted without persistence,
/// or failed over to an empty replica) has a new one, and grants nothing
/// for [`SETTLE`]. Also answers the version of the learned limits, so that
/// a replica without calls of its own learns of a change within a tick.
/// KEYS: epoch, settling, learned. ARGV: a new mark, used if there is
/// none; settle ms.
const EPOCH: &str = r"
local learned = tonumber(redis.call('HGET', KEYS[3], 'version') or '0')
local epoch = redis.call('GET', KEYS[1])
if epoch then return {epoch, learned} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[2]))
return {ARGV[1], learned}
";

/// Why Redis could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("state.redis.url is not usable: {0}")]
    Url(String),
    #[error("Redis is unreachable")]
    Unreachable,
}

/// What Redis said about a call.
pub enum Grant {
    /// Go: the lease must live as long as the call. While Redis is
    /// unreachable the lease is this replica's own (its fallback share
    /// applies) and is written to Redis when it is back.
    Granted(Lease),
    /// A limit shared with other replicas is in the way for about this long.
    Wait(Duration),
    /// The day's quota (or this service's part) is spent; after Marketo's
    /// 607, for about this long.
    Refused(QuotaScope, Option<Duration>),
    /// Redis was lost just now and this replica dropped to its share of
    /// the limits: the call must be admitted again under the share.
    Readmit,
}

/// This replica's calls in flight, renewed while they run.
#[derive(Default)]
struct Leases {
    /// `false` for those taken while Redis was unreachable and not yet
    /// written there.
    synced: HashMap<(usize, String), bool>,
    /// What was done without Redis is being written to it: no call may
    /// start on a lease of our own until that is done.
    catching_up: bool,
}

/// A service's limits, as the acquire script needs them.
struct ServiceLimits {
    /// The service's name, in its own keys.
    name: String,
    /// Its field in the day hash.
    field: String,
    window_calls: u32,
    concurrency: u32,
    cap: u64,
    reserved: u64,
}

/// The limits shared through one Redis, for one Marketo instance.
pub struct SharedLimits {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    prefix: String,
    window_calls: u32,
    hold: Duration,
    /// How long a call's window slot is held before its answer is known.
    pending: Duration,
    concurrency: u32,
    daily_quota: u64,
    services: Vec<ServiceLimits>,
    fallback_replicas: u32,
    /// Lifetime of a concurrency lease; renewed every third of it.
    lease: Duration,
    up: AtomicBool,
    /// Held while one attempt to get back in touch with Redis runs.
    recovering: tokio::sync::Mutex<()>,
    /// An attempt made at once after a failure is running.
    reconnecting: AtomicBool,
    /// This replica fell back to its share and has not written since what
    /// it did meanwhile.
    fell_back: AtomicBool,
    /// Attempts made so far.
    recoveries: std::sync::atomic::AtomicU64,
    /// Leases of this replica's calls in flight.
    leases: Mutex<Leases>,
    /// Calls per service made while Redis was unreachable, not yet in a
    /// batch.
    unsynced: Mutex<Vec<u64>>,
    /// Batches of those counts on their way to Redis: (batch id, calls per
    /// service), sent again until Redis has taken them.
    batches: Mutex<Vec<(String, Vec<u64>)>>,
    /// This replica's answered calls whose window slots still run: their
    /// ids and when they free, in that order. Written to Redis again by id
    /// after an outage: a Redis that kept them gets the same entries, one
    /// that came back empty learns them again.
    recent_slots: Mutex<std::collections::VecDeque<(String, Instant)>>,
    /// Acquisitions whose answer was lost, still to be released.
    to_release: Mutex<Vec<(usize, NaiveDate, String)>>,
    /// Marketo's day, read by Redis's clock.
    marketo_day: MarketoDay,
    /// Redis's clock minus this replica's, in milliseconds, as of the
    /// last acquisition.
    clock_offset: AtomicI64,
    /// The whole instance's use as Redis last reported it.
    seen: Mutex<InstanceUse>,
    /// When Redis was lost, until this replica's share no longer needs to
    /// leave room for what the others held then.
    lost_at: Mutex<Option<Instant>>,
    /// This replica, for the reconciler's lock.
    replica: String,
    lead: redis::Script,
    epoch_script: redis::Script,
    /// The mark of Redis's data as this replica last saw it.
    epoch: Mutex<Option<String>>,
    /// The version of the learned limits this replica last took.
    learned_version: AtomicI64,
    learn: redis::Script,
    acquire: redis::Script,
    undo: redis::Script,
    release: redis::Script,
    renew: redis::Script,
    rescore: redis::Script,
    catch_up: redis::Script,
    reconcile: redis::Script,
    mark_spent: redis::Script,
    /// How long a 607 holds before a probe.
    probe_after: Duration,
    metrics: Metrics,
}

impl SharedLimits {
    /// Prepares the client; connects on first use. Fails only on a URL
    /// that can never work.
    pub fn new(
        config: &Config,
        redis: &RedisConfig,
        metrics: Metrics,
        marketo_day: MarketoDay,
    ) -> Result<Arc<Self>, SharedError> {
        // The URL may hold a password: the message says what kind of
        // problem, never the URL.
        let client = Self::client(redis)?;
        let limits = &config.limits;
        let services = config
            .services
            .iter()
            .map(|service| ServiceLimits {
                name: service.name.clone(),
                field: day_field(&service.name),
                window_calls: service.window_calls.map_or(0, |calls| calls.get()),
                concurrency: service.effective_concurrency(limits).get(),
                cap: service.effective_daily_quota(limits).get(),
                reserved: service.reserved_daily,
            })
            .chain(std::iter::once(ServiceLimits {
                name: INTERNAL_SERVICE.to_owned(),
                field: day_field(INTERNAL_SERVICE),
                window_calls: 0,
                concurrency: limits.concurrency.get(),
                cap: limits.daily_quota.get(),
                reserved: 0,
            }))
            .collect::<Vec<_>>();
        let hold = limits.window + limits.safety_margin;
        let shared = Arc::new(Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            prefix: format!("{{{}}}", redis.key_prefix),
            window_calls: limits.window_calls.get(),
            hold,
            pending: config.marketo.request_timeout + hold,
            concurrency: limits.concurrency.get(),
            daily_quota: limits.daily_quota.get(),
            unsynced: Mutex::new(vec![0; services.len()]),
            batches: Mutex::new(Vec::new()),
            recent_slots: Mutex::new(std::collections::VecDeque::new()),
            to_release: Mutex::new(Vec::new()),
            marketo_day,
            clock_offset: AtomicI64::new(0),
            seen: Mutex::new(InstanceUse::default()),
            lost_at: Mutex::new(None),
            services,
            fallback_replicas: redis.fallback_replicas.get(),
            lease: redis.lease,
            // Until Redis has answered once, this replica keeps to its
            // share: it never starts on the full limits.
            up: AtomicBool::new(false),
            recovering: tokio::sync::Mutex::new(()),
            reconnecting: AtomicBool::new(false),
            fell_back: AtomicBool::new(false),
            recoveries: std::sync::atomic::AtomicU64::new(0),
            leases: Mutex::new(Leases::default()),
            replica: call_id(),
            lead: redis::Script::new(LEAD),
            epoch_script: redis::Script::new(EPOCH),
            epoch: Mutex::new(None),
            learned_version: AtomicI64::new(0),
            learn: redis::Script::new(LEARN),
            acquire: redis::Script::new(ACQUIRE),
            undo: redis::Script::new(UNDO),
            release: redis::Script::new(RELEASE),
            renew: redis::Script::new(RENEW),
            rescore: redis::Script::new(RESCORE),
            catch_up: redis::Script::new(CATCH_UP),
            reconcile: redis::Script::new(RECONCILE),
            mark_spent: redis::Script::new(MARK_SPENT),
            probe_after: limits.quota_probe_interval,
            metrics,
        });
        shared.metrics.backend_up.set(0);
        Ok(shared)
    }

    /// A client for `redis.url`: over TLS for `rediss://`, trusting the
    /// bundled webpki roots or `redis.ca_file`.
    fn client(redis: &RedisConfig) -> Result<redis::Client, SharedError> {
        let url = redis.url.expose();
        let unusable = |error: redis::RedisError| SharedError::Url(format!("{:?}", error.kind()));
        if !url.starts_with("rediss://") {
            return redis::Client::open(url).map_err(unusable);
        }
        // The redis crate builds its TLS settings with the process's
        // default provider; ring is the one this build carries.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let Some(path) = &redis.ca_file else {
            return redis::Client::open(url).map_err(unusable);
        };
        let root_cert = std::fs::read(path).map_err(|error| SharedError::Url(format!("ca_file: {error}")))?;
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        )
        .map_err(unusable)
    }

    /// How many replicas the limits are split between while Redis is
    /// unreachable.
    pub fn fallback_replicas(&self) -> u32 {
        self.fallback_replicas
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// `name` under the configured key prefix.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    fn service_key(&self, name: &str, service: usize) -> String {
        let field = self
            .services
            .get(service)
            .map_or("unknown", |limits| limits.name.as_str());
        format!("{}:{name}:{field}", self.prefix)
    }

    fn day_key(&self, day: NaiveDate) -> String {
        format!("{}:day:{day}", self.prefix)
    }

    /// A live connection, made on first use and after a failure.
    async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connected = tokio::time::timeout(REDIS_TIMEOUT, ConnectionManager::new(self.client.clone()))
            .await
            .map_err(|_| SharedError::Unreachable)?
            .map_err(|_| SharedError::Unreachable)?;
        *slot = Some(connected.clone());
        Ok(connected)
    }

    /// Runs one Redis call within [`REDIS_TIMEOUT`], on the connection
    /// every shared count uses.
    pub(crate) async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, SharedError> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) | Err(_) => Err(SharedError::Unreachable),
        }
    }

    /// Today by Redis's clock, in the quota's zone.
    pub fn day(&self) -> NaiveDate {
        let offset = chrono::Duration::milliseconds(self.clock_offset.load(Ordering::Relaxed));
        self.marketo_day.date_at(self.marketo_day.now() + offset)
    }

    /// The instance's window slots taken, as the last acquisition saw them.
    pub fn instance_window(&self) -> u32 {
        lock(&self.seen).window
    }

    /// Asks Redis for a call of `service`, admitted here with `permit`.
    pub async fn acquire(
        self: &Arc<Self>,
        service: usize,
        permit: &Permit,
        admission: &Arc<Admission>,
    ) -> Grant {
        let day = self.day();
        if !self.is_up() {
            // Admitted under the shared limits and granted nothing there:
            // the share did not count it, so it is admitted again under it.
            if permit.admitted_before_fallback() {
                return Grant::Readmit;
            }
            return self.local_lease(service);
        }
        let Some(limits) = self.services.get(service) else {
            return Grant::Refused(QuotaScope::Instance, None);
        };
        let id = call_id();
        // Released in the background if the answer never arrives here,
        // however this future ends.
        let mut asked = Asked {
            shared: Arc::clone(self),
            service,
            day,
            id: id.clone(),
            answered: false,
        };
        // Lower while Marketo's refusals or reports show calls from outside
        // the proxy.
        let (window_calls, concurrency) = admission.limits_left();
        let mut invocation = self.acquire.prepare_invoke();
        self.acquisition_keys(&mut invocation, service, day);
        invocation
            .arg(&id)
            .arg(self.window_calls.min(window_calls))
            .arg(millis(self.pending))
            .arg(self.concurrency.min(concurrency))
            .arg(millis(self.lease))
            .arg(limits.window_calls)
            .arg(limits.concurrency)
            .arg(self.daily_quota)
            .arg(&limits.field)
            .arg(limits.cap)
            .arg(DAY_TTL.as_secs())
            .arg(millis(self.probe_after))
            .arg(lock(&self.epoch).clone().unwrap_or_default());
        for (other, other_limits) in self.services.iter().enumerate() {
            if other != service && other_limits.reserved > 0 {
                invocation.arg(&other_limits.field).arg(other_limits.reserved);
            }
        }
        let Ok((granted, kind, wait_ms, window, in_flight, day_used, redis_now, learned)) = self
            .call::<(u8, String, u64, u32, u32, u64, i64, i64)>(&invocation)
            .await
        else {
            // Often only the connection broke (Redis restarted, a network
            // blip): try at once, so the fallback lasts as short as can be.
            self.reconnect_now(admission).await;
            return Grant::Readmit;
        };
        asked.answered = true;
        self.clock_offset.store(
            redis_now - self.marketo_day.now().timestamp_millis(),
            Ordering::Relaxed,
        );
        *lock(&self.seen) = InstanceUse {
            window,
            in_flight,
            day_used,
        };
        self.learned_changed(learned, admission).await;
        if kind == "lost" {
            // Write this replica's slots and leases again before anything
            // is counted on data that lacks them, then admit once more.
            tracing::warn!(
                "Redis lost the shared counts (restarted empty?): writing this replica's window slots and leases again"
            );
            self.reconnect_now(admission).await;
            return Grant::Readmit;
        }
        if granted == 1 {
            self.leases_mut().synced.insert((service, id.clone()), true);
            return Grant::Granted(Lease {
                shared: Arc::clone(self),
                service,
                id,
                stamped: false,
                probe: kind == "probe",
            });
        }
        match kind.as_str() {
            "quota" => Grant::Refused(QuotaScope::Instance, None),
            "spent" => Grant::Refused(QuotaScope::Instance, Some(Duration::from_millis(wait_ms))),
            "service_cap" => Grant::Refused(QuotaScope::ServiceCap, None),
            "reserved" => Grant::Refused(QuotaScope::Reserved, None),
            _ => Grant::Wait(Duration::from_millis(wait_ms).min(MAX_ASK_INTERVAL)),
        }
    }

    /// The keys an acquisition of `service` on `day` touches, in the order
    /// ACQUIRE and UNDO take them (UNDO ignores the last three).
    fn acquisition_keys(&self, invocation: &mut redis::ScriptInvocation<'_>, service: usize, day: NaiveDate) {
        invocation
            .key(self.key("window"))
            .key(self.key("inflight"))
            .key(self.service_key("window", service))
            .key(self.service_key("inflight", service))
            .key(self.day_key(day))
            .key(self.key("done"))
            .key(self.key("epoch"))
            .key(self.key("settling"))
            .key(self.key("learned"));
    }

    /// Marketo refused a call for its window or concurrency: counts the
    /// refusal with every replica's, as its error report does, shares what
    /// it taught this replica (see [`super::learn`]) and takes what the
    /// others learned meanwhile.
    pub async fn refused(&self, admission: &Arc<Admission>) {
        if !self.is_up() {
            return;
        }
        let mut invocation = self.learn.prepare_invoke();
        invocation
            .key(self.key("learned"))
            .key(self.day_key(admission.day()));
        for episode in admission.learned_episodes() {
            match episode {
                Some(episode) => invocation
                    .arg(episode.floor)
                    .arg(self.redis_millis(episode.lowered_at))
                    .arg(millis(episode.hold)),
                None => invocation.arg(0).arg(0).arg(0),
            };
        }
        invocation.arg(millis(LEARNED_TTL)).arg(DAY_TTL.as_secs());
        if let Ok(fields) = self.call::<HashMap<String, i64>>(&invocation).await {
            self.adopt_learned(admission, &fields);
        }
    }

    /// Fetches the learned limits when their version is not the one this
    /// replica took last: another replica learned from Marketo's refusals.
    async fn learned_changed(&self, version: i64, admission: &Arc<Admission>) {
        if self.learned_version.swap(version, Ordering::AcqRel) != version {
            self.fetch_learned(admission).await;
        }
    }

    /// Takes the learned limits another replica shared.
    async fn fetch_learned(&self, admission: &Arc<Admission>) {
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        let read = connection.hgetall::<_, HashMap<String, i64>>(self.key("learned"));
        if let Ok(Ok(fields)) = tokio::time::timeout(REDIS_TIMEOUT, read).await {
            self.adopt_learned(admission, &fields);
        }
    }

    fn adopt_learned(&self, admission: &Arc<Admission>, fields: &HashMap<String, i64>) {
        if let Some(version) = fields.get("version") {
            self.learned_version.store(*version, Ordering::Release);
        }
        let field = |kind: &str, name: &str| fields.get(&format!("{kind}_{name}")).copied();
        let episode = |kind: &str| {
            Some(Episode {
                floor: u32::try_from(field(kind, "floor")?).ok()?,
                lowered_at: self.instant_of(field(kind, "at")?),
                hold: Duration::from_millis(u64::try_from(field(kind, "hold")?).ok()?),
            })
        };
        admission.adopt_learned([episode("window"), episode("concurrency")]);
    }

    /// `at` by Redis's clock, in milliseconds.
    fn redis_millis(&self, at: Instant) -> i64 {
        let ago = i64::try_from(Instant::now().saturating_duration_since(at).as_millis()).unwrap_or(i64::MAX);
        self.marketo_day.now().timestamp_millis() + self.clock_offset.load(Ordering::Relaxed) - ago
    }

    /// The moment Redis's clock read `millis` (now, for a later one).
    fn instant_of(&self, millis: i64) -> Instant {
        let redis_now = self.marketo_day.now().timestamp_millis() + self.clock_offset.load(Ordering::Relaxed);
        let ago = Duration::from_millis(u64::try_from(redis_now - millis).unwrap_or(0));
        Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
    }

    /// Gives back what the acquisition `id` took, if it ran; tried again
    /// when Redis is back if it cannot be done now.
    async fn release_unanswered(&self, service: usize, day: NaiveDate, id: String) {
        if self.undo_acquisition(service, day, &id).await.is_err() {
            let mut to_release = lock(&self.to_release);
            if to_release.len() < MAX_TO_RELEASE {
                to_release.push((service, day, id));
            }
        }
    }

    async fn undo_acquisition(&self, service: usize, day: NaiveDate, id: &str) -> Result<(), SharedError> {
        let mut invocation = self.undo.prepare_invoke();
        self.acquisition_keys(&mut invocation, service, day);
        invocation
            .arg(id)
            .arg(self.field(service))
            .arg(millis(self.tombstone()));
        self.call::<u8>(&invocation).await.map(drop)
    }

    /// A lease of this replica's own while Redis is unreachable.
    fn local_lease(self: &Arc<Self>, service: usize) -> Grant {
        let id = call_id();
        {
            let mut leases = self.leases_mut();
            if leases.catching_up || self.reconnecting.load(Ordering::Acquire) {
                return Grant::Wait(Duration::from_millis(50));
            }
            leases.synced.insert((service, id.clone()), false);
        }
        self.count_unsynced(service);
        Grant::Granted(Lease {
            shared: Arc::clone(self),
            service,
            id,
            stamped: false,
            probe: false,
        })
    }

    fn is_synced(&self, service: usize, id: &str) -> bool {
        self.leases_mut()
            .synced
            .get(&(service, id.to_owned()))
            .copied()
            .unwrap_or(true)
    }

    /// A call was answered (or is over): its window slot runs from now.
    fn hold_recent_slot(&self, id: &str, earlier: Duration) {
        let now = Instant::now();
        let mut slots = lock(&self.recent_slots);
        while slots.front().is_some_and(|(_, frees_at)| *frees_at <= now) {
            slots.pop_front();
        }
        slots.push_back((id.to_owned(), now + self.hold.saturating_sub(earlier)));
    }

    fn leases_mut(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count_unsynced(&self, service: usize) {
        let mut unsynced = self
            .unsynced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = unsynced.get_mut(service) {
            *count += 1;
        }
    }

    /// Redis is gone: enforce this replica's part of what the instance
    /// had left alone.
    fn fall_back(&self, admission: &Arc<Admission>) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.fell_back.store(true, Ordering::Release);
            tracing::warn!(
                replicas = self.fallback_replicas,
                "Redis is unreachable: enforcing 1/{} of what the instance has left here until it is back",
                self.fallback_replicas
            );
            self.metrics.backend_up.set(0);
            *lock(&self.lost_at) = Some(Instant::now());
            let granted = u32::try_from(self.leases_mut().synced.len()).unwrap_or(u32::MAX);
            admission.share_what_is_left(self.fallback_replicas, *lock(&self.seen), granted);
        }
    }

    /// Once every call the others had made before Redis was lost has
    /// surely freed its slot and lease, this replica's share is a plain
    /// `1 / fallback_replicas` of the limits.
    fn settle_share(&self, admission: &Arc<Admission>) {
        let mut lost_at = lock(&self.lost_at);
        if lost_at.is_some_and(|at| at.elapsed() >= self.pending) {
            *lost_at = None;
            admission.set_share(self.fallback_replicas);
        }
    }

    /// Marketo said 607: no replica calls before the probe time.
    pub async fn mark_spent(&self) {
        let day = self.day();
        let mut invocation = self.mark_spent.prepare_invoke();
        invocation
            .key(self.day_key(day))
            .arg(millis(self.probe_after))
            .arg(DAY_TTL.as_secs());
        let _ = self.call::<u8>(&invocation).await;
    }

    /// A call went through after Marketo's 607: the day is not spent.
    pub async fn confirm_available(&self) {
        let day = self.day();
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        let _ = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("HDEL")
                .arg(self.day_key(day))
                .arg("spent")
                .query_async::<()>(&mut connection),
        )
        .await;
    }

    /// Marketo's count of today's calls, shared with every replica.
    /// Answers today's calls from outside the proxy and the replicas'
    /// calls Marketo refused today, unless Redis cannot say.
    pub async fn reconcile(&self, day: NaiveDate, marketo_total: u64) -> Option<(u64, u64)> {
        let mut invocation = self.reconcile.prepare_invoke();
        invocation
            .key(self.day_key(day))
            .arg(marketo_total)
            .arg(DAY_TTL.as_secs());
        self.call::<(u64, u64)>(&invocation).await.ok()
    }

    /// Whether this replica reads Marketo's usage report for every
    /// replica: it holds the lock (for `hold` more), or just took it from
    /// nobody. `None` while Redis cannot say.
    pub async fn lead_reconciliation(&self, hold: Duration) -> Option<bool> {
        let mut invocation = self.lead.prepare_invoke();
        invocation
            .key(self.key("reconciler"))
            .arg(&self.replica)
            .arg(millis(hold));
        self.call::<u8>(&invocation).await.ok().map(|led| led == 1)
    }

    /// Marketo's usage report as the reconciler read it, for the others,
    /// kept for `keep`.
    pub async fn publish_usage(&self, usage: &crate::marketo::MarketoUsage, keep: Duration) {
        let (Ok(text), Ok(mut connection)) = (serde_json::to_string(usage), self.connection().await) else {
            return;
        };
        let _ = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("SET")
                .arg(self.key("usage"))
                .arg(text)
                .arg("PX")
                .arg(millis(keep))
                .query_async::<()>(&mut connection),
        )
        .await;
    }

    /// The usage report the reconciler last published, if any.
    pub async fn published_usage(&self) -> Option<crate::marketo::MarketoUsage> {
        let mut connection = self.connection().await.ok()?;
        let text = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("GET")
                .arg(self.key("usage"))
                .query_async::<Option<String>>(&mut connection),
        )
        .await
        .ok()?
        .ok()??;
        serde_json::from_str(&text).ok()
    }

    async fn stamp(&self, service: usize, id: &str, earlier: Duration) {
        let mut invocation = self.rescore.prepare_invoke();
        invocation.key(self.key("window"));
        if self
            .services
            .get(service)
            .is_some_and(|limits| limits.window_calls > 0)
        {
            invocation.key(self.service_key("window", service));
        }
        invocation.arg(id).arg(millis(self.hold.saturating_sub(earlier)));
        let _ = self.call::<u8>(&invocation).await;
    }

    async fn release(&self, service: usize, id: &str) {
        let mut invocation = self.release.prepare_invoke();
        invocation
            .key(self.key("inflight"))
            .key(self.service_key("inflight", service))
            .key(self.key("done"))
            .arg(id)
            .arg(millis(self.tombstone()));
        let _ = self.call::<u8>(&invocation).await;
    }

    /// How long a finished or given-up call's id is remembered: longer
    /// than any renewal or acquisition still on its way can take.
    fn tombstone(&self) -> Duration {
        (self.lease * 2).max(Duration::from_secs(60))
    }

    fn field(&self, service: usize) -> &str {
        self.services
            .get(service)
            .map_or("service:unknown", |limits| limits.field.as_str())
    }

    /// Renews this replica's leases and, while Redis is unreachable, tries
    /// it again; back in touch, writes what was done meanwhile and returns
    /// to the shared limits. Runs while it is polled.
    pub fn maintenance(
        self: &Arc<Self>,
        admission: Arc<Admission>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(self);
        async move {
            let mut since_renewal = Duration::ZERO;
            let tick = RETRY_EVERY.min(shared.lease / 3);
            loop {
                if !shared.is_up() {
                    shared.recover(&admission).await;
                    if !shared.is_up() {
                        shared.settle_share(&admission);
                    }
                    tokio::time::sleep(RETRY_EVERY).await;
                    continue;
                }
                tokio::time::sleep(tick).await;
                match shared.same_data(&admission).await {
                    Err(_) => {
                        shared.reconnect_now(&admission).await;
                        continue;
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            "Redis lost the shared counts (restarted empty?): writing this replica's window slots and leases again"
                        );
                        shared.reconnect_now(&admission).await;
                        since_renewal = shared.lease;
                    }
                }
                since_renewal += tick;
                if since_renewal >= shared.lease / 3 {
                    since_renewal = Duration::ZERO;
                    if shared.renew_leases().await.is_err() {
                        shared.fall_back(&admission);
                    }
                }
            }
        }
    }

    /// Makes Redis grant nothing for [`SETTLE`], unless it already holds
    /// acquisitions.
    async fn hold_acquisitions(&self) -> Result<(), SharedError> {
        let mut connection = self.connection().await?;
        let mut hold = redis::cmd("SET");
        hold.arg(self.key("settling"))
            .arg(1)
            .arg("PX")
            .arg(millis(SETTLE))
            .arg("NX");
        match tokio::time::timeout(REDIS_TIMEOUT, hold.query_async::<Option<String>>(&mut connection)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(SharedError::Unreachable),
        }
    }

    /// Whether Redis still holds the data this replica saw there (`true`
    /// the first time it looks). Takes what other replicas learned since
    /// the last look.
    async fn same_data(&self, admission: &Arc<Admission>) -> Result<bool, SharedError> {
        let mut invocation = self.epoch_script.prepare_invoke();
        invocation
            .key(self.key("epoch"))
            .key(self.key("settling"))
            .key(self.key("learned"))
            .arg(call_id())
            .arg(millis(SETTLE));
        let (epoch, learned) = self.call::<(String, i64)>(&invocation).await?;
        self.learned_changed(learned, admission).await;
        let mut known = lock(&self.epoch);
        let same = known.as_ref().is_none_or(|known| *known == epoch);
        *known = Some(epoch);
        Ok(same)
    }

    async fn renew_leases(&self) -> Result<(), SharedError> {
        let leases: Vec<(usize, String)> = self
            .leases_mut()
            .synced
            .iter()
            .filter(|(_, synced)| **synced)
            .map(|(lease, _)| lease.clone())
            .collect();
        for (service, id) in leases {
            let mut invocation = self.renew.prepare_invoke();
            invocation
                .key(self.key("inflight"))
                .key(self.service_key("inflight", service))
                .key(self.key("done"))
                .arg(&id)
                .arg(millis(self.lease));
            self.call::<u8>(&invocation).await?;
        }
        Ok(())
    }

    /// Contacts Redis once, before the first request is served, so that a
    /// replica starts on the shared limits when Redis is there.
    pub async fn connect(&self, admission: &Arc<Admission>) {
        self.try_recover(admission).await;
        if !self.is_up() {
            tracing::warn!(
                "Redis is unreachable: enforcing 1/{} of the instance's limits here until it answers",
                self.fallback_replicas
            );
        }
    }

    /// Redis failed just now, or lost its data: one attempt at once to
    /// get back in touch, during which no call starts on this replica's
    /// own share (what it knows of the others may be out of date); if it
    /// fails, the share holds until Redis answers.
    async fn reconnect_now(&self, admission: &Arc<Admission>) {
        self.reconnecting.store(true, Ordering::Release);
        self.fall_back(admission);
        self.recover(admission).await;
        self.reconnecting.store(false, Ordering::Release);
    }

    /// Gets back in touch with Redis, one attempt at a time; callers that
    /// waited for another's attempt take its result.
    async fn recover(&self, admission: &Arc<Admission>) {
        let seen = self.recoveries.load(Ordering::Acquire);
        let _attempt = self.recovering.lock().await;
        if self.is_up() || self.recoveries.load(Ordering::Acquire) != seen {
            return;
        }
        self.try_recover(admission).await;
        self.recoveries.fetch_add(1, Ordering::AcqRel);
    }

    async fn try_recover(&self, admission: &Arc<Admission>) {
        // A new connection, not the one that failed, and an answer to PING
        // before anything waits on the catch-up.
        *self.connection.lock().await = None;
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        let ping = redis::cmd("PING");
        let answered = tokio::time::timeout(REDIS_TIMEOUT, ping.query_async::<String>(&mut connection)).await;
        if !matches!(answered, Ok(Ok(_))) {
            return;
        }
        // The mark of the data this replica now writes into: a later change
        // means Redis lost it.
        *lock(&self.epoch) = None;
        if self.same_data(admission).await.is_err() {
            return;
        }
        // Back after an outage that outlasted the attempt made at once: the
        // others are likely back on their shares too, with calls Redis
        // does not know until their next attempt. Nothing is granted
        // before they had time to write them.
        if self.fell_back.load(Ordering::Acquire)
            && !self.reconnecting.load(Ordering::Acquire)
            && self.hold_acquisitions().await.is_err()
        {
            return;
        }
        // Acquisitions whose answers were lost while it was going: give
        // back what they took before anything else.
        let to_release = std::mem::take(&mut *lock(&self.to_release));
        for (index, (service, day, id)) in to_release.iter().enumerate() {
            if self.undo_acquisition(*service, *day, id).await.is_err() {
                lock(&self.to_release).extend_from_slice(&to_release[index..]);
                return;
            }
        }
        let day = self.day();
        // This replica's answered calls whose slots still run, and its calls
        // in flight, by id: Redis may have come back empty, or not have
        // seen them.
        let now = Instant::now();
        let slots: Vec<(String, Duration)> = lock(&self.recent_slots)
            .iter()
            .filter(|(_, frees_at)| *frees_at > now)
            .map(|(id, frees_at)| (id.clone(), *frees_at - now))
            .collect();
        let live: Vec<(usize, String)> = {
            let mut leases = self.leases_mut();
            leases.catching_up = true;
            leases.synced.keys().cloned().collect()
        };
        // The day's calls made meanwhile, in batches Redis counts once.
        let batches = {
            let counts = std::mem::replace(&mut *lock(&self.unsynced), vec![0; self.services.len()]);
            let mut batches = lock(&self.batches);
            if counts.iter().any(|calls| *calls > 0) {
                batches.push((call_id(), counts));
            }
            batches.clone()
        };
        let mut invocation = self.catch_up.prepare_invoke();
        invocation
            .key(self.key("window"))
            .key(self.key("inflight"))
            .key(self.day_key(day))
            .key(self.key("batches"))
            .key(self.key("done"))
            .arg(millis(self.pending))
            .arg(millis(self.lease))
            .arg(slots.len());
        for (id, left) in &slots {
            invocation.arg(id).arg(millis(*left));
        }
        invocation.arg(live.len());
        for (_, id) in &live {
            invocation.arg(id);
        }
        for (batch, counts) in &batches {
            let fields: Vec<(&str, u64)> = self
                .services
                .iter()
                .zip(counts)
                .filter(|(_, calls)| **calls > 0)
                .map(|(limits, calls)| (limits.field.as_str(), *calls))
                .collect();
            invocation.arg(batch).arg(fields.len());
            for (field, calls) in fields {
                invocation.arg(field).arg(calls);
            }
        }
        if self.call::<u8>(&invocation).await.is_err() {
            self.leases_mut().catching_up = false;
            return;
        }
        lock(&self.batches).retain(|(batch, _)| !batches.iter().any(|(sent, _)| sent == batch));
        self.up.store(true, Ordering::Release);
        let mut over = Vec::new();
        {
            let mut leases = self.leases_mut();
            for lease in &live {
                match leases.synced.get_mut(lease) {
                    Some(synced) => *synced = true,
                    None => over.push(lease),
                }
            }
            leases.catching_up = false;
        }
        // Calls answered or over while the catch-up was on its way were
        // written as still running: their slots start their countdown now
        // and the leases of those over go.
        let answered: Vec<&(usize, String)> = {
            let recent = lock(&self.recent_slots);
            live.iter()
                .filter(|(_, id)| {
                    recent.iter().any(|(answered, _)| answered == id)
                        && !slots.iter().any(|(written, _)| written == id)
                })
                .collect()
        };
        *lock(&self.lost_at) = None;
        self.fell_back.store(false, Ordering::Release);
        self.metrics.backend_up.set(1);
        admission.set_share(1);
        tracing::info!("Redis answers: the instance's limits are shared with the other replicas");
        for (service, id) in answered {
            self.stamp(*service, id, Duration::ZERO).await;
        }
        for (service, id) in over {
            self.release(*service, id).await;
        }
    }
}

/// An acquisition on its way: unless its answer arrives, what it may have
/// taken is released in the background, however the asking ends.
struct Asked {
    shared: Arc<SharedLimits>,
    service: usize,
    day: NaiveDate,
    id: String,
    answered: bool,
}

impl Drop for Asked {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let (service, day, id) = (self.service, self.day, std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { shared.release_unanswered(service, day, id).await });
            }
            Err(_) => lock(&shared.to_release).push((service, day, id)),
        }
    }
}

/// A call's hold on the shared limits: its window slot is stamped when
/// the answer arrives, its concurrency lease released when it is dropped.
pub struct Lease {
    shared: Arc<SharedLimits>,
    service: usize,
    id: String,
    stamped: bool,
    /// The call that probes, for every replica, whether Marketo's day is
    /// spent after its 607.
    probe: bool,
}

impl Lease {
    /// Whether this call probes Marketo's day for every replica.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Marketo answered: the shared window slot starts its countdown (in
    /// Redis, or here until Redis hears of it).
    /// `earlier` than now, Marketo took the call at the latest.
    pub async fn answered(&mut self, earlier: Duration) {
        if !self.stamped {
            self.stamped = true;
            self.shared.hold_recent_slot(&self.id, earlier);
            if self.shared.is_synced(self.service, &self.id) {
                self.shared.stamp(self.service, &self.id, earlier).await;
            }
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("service", &self.service)
            .field("stamped", &self.stamped)
            .finish_non_exhaustive()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let shared = Arc::clone(&self.shared);
        let (service, id, stamped) = (self.service, std::mem::take(&mut self.id), self.stamped);
        let synced = shared.leases_mut().synced.remove(&(service, id.clone()));
        if !stamped {
            shared.hold_recent_slot(&id, Duration::ZERO);
        }
        if synced == Some(false) {
            // Redis never saw this call: its slot is written with the
            // catch-up, its lease needs no release.
            return;
        }
        if !shared.is_up() {
            // The lease lapses on its own, and the slot with it.
            return;
        }
        // Off the request path; without a runtime (shutdown) the lease
        // simply lapses.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if !stamped {
                    shared.stamp(service, &id, Duration::ZERO).await;
                }
                shared.release(service, &id).await;
            });
        }
    }
}

/// A service's field in the day hash. Service names hold no `:`, so no
/// service's field can be one of the hash's own (`total`, `foreign`,
/// `refused`, `spent`).
fn day_field(service: &str) -> String {
    format!("service:{service}")
}

/// An id unique across replicas.
pub(crate) fn call_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_is_redis_days_in_the_quotas_zone() {
        let yaml = "marketo: { base_url: 'http://127.0.0.1:1', client_id: id, client_secret: secret }\n\
                    limits: { timezone: Pacific/Kiritimati }\n\
                    services: [{ name: a, api_key: key-a-0123456789abcdef }]\n\
                    state: { backend: redis, file: ~, redis: { url: 'redis://127.0.0.1:1' } }\n";
        let config = Config::from_yaml_with_env(yaml, |_| None).expect("config");
        let redis = config.state.redis.as_ref().expect("redis settings");
        let marketo_day = MarketoDay::new(config.limits.timezone);
        let shared =
            SharedLimits::new(&config, redis, Metrics::new(), marketo_day.clone()).expect("shared limits");
        let here = marketo_day.today();
        assert_eq!(shared.day(), here);
        // Redis's clock is a day ahead of this replica's.
        shared.clock_offset.store(24 * 3600 * 1000, Ordering::Relaxed);
        assert_eq!(shared.day(), here.succ_opt().expect("tomorrow"));
    }
}
