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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;

use tokio::time::Instant;

use super::learn::Episode;
use super::quota::QuotaScope;
use super::{Admission, InstanceUse, Permit};
use crate::config::{Config, INTERNAL_SERVICE, RedisConfig};
use crate::limits::backend::{Backend, InMemory, RedisClient};
use crate::limits::day::MarketoDay;
use crate::limits::redis::scripts::{self, Verdict, millis};
use crate::metrics::Metrics;
use crate::tasks::Tasks;

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

mod lease;
mod recovery;
mod seen;

pub use crate::limits::redis::SharedError;
pub use lease::Lease;
use lease::{AcquisitionKeys, Asked};
use seen::Seen;

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
    QuotaSpent(QuotaScope, Option<Duration>),
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
    /// Where the shared state lives: Redis, or memory in tests.
    backend: Backend,
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
    /// batch, by the day they count to.
    unsynced: Mutex<BTreeMap<NaiveDate, Vec<u64>>>,
    /// Batches of those counts on their way to Redis: (batch id, day,
    /// calls per service), sent again until Redis has taken them.
    batches: Mutex<Vec<(String, NaiveDate, Vec<u64>)>>,
    /// This replica's answered calls whose window slots still run: their
    /// ids and when they free, in that order. Written to Redis again by id
    /// after an outage: a Redis that kept them gets the same entries, one
    /// that came back empty learns them again.
    recent_slots: Mutex<std::collections::VecDeque<(String, Instant)>>,
    /// Acquisitions whose answer was lost, still to be released.
    to_release: Mutex<Vec<(usize, NaiveDate, String)>>,
    /// Marketo's day, read by Redis's clock.
    marketo_day: MarketoDay,
    /// Where releases run, off the request path.
    tasks: Tasks,
    /// Redis's clock minus this replica's, in milliseconds, as of the
    /// last acquisition.
    clock_offset: AtomicI64,
    /// The whole instance's use as Redis last reported it.
    seen: Mutex<Seen>,
    /// When Redis was lost, until this replica's share no longer needs to
    /// leave room for what the others held then.
    lost_at: Mutex<Option<Instant>>,
    /// The mark of Redis's data as this replica last saw it.
    epoch: Mutex<Option<String>>,
    /// The version of the learned limits this replica last took.
    learned_version: AtomicI64,
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
        tasks: Tasks,
    ) -> Result<Arc<Self>, SharedError> {
        // The URL may hold a password: the message says what kind of
        // problem, never the URL.
        let backend = Backend::redis(RedisClient::open(redis, metrics.clone())?);
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
            backend,
            prefix: format!("{{{}}}", redis.key_prefix),
            window_calls: limits.window_calls.get(),
            hold,
            pending: config.marketo.request_timeout + hold,
            concurrency: limits.concurrency.get(),
            daily_quota: limits.daily_quota.get(),
            unsynced: Mutex::new(BTreeMap::new()),
            batches: Mutex::new(Vec::new()),
            recent_slots: Mutex::new(std::collections::VecDeque::new()),
            to_release: Mutex::new(Vec::new()),
            marketo_day,
            tasks,
            clock_offset: AtomicI64::new(0),
            seen: Mutex::new(Seen::default()),
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
            epoch: Mutex::new(None),
            learned_version: AtomicI64::new(0),
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

    /// Runs one operation on the shared state.
    pub(crate) async fn run<A: InMemory>(&self, keys: &[&str], args: &A) -> Result<A::Reply, SharedError> {
        self.backend.run(keys, args).await
    }

    /// Today by Redis's clock, in the quota's zone.
    pub fn day(&self) -> NaiveDate {
        let offset = chrono::Duration::milliseconds(self.clock_offset.load(Ordering::Relaxed));
        self.marketo_day.date_at(self.marketo_day.now() + offset)
    }

    /// The instance's window slots taken, as the last acquisition saw them.
    pub fn instance_window(&self) -> u32 {
        lock(&self.seen).instance.window
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
            return Grant::QuotaSpent(QuotaScope::Instance, None);
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
        let epoch = lock(&self.epoch).clone().unwrap_or_default();
        let args = scripts::Acquire {
            id: &id,
            window_calls: self.window_calls.min(window_calls),
            concurrency: self.concurrency.min(concurrency),
            pending_ms: millis(self.pending),
            lease_ms: millis(self.lease),
            service_window_calls: limits.window_calls,
            service_concurrency: limits.concurrency,
            daily_quota: self.daily_quota,
            field: &limits.field,
            cap: limits.cap,
            day_ttl_s: DAY_TTL.as_secs(),
            probe_after_ms: millis(self.probe_after),
            epoch: &epoch,
            reserves: self
                .services
                .iter()
                .enumerate()
                .filter(|(other, other_limits)| *other != service && other_limits.reserved > 0)
                .map(|(_, other_limits)| (other_limits.field.as_str(), other_limits.reserved))
                .collect(),
        };
        let acquired = match self.run(&self.acquisition_keys(service, day).each(), &args).await {
            Ok(acquired) => acquired,
            Err(error) if error.is_unreachable() => {
                // Often only the connection broke (Redis restarted, a
                // network blip): try at once, so the fallback lasts as
                // short as can be.
                self.reconnect_now(admission).await;
                return Grant::Readmit;
            }
            // A bug, counted and logged: the call asks again, and no
            // fallback hides it.
            Err(_) => return Grant::Wait(MAX_ASK_INTERVAL),
        };
        asked.answered = true;
        self.clock_offset.store(
            acquired.redis_now - self.marketo_day.now().timestamp_millis(),
            Ordering::Relaxed,
        );
        lock(&self.seen).update(&acquired, Instant::now());
        self.learned_changed(acquired.learned_version, admission).await;
        let wait = Duration::from_millis(acquired.wait_ms);
        match acquired.verdict {
            Verdict::Lost => {
                // Write this replica's slots and leases again before
                // anything is counted on data that lacks them, then admit
                // once more.
                tracing::warn!(
                    "Redis lost the shared counts (restarted empty?): writing this replica's window slots and leases again"
                );
                self.reconnect_now(admission).await;
                Grant::Readmit
            }
            Verdict::Granted | Verdict::Probe => {
                self.leases_mut().synced.insert((service, id.clone()), true);
                Grant::Granted(Lease {
                    shared: Arc::clone(self),
                    service,
                    day,
                    id,
                    stamped: false,
                    probe: acquired.verdict == Verdict::Probe,
                })
            }
            Verdict::Quota => Grant::QuotaSpent(QuotaScope::Instance, None),
            Verdict::Spent => Grant::QuotaSpent(QuotaScope::Instance, Some(wait)),
            Verdict::ServiceCap => Grant::QuotaSpent(QuotaScope::ServiceCap, None),
            Verdict::Reserved => Grant::QuotaSpent(QuotaScope::Reserved, None),
            Verdict::Released
            | Verdict::Settling
            | Verdict::Concurrency
            | Verdict::ServiceConcurrency
            | Verdict::Window
            | Verdict::ServiceWindow => Grant::Wait(wait.min(MAX_ASK_INTERVAL)),
        }
    }

    /// The keys an acquisition of `service` on `day` touches, in the order
    /// the acquire script takes them (undo takes the first six).
    fn acquisition_keys(&self, service: usize, day: NaiveDate) -> AcquisitionKeys {
        AcquisitionKeys([
            self.key("window"),
            self.key("inflight"),
            self.service_key("window", service),
            self.service_key("inflight", service),
            self.day_key(day),
            self.key("done"),
            self.key("epoch"),
            self.key("settling"),
            self.key("learned"),
        ])
    }

    /// Marketo refused a call for its window or concurrency: counts the
    /// refusal with every replica's, as its error report does, shares what
    /// it taught this replica (see [`super::learn`]) and takes what the
    /// others learned meanwhile.
    pub async fn refused(&self, admission: &Arc<Admission>) {
        if !self.is_up() {
            return;
        }
        let [window, concurrency] = admission.learned_episodes().map(|episode| {
            episode.map_or_else(scripts::LearnedEpisode::default, |episode| {
                scripts::LearnedEpisode {
                    floor: episode.floor,
                    at_ms: self.redis_millis(episode.lowered_at),
                    hold_ms: millis(episode.hold),
                }
            })
        });
        let args = scripts::Learn {
            window,
            concurrency,
            learned_ttl_ms: millis(LEARNED_TTL),
            day_ttl_s: DAY_TTL.as_secs(),
        };
        let keys = [self.key("learned"), self.day_key(admission.day())];
        if let Ok(fields) = self.run(&keys.each_ref().map(String::as_str), &args).await {
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
        let learned = self.key("learned");
        if let Ok(fields) = self.run(&[learned.as_str()], &scripts::Learned {}).await {
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
        let args = scripts::Undo {
            id,
            field: self.field(service),
            tombstone_ms: millis(self.tombstone()),
        };
        self.run(&self.acquisition_keys(service, day).each()[..6], &args)
            .await
            .map(drop)
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
        let day = self.day();
        self.count_unsynced(service, day);
        Grant::Granted(Lease {
            shared: Arc::clone(self),
            service,
            day,
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

    /// Marketo said 607: no replica calls before the probe time.
    pub async fn mark_spent(&self) {
        let day = self.day();
        let args = scripts::MarkSpent {
            probe_after_ms: millis(self.probe_after),
            day_ttl_s: DAY_TTL.as_secs(),
        };
        let _ = self.run(&[self.day_key(day).as_str()], &args).await;
    }

    /// A call went through after Marketo's 607: the day is not spent.
    pub async fn confirm_available(&self) {
        let day = self.day();
        let _ = self
            .run(&[self.day_key(day).as_str()], &scripts::ClearSpent {})
            .await;
    }

    /// Marketo's count of today's calls, shared with every replica.
    /// Answers today's calls from outside the proxy and the replicas'
    /// calls Marketo refused today, unless Redis cannot say.
    pub async fn reconcile(&self, day: NaiveDate, marketo_total: u64) -> Option<(u64, u64)> {
        let args = scripts::Reconcile {
            marketo_total,
            day_ttl_s: DAY_TTL.as_secs(),
        };
        self.run(&[self.day_key(day).as_str()], &args).await.ok()
    }

    /// The windows a call of `service` takes a slot in: the instance's,
    /// and the service's when it has one.
    fn window_keys(&self, service: usize) -> Vec<String> {
        let mut keys = vec![self.key("window")];
        if self
            .services
            .get(service)
            .is_some_and(|limits| limits.window_calls > 0)
        {
            keys.push(self.service_key("window", service));
        }
        keys
    }

    async fn stamp(&self, service: usize, id: &str, earlier: Duration) {
        let keys = self.window_keys(service);
        let args = scripts::Rescore {
            id,
            free_in_ms: millis(self.hold.saturating_sub(earlier)),
        };
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        if let Ok(frees) = self.run(&keys, &args).await {
            lock(&self.seen).frees_now(&frees, Instant::now());
        }
    }

    async fn release(&self, service: usize, id: &str) {
        let keys = [
            self.key("inflight"),
            self.service_key("inflight", service),
            self.key("done"),
        ];
        let args = scripts::Release {
            id,
            tombstone_ms: millis(self.tombstone()),
        };
        let _ = self.run(&keys.each_ref().map(String::as_str), &args).await;
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
        let shared = SharedLimits::new(&config, redis, Metrics::new(), marketo_day.clone(), Tasks::new())
            .expect("shared limits");
        let here = marketo_day.today();
        assert_eq!(shared.day(), here);
        // Redis's clock is a day ahead of this replica's.
        shared.clock_offset.store(24 * 3600 * 1000, Ordering::Relaxed);
        assert_eq!(shared.day(), here.succ_opt().expect("tomorrow"));
    }
}
