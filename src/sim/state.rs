//! What the simulated instance remembers: issued tokens, the rolling
//! window, calls in flight, today's usage, injected faults and a record of
//! every arrival.
//!
//! Everything sits behind one mutex that is never held across an await;
//! the simulator is a test instrument, not a hot path.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::SimConfig;
use super::bulk::{BulkQueues, BulkStats, BulkTimes, Context};
use super::leads::LeadStore;
use crate::marketo::code;

/// The state of one simulated instance.
pub(crate) struct State {
    pub config: SimConfig,
    pub started: Instant,
    inner: Mutex<Inner>,
}

pub(crate) struct Inner {
    tokens: HashMap<String, IssuedToken>,
    /// client id → the token it was last given.
    current: HashMap<String, String>,
    /// Arrival times of executed calls inside the window: what the limit
    /// is enforced on.
    window: VecDeque<Instant>,
    /// Arrival times of every call that met the limits inside the window,
    /// refused or not: what the client sent.
    offered: VecDeque<Instant>,
    in_flight: u32,
    day: NaiveDate,
    used_today: u64,
    users_today: BTreeMap<String, u64>,
    /// Today's refusals by error code, for `/rest/v1/stats/errors.json`.
    errors_today: BTreeMap<&'static str, u64>,
    pub faults: FaultState,
    pub stats: Stats,
    pub leads: LeadStore,
    pub bulk: BulkQueues,
    /// Calls whose latency was drawn (every `slow_every`th is slow).
    calls_timed: u64,
}

impl Inner {
    /// Starts a fresh day of usage once the configured midnight has passed.
    /// Every reader and writer of today's usage calls it first, so calls
    /// added just after midnight are not wiped by the next admission.
    fn roll_day(&mut self, today: NaiveDate) {
        if self.day != today {
            self.day = today;
            self.used_today = 0;
            self.users_today.clear();
            self.errors_today.clear();
        }
    }
}

struct IssuedToken {
    user: String,
    expires_at: Instant,
}

/// Faults waiting to be applied to the next calls.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    pub fail_next: VecDeque<Failure>,
    pub extra_latency: Duration,
    pub hang_next: u32,
    pub drop_next: u32,
    pub identity_fail_next: u32,
}

/// How to fail one call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Failure {
    /// Marketo error code to answer inside HTTP 200, e.g. "606".
    #[serde(default)]
    pub code: Option<String>,
    /// Or a bare HTTP status (502, 503, ...).
    #[serde(default)]
    pub http_status: Option<u16>,
    /// Or this body as it is, as JSON, in HTTP 200 or `http_status`: JSON
    /// that does not parse, an envelope without `errors`, ...
    #[serde(default)]
    pub body: Option<String>,
    /// A header of this many bytes on the answer; alone, on the answer
    /// the call would have had.
    #[serde(default)]
    pub header_bytes: Option<usize>,
}

/// Faults to inject, posted as JSON to `/_sim/faults`. Every field is
/// optional; the ones given are added to what is already pending.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Forget every issued token: later calls with them get 601.
    pub revoke_tokens: bool,
    /// Expire every issued token now: later calls with them get 602.
    pub expire_tokens: bool,
    /// Answer the next `count` authenticated calls with this failure.
    pub fail_next: Option<FailNext>,
    /// Latency added to every call from now on.
    #[serde(with = "humantime_serde")]
    pub extra_latency: Option<Duration>,
    /// Never answer the next N calls.
    pub hang_next: u32,
    /// Close the connection without an answer on the next N calls.
    pub drop_next: u32,
    /// Answer the next N identity calls with HTTP 503.
    pub identity_fail_next: u32,
    /// The next N bulk jobs enqueued end `Failed`.
    #[serde(default)]
    pub bulk_fail_next: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FailNext {
    pub count: u32,
    #[serde(flatten)]
    pub failure: Failure,
}

/// Everything a test may want to check about what arrived.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Identity calls answered (successful or not).
    pub identity_calls: u64,
    /// REST and bulk calls that arrived, whatever their answer.
    pub calls: u64,
    /// Calls answered with `success:true` (or a file).
    pub ok: u64,
    /// Error answers by Marketo code (or `http_<status>`; `body` for a
    /// body injected in HTTP 200).
    pub codes: BTreeMap<String, u64>,
    /// Most calls in flight at once as the client sent them: the calls
    /// executing when one arrived, plus that one, whether it was admitted
    /// or refused with 615. Above `concurrency` when a client overshoots.
    pub max_in_flight: u32,
    /// Most calls that arrived inside one rolling window, whether admitted
    /// or refused (606, 607, 615). Above `window_calls` when a client
    /// overshoots.
    pub max_in_window: u32,
    /// Most calls ever executing at once; the limit keeps it at or below
    /// `concurrency`.
    pub max_admitted_in_flight: u32,
    /// Most executed calls ever counted inside one window; the limit keeps
    /// it at or below `window_calls`.
    pub max_admitted_in_window: u32,
    /// Calls that carried an `access_token` parameter (query or body).
    pub access_token_params: u64,
    /// Calls admitted and then answered with a code Marketo does not
    /// count: their window place and unit of the day went back.
    #[serde(default)]
    pub uncounted: u64,
    /// TCP connections accepted.
    #[serde(default)]
    pub connections: u64,
    /// TLS handshakes completed (when serving HTTPS).
    #[serde(default)]
    pub tls_handshakes: u64,
    /// TLS handshakes that failed, e.g. because the client refused the
    /// certificate.
    #[serde(default)]
    pub tls_failed_handshakes: u64,
    /// The bulk queues' occupancy over time and their jobs.
    #[serde(default)]
    pub bulk: BulkStats,
    /// Calls executing right now.
    #[serde(default)]
    pub in_flight: u32,
    /// Calls counted against today's quota so far, by every API user.
    #[serde(default)]
    pub used_today: u64,
    /// Every arrival, in order.
    pub arrivals: Vec<Arrival>,
}

impl Stats {
    /// How many calls were answered with this Marketo code.
    pub fn code(&self, code: &str) -> u64 {
        self.codes.get(code).copied().unwrap_or(0)
    }
}

/// One call as the instance saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arrival {
    /// Seconds since the simulator started.
    pub at: f64,
    /// API user the token belonged to, if it was valid.
    pub user: Option<String>,
    pub method: String,
    /// Path and query.
    pub target: String,
    /// `ok` or the error code answered (`http_<status>`, `body`,
    /// `hung`, `dropped`, `cancelled` for injected faults).
    pub code: String,
    /// Names of the request headers, one per value, as they arrived.
    #[serde(default)]
    pub headers: Vec<String>,
}

/// Releases a concurrency slot when the call ends, however it ends.
pub(crate) struct InFlight {
    state: Arc<State>,
    user: String,
    /// When the call arrived: its place in the window.
    arrived: Instant,
    day: NaiveDate,
}

impl InFlight {
    /// Marketo does not count a call answered with this code (see
    /// [`marketo::is_uncounted`]): its window place and its unit of the
    /// day go back. Its concurrency slot is held until it ends.
    ///
    /// [`marketo::is_uncounted`]: crate::marketo::is_uncounted
    pub fn answered_with(&self, error_code: &str) {
        if !crate::marketo::is_uncounted(error_code) {
            return;
        }
        let mut guard = self.state.lock();
        let inner = &mut *guard;
        for arrivals in [&mut inner.window, &mut inner.offered] {
            if let Some(place) = arrivals.iter().position(|arrived| *arrived == self.arrived) {
                arrivals.remove(place);
            }
        }
        if inner.day == self.day {
            inner.used_today = inner.used_today.saturating_sub(1);
            if let Some(calls) = inner.users_today.get_mut(&self.user) {
                *calls = calls.saturating_sub(1);
            }
        }
        inner.stats.uncounted += 1;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.lock().in_flight -= 1;
    }
}

/// What the limits say about an authenticated call.
pub(crate) enum Admission {
    Admitted(InFlight),
    Rejected(&'static str, String),
}

impl State {
    pub fn new(config: SimConfig) -> Self {
        let leads = LeadStore::seeded(config.leads);
        let day = today(&config);
        Self {
            config,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                tokens: HashMap::new(),
                current: HashMap::new(),
                window: VecDeque::new(),
                offered: VecDeque::new(),
                in_flight: 0,
                day,
                used_today: 0,
                users_today: BTreeMap::new(),
                errors_today: BTreeMap::new(),
                faults: FaultState::default(),
                stats: Stats::default(),
                leads,
                bulk: BulkQueues::new(day),
                calls_timed: 0,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in a handler must not take the whole instance down.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counters and arrivals so far, with the bulk queues brought up to
    /// now.
    pub fn stats(&self) -> Stats {
        let mut inner = self.lock();
        let Inner { bulk, leads, .. } = &mut *inner;
        bulk.advance(&self.bulk_context(leads));
        inner.roll_day(today(&self.config));
        let mut stats = inner.stats.clone();
        stats.bulk = inner.bulk.stats.clone();
        stats.in_flight = inner.in_flight;
        stats.used_today = inner.used_today;
        stats
    }

    /// What the bulk queues need to answer a call now.
    pub fn bulk_context<'a>(&self, leads: &'a LeadStore) -> Context<'a> {
        Context {
            leads,
            times: BulkTimes {
                export: self.config.export_time,
                import: self.config.import_time,
                export_daily_bytes: self.config.export_daily_bytes,
            },
            started: self.started,
            now: Instant::now(),
            today: today(&self.config),
        }
    }

    pub fn seconds_since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Issues a token, or hands back the current one with its remaining
    /// lifetime, as Marketo does. Returns `None` for unknown credentials.
    pub fn issue_token(&self, client_id: &str, client_secret: &str) -> Option<(String, u64, String)> {
        let client = self
            .config
            .clients
            .iter()
            .find(|client| client.client_id == client_id && client.client_secret == client_secret)?;
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(token) = inner.current.get(client_id).cloned() {
            if let Some(issued) = inner.tokens.get(&token) {
                if issued.expires_at > now {
                    let left = issued.expires_at.duration_since(now).as_secs();
                    return Some((token, left, client.user.clone()));
                }
            }
        }
        let token = crate::marketo::new_access_token("sim");
        inner.tokens.insert(
            token.clone(),
            IssuedToken {
                user: client.user.clone(),
                expires_at: now + self.config.token_ttl,
            },
        );
        inner.current.insert(client_id.to_owned(), token.clone());
        Some((
            token,
            self.config.token_ttl.as_secs().saturating_sub(1),
            client.user.clone(),
        ))
    }

    /// Checks a presented token: the API user, or the error code.
    pub fn check_token(&self, token: Option<&str>) -> Result<String, &'static str> {
        let Some(token) = token.filter(|token| !token.is_empty()) else {
            return Err(code::TOKEN_MISSING);
        };
        let inner = self.lock();
        match inner.tokens.get(token) {
            None => Err(code::TOKEN_INVALID),
            Some(issued) if issued.expires_at <= Instant::now() => Err(code::TOKEN_EXPIRED),
            Some(issued) => Ok(issued.user.clone()),
        }
    }

    /// Applies the concurrency limit, the rolling window and the daily
    /// quota to a call that arrives now, in that order.
    ///
    /// Only calls with a valid token get here: Marketo does not count
    /// token errors against the limits. Every one that does is counted in
    /// the client's figures (`max_in_window`, `max_in_flight`) before the
    /// limits decide, so a client that overshoots shows above them.
    pub fn admit(self: &Arc<Self>, user: &str) -> Admission {
        let now = Instant::now();
        let config = &self.config;
        let mut inner = self.lock();
        inner.roll_day(today(config));
        forget_older_than(&mut inner.window, now, config.window);
        forget_older_than(&mut inner.offered, now, config.window);
        inner.offered.push_back(now);
        let offered = count(inner.offered.len());
        inner.stats.max_in_window = inner.stats.max_in_window.max(offered);
        inner.stats.max_in_flight = inner.stats.max_in_flight.max(inner.in_flight + 1);
        let refusal = if inner.in_flight >= config.concurrency {
            Some((
                code::CONCURRENCY_LIMITED,
                "Concurrent access limit reached".to_owned(),
            ))
        } else if inner.window.len() >= config.window_calls as usize {
            Some((
                code::RATE_LIMITED,
                format!(
                    "Max rate limit '{}' exceeded with in '{}' secs",
                    config.window_calls,
                    config.window.as_secs()
                ),
            ))
        } else if inner.used_today >= config.daily_quota {
            Some((code::QUOTA_REACHED, "Daily quota reached".to_owned()))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            *inner.errors_today.entry(code).or_default() += 1;
            return Admission::Rejected(code, message);
        }
        inner.window.push_back(now);
        inner.in_flight += 1;
        inner.used_today += 1;
        *inner.users_today.entry(user.to_owned()).or_default() += 1;
        inner.stats.max_admitted_in_flight = inner.stats.max_admitted_in_flight.max(inner.in_flight);
        let admitted = count(inner.window.len());
        inner.stats.max_admitted_in_window = inner.stats.max_admitted_in_window.max(admitted);
        Admission::Admitted(InFlight {
            state: Arc::clone(self),
            user: user.to_owned(),
            arrived: now,
            day: inner.day,
        })
    }

    /// A request id with the instance's clock now.
    pub fn request_id(&self) -> String {
        crate::marketo::request_id_at(chrono::Utc::now().timestamp_millis() + self.config.clock_skew_ms)
    }

    /// How long the next call takes inside the instance.
    pub fn latency(&self) -> Duration {
        let config = &self.config;
        if config.slow_every > 0 {
            let mut inner = self.lock();
            inner.calls_timed += 1;
            if inner.calls_timed % u64::from(config.slow_every) == 0 {
                return config.slow_latency;
            }
        }
        if config.latency_jitter.is_zero() {
            return config.latency;
        }
        let jitter = config.latency_jitter.as_secs_f64() * (rand::random::<f64>() * 2.0 - 1.0);
        Duration::from_secs_f64((config.latency.as_secs_f64() + jitter).max(0.0))
    }

    /// Today's usage per API user, for `/rest/v1/stats/usage.json`.
    pub fn usage_today(&self) -> (NaiveDate, u64, BTreeMap<String, u64>) {
        let mut inner = self.lock();
        inner.roll_day(today(&self.config));
        (inner.day, inner.used_today, inner.users_today.clone())
    }

    /// Today's refusals by error code, for `/rest/v1/stats/errors.json`.
    pub fn errors_today(&self) -> (NaiveDate, BTreeMap<&'static str, u64>) {
        let mut inner = self.lock();
        inner.roll_day(today(&self.config));
        (inner.day, inner.errors_today.clone())
    }

    /// Adds calls to today's usage as if another integration had made them.
    pub fn add_foreign_usage(&self, user: &str, calls: u64) {
        let mut inner = self.lock();
        inner.roll_day(today(&self.config));
        inner.used_today += calls;
        *inner.users_today.entry(user.to_owned()).or_default() += calls;
    }

    pub fn apply_faults(&self, faults: Faults) {
        let mut inner = self.lock();
        if faults.revoke_tokens {
            inner.tokens.clear();
            inner.current.clear();
        }
        if faults.expire_tokens {
            let now = Instant::now();
            for issued in inner.tokens.values_mut() {
                issued.expires_at = issued.expires_at.min(now);
            }
        }
        if let Some(fail) = faults.fail_next {
            for _ in 0..fail.count {
                inner.faults.fail_next.push_back(fail.failure.clone());
            }
        }
        if let Some(latency) = faults.extra_latency {
            inner.faults.extra_latency = latency;
        }
        inner.faults.hang_next += faults.hang_next;
        inner.faults.drop_next += faults.drop_next;
        inner.faults.identity_fail_next += faults.identity_fail_next;
        inner.bulk.fail_next += faults.bulk_fail_next;
    }

    /// Records an answered call.
    pub fn record(&self, arrival: Arrival) {
        let mut inner = self.lock();
        inner.stats.calls += 1;
        if arrival.code == "ok" {
            inner.stats.ok += 1;
        } else {
            *inner.stats.codes.entry(arrival.code.clone()).or_default() += 1;
        }
        // Calls are recorded when they end, which is not the order they
        // arrived in once latency differs (a 615 ends before the calls that
        // filled the slots): keep the log sorted by arrival time.
        let arrivals = &mut inner.stats.arrivals;
        let position = arrivals.partition_point(|earlier| earlier.at <= arrival.at);
        arrivals.insert(position, arrival);
    }
}

/// Drops the arrival times that have left the rolling window by `now`.
fn forget_older_than(arrivals: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while arrivals
        .front()
        .is_some_and(|arrived| now.duration_since(*arrived) >= window)
    {
        arrivals.pop_front();
    }
}

fn count(calls: usize) -> u32 {
    u32::try_from(calls).unwrap_or(u32::MAX)
}

fn today(config: &SimConfig) -> NaiveDate {
    chrono::Utc::now().with_timezone(&config.timezone).date_naive()
}
