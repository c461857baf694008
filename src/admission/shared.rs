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
//! Scripts read the time with Redis `TIME`, so replica clocks do not matter.
//!
//! When Redis cannot be reached a replica falls back to
//! `limits / fallback_replicas` on its own (never the full limits), says
//! so in `marketo_proxy_backend_up` and the log, and keeps trying. Back in
//! touch, it first writes what it did meanwhile (its window slots and the
//! day's calls) so the others see it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use redis::aio::ConnectionManager;

use super::Admission;
use super::quota::QuotaScope;
use crate::config::{Config, INTERNAL_SERVICE, RedisConfig};
use crate::metrics::Metrics;

/// How long a Redis call may take before Redis counts as unreachable.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often an unreachable Redis is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The longest a grant waits between two asks.
const MAX_ASK_INTERVAL: Duration = Duration::from_millis(500);
/// Day hashes outlive their day by this much.
const DAY_TTL: Duration = Duration::from_secs(3 * 24 * 3600);

/// Checks and takes a window slot, a concurrency lease and a unit of the
/// day's quota, or says which limit is in the way and for how long.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
for i = 1, 4 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) end
local function wait(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(1, tonumber(first[2]) - now) end
  return 1000
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {0, 'concurrency', 25} end
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[7]) then return {0, 'service_concurrency', 25} end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return {0, 'window', wait(KEYS[1])} end
local service_window = tonumber(ARGV[6])
if service_window > 0 and redis.call('ZCARD', KEYS[3]) >= service_window then
  return {0, 'service_window', wait(KEYS[3])}
end
local spent = tonumber(redis.call('HGET', KEYS[5], 'spent') or '0')
if spent > 0 and now < spent then return {0, 'spent', spent - now} end
local total = tonumber(redis.call('HGET', KEYS[5], 'total') or '0')
local foreign = tonumber(redis.call('HGET', KEYS[5], 'foreign') or '0')
local remaining = tonumber(ARGV[8]) - total - foreign
if remaining <= 0 then return {0, 'quota', 0} end
if tonumber(redis.call('HGET', KEYS[5], ARGV[9]) or '0') >= tonumber(ARGV[10]) then
  return {0, 'service_cap', 0}
end
local held = 0
for i = 13, #ARGV, 2 do
  local used = tonumber(redis.call('HGET', KEYS[5], ARGV[i]) or '0')
  held = held + math.max(0, tonumber(ARGV[i + 1]) - used)
end
if remaining <= held then return {0, 'reserved', 0} end
-- After Marketo's 607 this call is the probe: the others wait for it.
if spent > 0 then redis.call('HSET', KEYS[5], 'spent', now + tonumber(ARGV[12])) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), id)
if service_window > 0 then redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), id) end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), id)
redis.call('HINCRBY', KEYS[5], 'total', 1)
redis.call('HINCRBY', KEYS[5], ARGV[9], 1)
redis.call('EXPIRE', KEYS[5], tonumber(ARGV[11]))
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[3]) + 60000) end
if spent > 0 then return {1, 'probe', 0} end
return {1, 'ok', 0}
";

/// Moves a call's entries in sorted sets that hold it: its window slots
/// when the answer arrives (they free `window + margin` from now), or its
/// concurrency leases when they are renewed. ARGV: call id, ms from now.
const RESCORE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[2]), ARGV[1]) end
return 1
";

/// Writes what a replica did while Redis was unreachable: its answered
/// calls' window slots (milliseconds left on each), its calls still in
/// flight (window slot and concurrency lease), and the day's calls per
/// service. ARGV: pending ms, lease ms, n, n x ms left, m, m x call id,
/// then (service, calls) pairs.
const CATCH_UP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pending = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local i = 3
local slots = tonumber(ARGV[i])
for n = 1, slots do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[i + n]), 'catch-up:' .. now .. ':' .. n)
end
i = i + slots + 1
local live = tonumber(ARGV[i])
for n = 1, live do
  redis.call('ZADD', KEYS[1], now + pending, ARGV[i + n])
  redis.call('ZADD', KEYS[2], now + lease, ARGV[i + n])
end
i = i + live + 1
while i < #ARGV do
  redis.call('HINCRBY', KEYS[3], ARGV[i], tonumber(ARGV[i + 1]))
  redis.call('HINCRBY', KEYS[3], 'total', tonumber(ARGV[i + 1]))
  i = i + 2
end
redis.call('EXPIRE', KEYS[3], 259200)
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
/// replicas' calls came from outside.
const RECONCILE: &str = r"
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
local foreign = math.max(0, tonumber(ARGV[1]) - total)
local known = tonumber(redis.call('HGET', KEYS[1], 'foreign') or '0')
if foreign > known then redis.call('HSET', KEYS[1], 'foreign', foreign) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
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
    /// Leases of this replica's calls in flight.
    leases: Mutex<Leases>,
    /// Calls per service made while Redis was unreachable.
    unsynced: Mutex<Vec<u64>>,
    acquire: redis::Script,
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
    pub fn new(config: &Config, redis: &RedisConfig, metrics: Metrics) -> Result<Arc<Self>, SharedError> {
        // The URL may hold a password: the message says what kind of
        // problem, never the URL.
        let client = redis::Client::open(redis.url.expose())
            .map_err(|error| SharedError::Url(format!("{:?}", error.kind())))?;
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
            services,
            fallback_replicas: redis.fallback_replicas.get(),
            lease: redis.lease,
            // Until Redis has answered once, this replica keeps to its
            // share: it never starts on the full limits.
            up: AtomicBool::new(false),
            leases: Mutex::new(Leases::default()),
            acquire: redis::Script::new(ACQUIRE),
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

    /// How many replicas the limits are split between while Redis is
    /// unreachable.
    pub fn fallback_replicas(&self) -> u32 {
        self.fallback_replicas
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn key(&self, name: &str) -> String {
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

    /// Runs one Redis call within [`REDIS_TIMEOUT`].
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, SharedError> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) | Err(_) => Err(SharedError::Unreachable),
        }
    }

    /// Asks Redis for a call of `service` on `day`.
    pub async fn acquire(
        self: &Arc<Self>,
        service: usize,
        day: NaiveDate,
        admission: &Arc<Admission>,
    ) -> Grant {
        if !self.is_up() {
            return self.local_lease(service);
        }
        let Some(limits) = self.services.get(service) else {
            return Grant::Refused(QuotaScope::Instance, None);
        };
        let id = call_id();
        let mut invocation = self.acquire.prepare_invoke();
        invocation
            .key(self.key("window"))
            .key(self.key("inflight"))
            .key(self.service_key("window", service))
            .key(self.service_key("inflight", service))
            .key(self.day_key(day))
            .arg(&id)
            .arg(self.window_calls)
            .arg(millis(self.pending))
            .arg(self.concurrency)
            .arg(millis(self.lease))
            .arg(limits.window_calls)
            .arg(limits.concurrency)
            .arg(self.daily_quota)
            .arg(&limits.field)
            .arg(limits.cap)
            .arg(DAY_TTL.as_secs())
            .arg(millis(self.probe_after));
        for (other, other_limits) in self.services.iter().enumerate() {
            if other != service && other_limits.reserved > 0 {
                invocation.arg(&other_limits.field).arg(other_limits.reserved);
            }
        }
        match self.call::<(u8, String, u64)>(&invocation).await {
            Ok((1, kind, _)) => {
                self.leases_mut().synced.insert((service, id.clone()), true);
                Grant::Granted(Lease {
                    shared: Arc::clone(self),
                    service,
                    id,
                    stamped: false,
                    probe: kind == "probe",
                })
            }
            Ok((_, limit, wait_ms)) => match limit.as_str() {
                "quota" => Grant::Refused(QuotaScope::Instance, None),
                "spent" => Grant::Refused(QuotaScope::Instance, Some(Duration::from_millis(wait_ms))),
                "service_cap" => Grant::Refused(QuotaScope::ServiceCap, None),
                "reserved" => Grant::Refused(QuotaScope::Reserved, None),
                _ => Grant::Wait(Duration::from_millis(wait_ms).min(MAX_ASK_INTERVAL)),
            },
            Err(_) => {
                self.fall_back(admission);
                Grant::Readmit
            }
        }
    }

    /// A lease of this replica's own while Redis is unreachable.
    fn local_lease(self: &Arc<Self>, service: usize) -> Grant {
        let id = call_id();
        {
            let mut leases = self.leases_mut();
            if leases.catching_up {
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

    /// Redis is gone: enforce this replica's share of the limits alone.
    fn fall_back(&self, admission: &Arc<Admission>) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                replicas = self.fallback_replicas,
                "Redis is unreachable: enforcing 1/{} of the instance's limits here until it is back",
                self.fallback_replicas
            );
            self.metrics.backend_up.set(0);
            admission.set_share(self.fallback_replicas);
        }
    }

    /// Marketo said 607: no replica calls before the probe time.
    pub async fn mark_spent(&self, day: NaiveDate) {
        let mut invocation = self.mark_spent.prepare_invoke();
        invocation
            .key(self.day_key(day))
            .arg(millis(self.probe_after))
            .arg(DAY_TTL.as_secs());
        let _ = self.call::<u8>(&invocation).await;
    }

    /// A call went through after Marketo's 607: the day is not spent.
    pub async fn confirm_available(&self, day: NaiveDate) {
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
    pub async fn reconcile(&self, day: NaiveDate, marketo_total: u64) {
        let mut invocation = self.reconcile.prepare_invoke();
        invocation
            .key(self.day_key(day))
            .arg(marketo_total)
            .arg(DAY_TTL.as_secs());
        let _ = self.call::<u8>(&invocation).await;
    }

    async fn stamp(&self, service: usize, id: &str) {
        let mut invocation = self.rescore.prepare_invoke();
        invocation.key(self.key("window"));
        if self
            .services
            .get(service)
            .is_some_and(|limits| limits.window_calls > 0)
        {
            invocation.key(self.service_key("window", service));
        }
        invocation.arg(id).arg(millis(self.hold));
        let _ = self.call::<u8>(&invocation).await;
    }

    async fn release(&self, service: usize, id: &str) {
        let Ok(mut connection) = self.connection().await else {
            return;
        };
        let _ = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::pipe()
                .zrem(self.key("inflight"), id)
                .zrem(self.service_key("inflight", service), id)
                .query_async::<()>(&mut connection),
        )
        .await;
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
                    shared.try_recover(&admission).await;
                    tokio::time::sleep(RETRY_EVERY).await;
                    continue;
                }
                tokio::time::sleep(tick).await;
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

    async fn renew_leases(&self) -> Result<(), SharedError> {
        let leases: Vec<(usize, String)> = self
            .leases_mut()
            .synced
            .iter()
            .filter(|(_, synced)| **synced)
            .map(|(lease, _)| lease.clone())
            .collect();
        for (service, id) in leases {
            let mut invocation = self.rescore.prepare_invoke();
            invocation
                .key(self.key("inflight"))
                .key(self.service_key("inflight", service))
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
        let day = admission.day();
        // Every answered call of this replica still holding its window
        // slot (some may be in Redis already: counting them twice only
        // errs on the safe side) and every call in flight that Redis has
        // not seen.
        let (left, _) = admission.window_taken();
        let live: Vec<(usize, String)> = {
            let mut leases = self.leases_mut();
            leases.catching_up = true;
            leases
                .synced
                .iter()
                .filter(|(_, synced)| !**synced)
                .map(|(lease, _)| lease.clone())
                .collect()
        };
        let unsynced = self
            .unsynced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut invocation = self.catch_up.prepare_invoke();
        invocation
            .key(self.key("window"))
            .key(self.key("inflight"))
            .key(self.day_key(day))
            .arg(millis(self.pending))
            .arg(millis(self.lease))
            .arg(left.len());
        for remaining in &left {
            invocation.arg(millis(*remaining));
        }
        invocation.arg(live.len());
        for (_, id) in &live {
            invocation.arg(id);
        }
        for (limits, calls) in self.services.iter().zip(&unsynced) {
            if *calls > 0 {
                invocation.arg(&limits.field).arg(*calls);
            }
        }
        let written = self.call::<u8>(&invocation).await.is_ok();
        if !written {
            self.leases_mut().catching_up = false;
            return;
        }
        {
            let mut counts = self
                .unsynced
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (count, written) in counts.iter_mut().zip(&unsynced) {
                *count = count.saturating_sub(*written);
            }
            drop(counts);
            self.up.store(true, Ordering::Release);
            let mut leases = self.leases_mut();
            for lease in live {
                if let Some(synced) = leases.synced.get_mut(&lease) {
                    *synced = true;
                }
            }
            leases.catching_up = false;
        }
        self.metrics.backend_up.set(1);
        admission.set_share(1);
        tracing::info!("Redis answers: the instance's limits are shared with the other replicas");
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

    /// Marketo answered: the shared window slot starts its countdown.
    pub async fn answered(&mut self) {
        if !self.stamped {
            self.stamped = true;
            self.shared.stamp(self.service, &self.id).await;
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
        shared.leases_mut().synced.remove(&(service, id.clone()));
        if !shared.is_up() {
            // Redis is unreachable; a lease it never saw needs no release.
            return;
        }
        // Off the request path; without a runtime (shutdown) the lease
        // simply lapses.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if !stamped {
                    shared.stamp(service, &id).await;
                }
                shared.release(service, &id).await;
            });
        }
    }
}

/// A service's field in the day hash. Service names hold no `:`, so no
/// service's field can be one of the hash's own (`total`, `foreign`,
/// `spent`).
fn day_field(service: &str) -> String {
    format!("service:{service}")
}

fn call_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
