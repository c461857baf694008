//! Admission control: whether and when a call may be sent to Marketo.
//!
//! A call needs three things at once: a slot in the instance's sliding
//! window (and in its service's share, when capped), a concurrency slot
//! (instance and service), and a unit of the daily quota (instance,
//! service cap, and what others' reserves leave). Requests wait in one
//! queue per service; when capacity frees, the services that can go are
//! served by start-time fair queueing on their weights, FIFO within a
//! service. An idle service banks no credit and loses none, and capacity
//! it does not use goes to the others.
//!
//! A request that cannot start before its deadline is refused at once
//! with the wait it would need; one whose deadline passes in the queue is
//! refused then. Waiters that go away (client disconnected) leave the
//! queue. All of it sits behind one mutex that is never held across an
//! await; a timer task wakes the queue when a window slot frees.
//!
//! Under `limits.mode: observe` nothing waits and nothing is refused here:
//! every call is counted as it would be and goes at once, and what
//! `enforce` would have done with it (wait, or refuse) is tallied.
//!
//! The same state tells each service where it stands ([`Standing`]), for
//! the `RateLimit` fields of its answers.

pub mod foreign;
pub mod learn;
pub mod marketo_clock;
pub mod quota;
pub mod shared;
pub mod window;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Config, INTERNAL_SERVICE, LimitsMode};
use crate::limits::day::MarketoDay;
use crate::limits::fair_queue::{FairQueue, Waiting};
use crate::metrics::Metrics;
use crate::recent::{LastMinuteWaits, WaitCounts};
use crate::tasks::Tasks;
use foreign::ForeignRate;
use learn::{Episode, Learned};
use marketo_clock::MarketoClock;
use prometheus::{Histogram, IntCounter, IntGauge};
use quota::{DailyQuota, QuotaScope, ServiceQuota};
use window::SlidingWindow;

pub use crate::limits::day::WallClock;

/// The rate limit a request could not be admitted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// The instance's window (`limits.window_calls`).
    Instance,
    /// The service's own share (`services[].window_calls`).
    Service,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("{}", quota_message(*scope))]
    Quota {
        scope: QuotaScope,
        retry_after: Duration,
    },
    #[error("queue full: {limit} requests are already waiting")]
    QueueFull { limit: usize, retry_after: Duration },
    #[error("{} rate limit: this request could not start within its {} queue wait", rate_name(*scope), humantime::format_duration(*max_wait))]
    WouldWait {
        scope: RateScope,
        max_wait: Duration,
        retry_after: Duration,
    },
    #[error("rate limit: not admitted within the {} queue wait", humantime::format_duration(*max_wait))]
    DeadlineExpired {
        max_wait: Duration,
        retry_after: Duration,
    },
    #[error("the proxy is shutting down")]
    Closed,
}

impl AdmissionError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Quota { retry_after, .. }
            | Self::QueueFull { retry_after, .. }
            | Self::WouldWait { retry_after, .. }
            | Self::DeadlineExpired { retry_after, .. } => Some(*retry_after),
            Self::Closed => Some(Duration::from_secs(1)),
        }
    }
}

fn quota_message(scope: QuotaScope) -> &'static str {
    match scope {
        QuotaScope::Instance => "daily quota reached for the instance; it resets at local midnight",
        QuotaScope::ServiceCap => "daily quota reached for this service (its daily_quota cap)",
        QuotaScope::Reserved => "daily quota: what is left today is reserved for other services",
    }
}

fn rate_name(scope: RateScope) -> &'static str {
    match scope {
        RateScope::Instance => "instance",
        RateScope::Service => "service",
    }
}

/// The admission state of one Marketo instance.
pub struct Admission {
    state: Mutex<State>,
    /// Wakes the timer task when the next wake-up moves.
    timer: Arc<Notify>,
    metrics: Metrics,
    names: Vec<String>,
    /// Marketo's day, on the clock the quota counts by.
    marketo_day: MarketoDay,
    max_queue_length: usize,
    /// `limits.mode: observe`: calls go at once, verdicts are only counted.
    observe: bool,
    /// The length of the rolling window, as configured.
    window_length: Duration,
    /// Marketo said 607 and no call has gone through since.
    marked_spent: std::sync::atomic::AtomicBool,
    spent_reported: Notify,
}

/// What a replica last saw of the whole instance's use in the shared
/// state: window slots taken, calls in flight, calls counted today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceUse {
    pub window: u32,
    pub in_flight: u32,
    pub day_used: u64,
}

struct State {
    window: SlidingWindow,
    /// The instance's limits; the ones in force may be a share of them.
    full_window: u32,
    full_concurrency: u32,
    /// This replica's share of them (all of them unless Redis is
    /// unreachable).
    window_split: u32,
    concurrency_split: u32,
    /// What Marketo's 606s and 615s leave of them (see [`learn`]).
    learned_window: Learned,
    learned_concurrency: Learned,
    /// The calls of every window kept free for others, from Marketo's
    /// reports (see [`foreign`]).
    foreign: ForeignRate,
    /// The limits others leave, as last applied: window, concurrency.
    limits_left: (u32, u32),
    /// The concurrency in force: the least of the share and the learned.
    concurrency: u32,
    in_flight: u32,
    quota: DailyQuota,
    lanes: Vec<Lane>,
    /// The requests waiting, one lane per service.
    queue: FairQueue<Result<Permit, AdmissionError>>,
    /// After Marketo said 606/615, nothing is sent before this.
    paused_until: Option<Instant>,
    /// Shutting down: nobody is admitted any more.
    closed: bool,
    /// Smoothed time Marketo takes to answer, for estimates.
    latency: Duration,
    /// What answers say of Marketo's clock; `None` when
    /// `limits.marketo_clock` is off.
    marketo_clock: Option<MarketoClock>,
    /// When the timer task should next pump the queue.
    wake_at: Option<Instant>,
    /// Calls sent per second over the last [`RATE_HORIZON`] (second since
    /// `started`, count), for the quota forecast. Pruned whenever a new
    /// second starts, so it stays bounded whether or not anyone reads the
    /// forecast.
    recent: VecDeque<(u64, u32)>,
    started: Instant,
    /// Today's tallies per service, in admission order.
    tallies: Vec<Tally>,
    /// The day the tallies count.
    tallies_day: chrono::NaiveDate,
    /// Times this replica lost the limits shared with the others and fell
    /// back to its share: a call admitted before the last of them and
    /// still without a grant of the shared limits is admitted again.
    fallbacks: u64,
}

/// Today's count of one service's requests that did not simply take a
/// call: answered without one, held in the queue, or (observe mode) let
/// through where `enforce` would have held them back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Answered with the answer of an identical read in flight.
    pub coalesced: u64,
    /// Answered from the cache.
    pub cached: u64,
    /// Waited in the queue before their call.
    pub queued: u64,
    /// Observe mode: went at once, would have waited.
    pub would_wait: u64,
    /// Observe mode: went at once, would have been refused.
    pub would_refuse: u64,
}

/// Why a request was answered without a call of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// An identical read was queued or in flight: its answer was shared.
    Coalesced,
    /// The answer was in the cache.
    Cached,
}

impl Saved {
    /// The `reason` label of `marketo_proxy_calls_saved_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Coalesced => "coalesced",
            Self::Cached => "cached",
        }
    }
}

/// What `enforce` would have done with a call that observe mode sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    WouldWait,
    WouldRefuse,
}

/// Where one service stands against the window and the day, as the
/// `RateLimit` fields tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub window: PolicyStanding,
    pub day: PolicyStanding,
}

/// One limit as a service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyStanding {
    /// Calls the service may make per `length` (its cap or its share).
    pub quota: u64,
    pub length: Duration,
    /// Calls it may still make now.
    pub remaining: u64,
    /// How long until that number next grows (a slot frees, the day
    /// resets).
    pub resets_in: Duration,
}

/// How far back the quota forecast looks for the current rate.
const RATE_HORIZON: Duration = Duration::from_secs(15 * 60);

/// One service's queue and limits.
struct Lane {
    /// The service's series, looked up once.
    depth_gauge: IntGauge,
    used_gauge: IntGauge,
    wait_histogram: Histogram,
    queued_counter: IntCounter,
    window: Option<SlidingWindow>,
    concurrency: u32,
    in_flight: u32,
    /// Queue waits of the last minute, for the status page.
    waits: LastMinuteWaits,
}

impl Lane {
    /// The lane of service `name`, with its series, taking at most
    /// `concurrency` calls at once, with no window of its own.
    fn new(metrics: &Metrics, name: &str, concurrency: u32) -> Self {
        Self {
            depth_gauge: metrics.queue_depth.with_label_values(&[name]),
            used_gauge: metrics.daily_used.with_label_values(&[name]),
            wait_histogram: metrics.queue_wait.with_label_values(&[name]),
            queued_counter: metrics.queued.with_label_values(&[name]),
            window: None,
            concurrency,
            in_flight: 0,
            waits: LastMinuteWaits::default(),
        }
    }
}

/// A limit Marketo refused a call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarketoLimit {
    /// 606: the rolling window.
    Window,
    /// 615: calls in flight.
    Concurrency,
}

/// What admission looks like right now, for `/usage` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    pub day: chrono::NaiveDate,
    pub daily_quota: u64,
    pub daily_used: u64,
    pub daily_remaining: u64,
    /// Calls Marketo counted today that did not go through this proxy.
    pub daily_foreign: u64,
    pub window_used: u32,
    /// The limits in force (see [`learn`]): below the configured ones while
    /// Marketo's refusals show calls from outside the proxy, or while this
    /// replica keeps to its share (Redis unreachable).
    pub window_limit: u32,
    pub in_flight: u32,
    pub concurrency: u32,
    pub configured_window: u32,
    pub configured_concurrency: u32,
    /// Calls from outside the proxy in Marketo's window, as its 606s and
    /// its reports show.
    pub foreign_in_window: u32,
    /// The part of them Marketo's reports show, kept free every window.
    pub kept_free: u32,
    pub queued: usize,
    /// `enforce` or `observe`.
    pub mode: &'static str,
    pub services: Vec<ServiceSnapshot>,
}

/// What the status page shows of admission: a [`Snapshot`] and what the
/// page adds to it, read under one lock so the figures agree.
#[derive(Debug, Clone)]
pub struct Status {
    pub snapshot: Snapshot,
    /// Calls sent in each of the last seconds, oldest first; the last is
    /// the second now under way.
    pub calls_per_second: Vec<u32>,
    /// Window slots held by calls sent and not yet answered; the rest of
    /// `snapshot.window_used` were answered less than `window_hold` ago.
    pub window_in_flight: u32,
    /// How long an answered call keeps its window slot (window + margin).
    pub window_hold: Duration,
    /// The daily quota this replica counts against (its share of it while
    /// Redis is unreachable).
    pub daily_limit_here: u64,
    /// After Marketo's 606/615, nothing is sent for this long.
    pub paused_for: Option<Duration>,
    /// When the day's quota runs out at the recent rate; `None` when not
    /// before the reset.
    pub exhaustion_eta: Option<Duration>,
    /// Each service's queue waits over the last minute, by id.
    pub waits: Vec<WaitCounts>,
    /// The wall-clock time of the reading, and when the day resets in the
    /// quota's zone.
    pub now: DateTime<Utc>,
    pub next_reset: DateTime<Utc>,
    pub timezone: chrono_tz::Tz,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceSnapshot {
    pub name: String,
    pub daily_used: u64,
    pub daily_cap: u64,
    pub reserved_daily: u64,
    pub window_used: Option<u32>,
    pub window_limit: Option<u32>,
    pub in_flight: u32,
    pub concurrency: u32,
    pub queued: usize,
    /// Today's saved, queued and (observe mode) held-back counts.
    pub tally: Tally,
}

impl Admission {
    pub fn new(config: &Config, metrics: Metrics) -> Arc<Self> {
        Self::with_clock(config, metrics, Arc::new(Utc::now))
    }

    pub fn with_clock(config: &Config, metrics: Metrics, wall: WallClock) -> Arc<Self> {
        let limits = &config.limits;
        let marketo_day = MarketoDay::with_clock(limits.timezone, wall);
        let quota_services: Vec<ServiceQuota> = config
            .services
            .iter()
            .map(|service| ServiceQuota {
                cap: service.effective_daily_quota(limits).get(),
                reserved: service.reserved_daily,
            })
            .collect();
        let mut lanes: Vec<Lane> = config
            .services
            .iter()
            .map(|service| {
                let mut lane = Lane::new(
                    &metrics,
                    &service.name,
                    service.effective_concurrency(limits).get(),
                );
                lane.window = service
                    .window_calls
                    .map(|calls| SlidingWindow::new(calls.get(), limits.window, limits.safety_margin));
                lane
            })
            .collect();
        // The proxy's own calls (the usage report) get a lane of their own.
        lanes.push(Lane::new(&metrics, INTERNAL_SERVICE, limits.concurrency.get()));
        let weights = config
            .services
            .iter()
            .map(|service| f64::from(service.weight.get()));
        let queue = FairQueue::new(weights.chain(std::iter::once(1.0)));
        let mut quota_services: Vec<ServiceQuota> = quota_services;
        quota_services.push(ServiceQuota {
            cap: limits.daily_quota.get(),
            reserved: 0,
        });
        let now = marketo_day.now();
        let names = config.counted_names();
        for name in &names {
            // Every series exists from the start, at 0, so that a rate over
            // it is a number before the first saved or held-back call.
            for saved in [Saved::Coalesced, Saved::Cached] {
                metrics.calls_saved.with_label_values(&[name, saved.label()]);
            }
            for verdict in ["would_wait", "would_refuse"] {
                metrics.observed.with_label_values(&[name, verdict]);
            }
        }
        let quota = DailyQuota::new(
            marketo_day.clone(),
            limits.daily_quota.get(),
            quota_services,
            limits.quota_probe_interval,
            now,
        );
        let state = State {
            window: SlidingWindow::new(limits.window_calls.get(), limits.window, limits.safety_margin),
            full_window: limits.window_calls.get(),
            full_concurrency: limits.concurrency.get(),
            window_split: limits.window_calls.get(),
            concurrency_split: limits.concurrency.get(),
            learned_window: Learned::window(limits.window_calls.get(), limits.window, limits.safety_margin),
            learned_concurrency: Learned::concurrency(limits.concurrency.get()),
            foreign: ForeignRate::new(limits.window, limits.window_calls.get()),
            limits_left: (limits.window_calls.get(), limits.concurrency.get()),
            concurrency: limits.concurrency.get(),
            in_flight: 0,
            tallies: vec![Tally::default(); lanes.len()],
            tallies_day: quota.day(),
            quota,
            lanes,
            queue,
            paused_until: None,
            closed: false,
            latency: Duration::ZERO,
            marketo_clock: limits.marketo_clock.then(MarketoClock::default),
            wake_at: None,
            recent: VecDeque::new(),
            started: Instant::now(),
            fallbacks: 0,
        };
        metrics.window_limit.set(i64::from(limits.window_calls.get()));
        metrics
            .window_effective_limit
            .set(i64::from(limits.window_calls.get()));
        metrics
            .concurrency_effective_limit
            .set(i64::from(limits.concurrency.get()));
        metrics
            .daily_quota
            .set(i64::try_from(limits.daily_quota.get()).unwrap_or(i64::MAX));
        let admission = Arc::new(Self {
            state: Mutex::new(state),
            timer: Arc::new(Notify::new()),
            metrics,
            names,
            marketo_day,
            max_queue_length: limits.max_queue_length.get(),
            observe: limits.mode == LimitsMode::Observe,
            window_length: limits.window,
            marked_spent: std::sync::atomic::AtomicBool::new(false),
            spent_reported: Notify::new(),
        });
        admission.publish(&mut admission.lock());
        admission
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until a call of `service` may be sent, or says why it may
    /// not. `front` puts a replay at the head of its service's queue.
    pub async fn admit(
        self: &Arc<Self>,
        service: usize,
        deadline: Instant,
        front: bool,
    ) -> Result<Permit, AdmissionError> {
        let (receiver, id) = {
            let mut state = self.lock();
            let now = Instant::now();
            let wall = self.marketo_day.now();
            state.quota.roll(wall);
            if service >= state.lanes.len() || state.closed {
                return Err(AdmissionError::Closed);
            }
            if self.observe {
                return Ok(self.observe_and_go(&mut state, service, deadline, front, now, wall));
            }
            if let Err(scope) = state.quota.check(service, wall) {
                let retry_after = state.quota.retry_after(scope, wall);
                return Err(AdmissionError::Quota { scope, retry_after });
            }
            let (start, scope) = state.estimate_start(service, now, front);
            if !front && state.queue.len() >= self.max_queue_length {
                return Err(AdmissionError::QueueFull {
                    limit: self.max_queue_length,
                    retry_after: start.saturating_duration_since(now).max(Duration::from_secs(1)),
                });
            }
            if start > deadline {
                return Err(AdmissionError::WouldWait {
                    scope,
                    max_wait: deadline.saturating_duration_since(now),
                    retry_after: start.saturating_duration_since(now),
                });
            }
            // Decided before it joins the queue, as observe mode decides it.
            let waits = !front && !state.can_start_now(service, now);
            let (id, receiver) = state.queue.push(service, now, deadline, front);
            if waits {
                state.tally(service).queued += 1;
                state.lanes[service].queued_counter.inc();
            }
            self.pump(&mut state);
            (receiver, id)
        };
        // Gone before its turn, the request leaves its lane; a permit
        // granted meanwhile gives back what it took when dropped.
        let waiting = Waiting::new(receiver, |granted| {
            drop(granted);
            self.leave(service, id);
        });
        waiting.await.unwrap_or(Err(AdmissionError::Closed))
    }

    /// Observe mode: counts the call as sent now and tallies what
    /// `enforce` would have done with it (replays are not tallied: their
    /// first attempt was).
    fn observe_and_go(
        self: &Arc<Self>,
        state: &mut State,
        service: usize,
        deadline: Instant,
        front: bool,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Permit {
        let verdict = if state.quota.check(service, wall).is_err()
            || state.estimate_start(service, now, front).0 > deadline
        {
            Some(Verdict::WouldRefuse)
        } else if !state.can_start_now(service, now) {
            Some(Verdict::WouldWait)
        } else {
            None
        };
        if let (Some(verdict), false) = (verdict, front) {
            let tally = state.tally(service);
            let label = match verdict {
                Verdict::WouldWait => {
                    tally.would_wait += 1;
                    "would_wait"
                }
                Verdict::WouldRefuse => {
                    tally.would_refuse += 1;
                    "would_refuse"
                }
            };
            self.metrics
                .observed
                .with_label_values(&[self.name(service), label])
                .inc();
        }
        state.dispatch(service, now, wall);
        state.lanes[service].wait_histogram.observe(0.0);
        self.publish(state);
        self.permit(state, service, now, wall, Duration::ZERO)
    }

    /// The permit of a call of `service` dispatched at `now`, after
    /// `queue_wait` in its queue.
    fn permit(
        self: &Arc<Self>,
        state: &State,
        service: usize,
        now: Instant,
        wall: DateTime<Utc>,
        queue_wait: Duration,
    ) -> Permit {
        Permit {
            admission: Arc::clone(self),
            service,
            sent_at: now,
            sent_wall: wall.timestamp_millis(),
            queue_wait,
            stamped: false,
            armed: true,
            fallbacks: state.fallbacks,
            // Only the proxy's own calls (its reading of Marketo's usage
            // report) need it.
            day_count: (service == self.internal_service()).then(|| state.quota.own_total()),
        }
    }

    /// Whether the limits are only observed (`limits.mode: observe`).
    pub fn observes(&self) -> bool {
        self.observe
    }

    /// A request of `service` was answered without a call of its own.
    pub fn saved(&self, service: usize, saved: Saved) {
        let mut state = self.lock();
        state.quota.roll(self.marketo_day.now());
        let tally = state.tally(service);
        match saved {
            Saved::Coalesced => tally.coalesced += 1,
            Saved::Cached => tally.cached += 1,
        }
        drop(state);
        self.metrics
            .calls_saved
            .with_label_values(&[self.name(service), saved.label()])
            .inc();
    }

    /// Where `service` stands right now against the window and the day:
    /// its own caps and the instance's limits (this replica's share of
    /// them), whichever leaves less, with others' reserves held back.
    pub fn standing(&self, service: usize) -> Option<Standing> {
        let mut state = self.lock();
        if service >= state.lanes.len() {
            return None;
        }
        let now = Instant::now();
        let wall = self.marketo_day.now();
        state.quota.roll(wall);
        let window_length = self.window_length;
        let mut window = {
            let instance = &mut state.window;
            PolicyStanding {
                quota: u64::from(instance.limit()),
                length: window_length,
                remaining: u64::from(instance.limit().saturating_sub(instance.used(now))),
                resets_in: instance.next_release(now).unwrap_or(window_length),
            }
        };
        if let Some(own) = state.lanes[service].window.as_mut() {
            let remaining = u64::from(own.limit().saturating_sub(own.used(now)));
            window.quota = window.quota.min(u64::from(own.limit()));
            if remaining <= window.remaining {
                window.remaining = remaining;
                window.resets_in = own.next_release(now).unwrap_or(window_length);
            }
        }
        let day = PolicyStanding {
            quota: state.quota.quota_of(service),
            length: Duration::from_secs(24 * 60 * 60),
            remaining: state.quota.available(service, wall),
            resets_in: (state.quota.next_reset(wall) - wall).to_std().unwrap_or_default(),
        };
        Some(Standing { window, day })
    }

    /// Enforces `1 / replicas` of the instance's limits here (the shared
    /// state that spans replicas is unreachable, and what the others hold
    /// is unknown), or all of them again with 1. A day already split
    /// stays split as it was.
    pub fn set_fallback_split(self: &Arc<Self>, replicas: u32) {
        let replicas = replicas.max(1);
        let mut state = self.lock();
        state.window_split = (state.full_window / replicas).max(1);
        state.concurrency_split = (state.full_concurrency / replicas).max(1);
        let used = state.quota.used_total();
        state.quota.set_fallback_split(u64::from(replicas), used);
        self.metrics.window_limit.set(i64::from(state.window_split));
        self.pump(&mut state);
    }

    /// The shared state was lost just now: enforce here this replica's
    /// part of what the instance had left, as last seen there. Its own
    /// slots and calls in flight stay its own; what the others held stays
    /// theirs until [`set_fallback_split`] once their calls are surely over.
    ///
    /// [`set_fallback_split`]: Self::set_fallback_split
    /// `granted` of the calls admitted here hold a grant of the shared
    /// state. The others were still waiting for one (asking, or between
    /// two asks): they hold nothing there and are admitted again (see
    /// [`Permit::admitted_before_fallback`]).
    pub fn split_what_is_left(self: &Arc<Self>, replicas: u32, instance: InstanceUse, granted: u32) {
        let replicas = replicas.max(1);
        let mut state = self.lock();
        state.fallbacks += 1;
        let unsent = state.in_flight.saturating_sub(granted);
        let now = Instant::now();
        let own_window = state.window.used(now).saturating_sub(unsent);
        let own_in_flight = state.in_flight.saturating_sub(unsent);
        let window_left = state.full_window.saturating_sub(instance.window.max(own_window));
        let window = (own_window + window_left / replicas).max(1);
        let concurrency_left = state
            .full_concurrency
            .saturating_sub(instance.in_flight.max(own_in_flight));
        state.window_split = window;
        state.concurrency_split = (own_in_flight + concurrency_left / replicas).max(1);
        state
            .quota
            .set_fallback_split(u64::from(replicas), instance.day_used);
        self.metrics.window_limit.set(i64::from(window));
        self.pump(&mut state);
    }

    /// When each taken slot of the instance's window frees, in wall-clock
    /// time; a call in flight holds its slot a whole window and margin
    /// from now. Saved with the day's counts, so a restart keeps to the
    /// window its calls still hold.
    pub fn window_frees_at(&self) -> Vec<DateTime<Utc>> {
        let wall = self.marketo_day.now();
        let mut state = self.lock();
        let (left, in_flight) = state.window.taken(Instant::now());
        let hold = state.window.hold();
        left.into_iter()
            .chain(std::iter::repeat_n(hold, in_flight as usize))
            .filter_map(|left| chrono::TimeDelta::from_std(left).ok())
            .map(|left| wall + left)
            .collect()
    }

    /// Takes the window slots a previous run saved ([`window_frees_at`]);
    /// the ones already free are passed over.
    ///
    /// [`window_frees_at`]: Self::window_frees_at
    pub fn restore_window(self: &Arc<Self>, frees_at: &[DateTime<Utc>]) {
        let now = Instant::now();
        let wall = self.marketo_day.now();
        let mut state = self.lock();
        state.window.restore(
            frees_at
                .iter()
                .filter_map(|at| (*at - wall).to_std().ok())
                .filter(|left| !left.is_zero())
                .map(|left| now + left),
        );
        self.pump(&mut state);
    }

    /// Stops admitting: every waiting request is answered at once, and
    /// later ones too. Calls already admitted finish normally.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for waiter in state.queue.take_all() {
            let _ = waiter.reply.send(Err(AdmissionError::Closed));
        }
        self.publish(&mut state);
    }

    /// Holds every call back for `pause` (Marketo said 606 or 615 because
    /// of calls we cannot see).
    pub fn pause(self: &Arc<Self>, pause: Duration) {
        let mut state = self.lock();
        let until = Instant::now() + pause;
        state.paused_until = Some(state.paused_until.map_or(until, |current| current.max(until)));
        self.pump(&mut state);
    }

    /// Marketo refused a call for a limit that calls the proxy cannot see
    /// share: 606 (`MarketoLimit::Window`) or 615 (`MarketoLimit::Concurrency`). The
    /// limit in force drops to the proxy's own calls counted against it
    /// (see [`learn`]). `sent` is when the refused call went out;
    /// `instance_window` the instance's window as the shared state last
    /// counted it, when replicas share it.
    pub fn refused(self: &Arc<Self>, limit: MarketoLimit, sent: Instant, instance_window: Option<u32>) {
        let mut state = self.lock();
        let now = Instant::now();
        state.quota.roll(self.marketo_day.now());
        state.quota.count_refusal();
        let (name, lowered) = match limit {
            MarketoLimit::Window => {
                // The refused call's own slot is among the answered ones.
                let own = instance_window.unwrap_or_else(|| state.window.answered(now));
                (
                    "window",
                    state.learned_window.refused(now, sent, own.saturating_sub(1)),
                )
            }
            MarketoLimit::Concurrency => {
                let own = state.in_flight.saturating_sub(1);
                ("concurrency", state.learned_concurrency.refused(now, sent, own))
            }
        };
        if let Some(lowered) = lowered {
            tracing::warn!(
                limit = name,
                from = lowered.from,
                to = lowered.to,
                hold_seconds = lowered.hold.as_secs_f64(),
                "Marketo refused a call that the proxy's own count allowed: calls from outside the proxy \
                 share the {name}; lowering the {name} limit in force"
            );
        }
        self.pump(&mut state);
    }

    /// The window and concurrency limits that calls from outside the proxy
    /// leave now: what Marketo's refusals leave, and of the window no more
    /// than its reports leave (the configured ones when neither shows any).
    pub fn limits_left(&self) -> (u32, u32) {
        let state = self.lock();
        let now = Instant::now();
        (state.window_left(now), state.learned_concurrency.limit(now))
    }

    /// The last lowerings of the learned window and concurrency, to share
    /// with other replicas.
    pub fn learned_episodes(&self) -> [Option<Episode>; 2] {
        let state = self.lock();
        [
            state.learned_window.episode(),
            state.learned_concurrency.episode(),
        ]
    }

    /// Takes what another replica learned (see [`Learned::adopt`]).
    pub fn adopt_learned(self: &Arc<Self>, [window, concurrency]: [Option<Episode>; 2]) {
        let mut state = self.lock();
        if let Some(window) = window {
            state.learned_window.adopt(window);
        }
        if let Some(concurrency) = concurrency {
            state.learned_concurrency.adopt(concurrency);
        }
        self.pump(&mut state);
    }

    /// Sets the limits in force: the least of the share and what Marketo's
    /// refusals left. Says in the log when a learned limit is back at the
    /// configured one.
    fn apply_limits(&self, state: &mut State, now: Instant) {
        let learned = (state.window_left(now), state.learned_concurrency.limit(now));
        if learned != state.limits_left {
            let ceilings = (
                state.learned_window.ceiling(),
                state.learned_concurrency.ceiling(),
            );
            for (name, limit, was, ceiling) in [
                ("window", learned.0, state.limits_left.0, ceilings.0),
                ("concurrency", learned.1, state.limits_left.1, ceilings.1),
            ] {
                if limit == ceiling && was < ceiling {
                    tracing::info!(
                        limit = name,
                        to = limit,
                        "the {name} limit in force is back at the configured one"
                    );
                }
            }
            state.limits_left = learned;
            self.metrics
                .foreign_calls_estimate
                .set(i64::from(state.full_window.saturating_sub(learned.0)));
        }
        let window = state.window_split.min(learned.0);
        let concurrency = state.concurrency_split.min(learned.1);
        if window != state.window.limit() || concurrency != state.concurrency {
            state.window.set_limit(window);
            state.concurrency = concurrency;
            self.metrics.window_effective_limit.set(i64::from(window));
            self.metrics
                .concurrency_effective_limit
                .set(i64::from(concurrency));
        }
    }

    /// Marketo said 607: nothing more until the probe time (see
    /// [`quota`]), and whoever reconciles with Marketo's usage report is
    /// told to read it again.
    pub fn quota_spent(self: &Arc<Self>) {
        let mut state = self.lock();
        state.quota.mark_spent(self.marketo_day.now());
        self.marked_spent
            .store(true, std::sync::atomic::Ordering::Release);
        self.pump(&mut state);
        drop(state);
        self.spent_reported.notify_waiters();
    }

    /// A call was answered without 607: if the day was marked spent, it is
    /// not after all. Says whether it was. Cheap when it was not.
    pub fn quota_confirmed(self: &Arc<Self>) -> bool {
        if !self.marked_spent.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut state = self.lock();
        self.marked_spent
            .store(false, std::sync::atomic::Ordering::Release);
        let was_spent = state.quota.confirm_available();
        if was_spent {
            tracing::info!("a call went through after Marketo's 607: the day is not spent");
            self.pump(&mut state);
        }
        was_spent
    }

    /// How long a call refused for `scope` of the daily quota should wait.
    pub fn quota_retry_after(&self, scope: QuotaScope) -> Duration {
        let state = self.lock();
        state.quota.retry_after(scope, self.marketo_day.now())
    }

    /// Wakes when Marketo reports the day spent.
    pub fn spent_reported(&self) -> &Notify {
        &self.spent_reported
    }

    /// Marketo's reports read once: keeps the calls of every window that
    /// others make free for them (see [`foreign`]).
    pub fn observe_foreign(self: &Arc<Self>, reading: foreign::Reading) {
        let mut state = self.lock();
        let before = state.foreign.reserve();
        let reserve = state.foreign.observe(reading);
        if reserve != before {
            tracing::info!(
                from = before,
                to = reserve,
                "Marketo's reports show {reserve} calls a window from outside the proxy: \
                 the proxy keeps them free"
            );
            self.pump(&mut state);
        }
    }

    /// Marketo's own count of today's calls (its usage report), taken
    /// when the proxy had made `own` of them (all it has made now, if
    /// `None`). Answers today's calls from outside the proxy it shows, and
    /// the proxy's calls Marketo refused today.
    pub fn reconcile(self: &Arc<Self>, marketo_total: u64, own: Option<u64>) -> (u64, u64) {
        let mut state = self.lock();
        state.quota.roll(self.marketo_day.now());
        state.quota.reconcile(marketo_total, own);
        self.pump(&mut state);
        (state.quota.foreign(), state.quota.refused())
    }

    /// Today's counts per service and the calls from outside the proxy.
    pub fn daily_counts(&self) -> (chrono::NaiveDate, Vec<u64>, u64) {
        let mut state = self.lock();
        state.quota.roll(self.marketo_day.now());
        let used = (0..state.lanes.len())
            .map(|service| state.quota.used_by(service))
            .collect();
        (state.quota.day(), used, state.quota.foreign())
    }

    /// Restores counts saved earlier today.
    pub fn restore(self: &Arc<Self>, day: chrono::NaiveDate, used: &[u64], foreign: u64) {
        let mut state = self.lock();
        state.quota.roll(self.marketo_day.now());
        state.quota.restore(day, used, foreign);
        self.pump(&mut state);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut state = self.lock();
        self.snapshot_of(&mut state, Instant::now())
    }

    /// Everything the status page shows of admission, with the calls per
    /// second of the last `seconds` (at most the rate history's 15
    /// minutes). Costs the same however busy the proxy is: the rate
    /// history is read back `seconds` entries at most, and the waits are
    /// per-second buckets of a minute.
    pub fn status(&self, seconds: usize) -> Status {
        let mut state = self.lock();
        let now = Instant::now();
        let snapshot = self.snapshot_of(&mut state, now);
        let exhaustion_eta = self.exhaustion_eta(&mut state, now);
        let second = state.second(now);
        let wall = self.marketo_day.now();
        Status {
            now: wall,
            next_reset: state.quota.next_reset(wall),
            timezone: state.quota.timezone(),
            calls_per_second: state.calls_per_second(second, seconds),
            window_in_flight: state.window.pending(),
            window_hold: state.window.hold(),
            daily_limit_here: state.quota.limit_here(),
            paused_for: state
                .paused_until
                .map(|until| until.saturating_duration_since(now))
                .filter(|left| !left.is_zero()),
            exhaustion_eta,
            waits: state.lanes.iter().map(|lane| lane.waits.merged(second)).collect(),
            snapshot,
        }
    }

    fn snapshot_of(&self, state: &mut State, now: Instant) -> Snapshot {
        state.quota.roll(self.marketo_day.now());
        let window_used = state.window.used(now);
        let queue = &state.queue;
        let services = state
            .lanes
            .iter_mut()
            .enumerate()
            .map(|(index, lane)| ServiceSnapshot {
                name: self.names.get(index).cloned().unwrap_or_default(),
                daily_used: 0,
                daily_cap: 0,
                reserved_daily: 0,
                window_used: lane.window.as_mut().map(|window| window.used(now)),
                window_limit: lane.window.as_ref().map(SlidingWindow::limit),
                in_flight: lane.in_flight,
                concurrency: lane.concurrency,
                queued: queue.lane_len(index),
                tally: Tally::default(),
            })
            .collect::<Vec<_>>();
        let services = services
            .into_iter()
            .enumerate()
            .map(|(index, mut service)| {
                service.daily_used = state.quota.used_by(index);
                service.tally = *state.tally(index);
                let limits = state.quota.service(index);
                service.daily_cap = limits.cap;
                service.reserved_daily = limits.reserved;
                service
            })
            .collect();
        Snapshot {
            day: state.quota.day(),
            daily_quota: state.quota.limit(),
            daily_used: state.quota.used_total(),
            daily_remaining: state.quota.remaining(),
            daily_foreign: state.quota.foreign(),
            window_used,
            window_limit: state.window.limit(),
            in_flight: state.in_flight,
            concurrency: state.concurrency,
            configured_window: state.full_window,
            configured_concurrency: state.full_concurrency,
            foreign_in_window: state.full_window.saturating_sub(state.window_left(now)),
            kept_free: state.foreign.reserve(),
            queued: state.queue.len(),
            mode: if self.observe { "observe" } else { "enforce" },
            services,
        }
    }

    /// Wakes the queue whenever a window slot frees, a pause ends or a
    /// deadline passes. Runs while it is polled, or until the admission
    /// state is dropped.
    pub fn timer(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let admission: Weak<Self> = Arc::downgrade(self);
        async move {
            loop {
                let Some(this) = admission.upgrade() else { return };
                let wake_at = this.lock().wake_at;
                let timer = Arc::clone(&this.timer);
                // Register for a notification before sleeping, so a change
                // made meanwhile is not missed.
                let notified = timer.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                drop(this);
                match wake_at {
                    Some(at) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            () = &mut notified => {}
                        }
                    }
                    None => notified.await,
                }
                let Some(this) = admission.upgrade() else { return };
                let mut state = this.lock();
                this.pump(&mut state);
            }
        }
    }

    /// Sends every call that may go now, refuses waiters whose deadline
    /// passed, and sets the next wake-up. Called with the lock held after
    /// every change.
    fn pump(self: &Arc<Self>, state: &mut State) {
        let now = Instant::now();
        let wall = self.marketo_day.now();
        state.quota.roll(wall);
        self.expire_deadlines(state, now);
        if state.paused_until.is_some_and(|until| until <= now) {
            state.paused_until = None;
        }
        self.apply_limits(state, now);
        while !state.queue.is_empty()
            && state.paused_until.is_none()
            && state.in_flight < state.concurrency
            && state.window.has_room(now)
        {
            let Some(service) = state.next_lane(now) else {
                break;
            };
            let Some(waiter) = state.queue.pop(service) else {
                break;
            };
            if waiter.reply.is_closed() {
                continue;
            }
            // Deadlines are checked at the head of each queue; one further
            // back may have passed (its request arrived earlier than those
            // ahead of it were queued).
            if waiter.deadline <= now {
                let (start, _) = state.estimate_start(service, now, false);
                let _ = waiter.reply.send(Err(AdmissionError::DeadlineExpired {
                    max_wait: waiter.deadline.saturating_duration_since(waiter.enqueued),
                    retry_after: start.saturating_duration_since(now).max(Duration::from_secs(1)),
                }));
                continue;
            }
            if let Err(scope) = state.quota.check(service, wall) {
                let retry_after = state.quota.retry_after(scope, wall);
                let _ = waiter
                    .reply
                    .send(Err(AdmissionError::Quota { scope, retry_after }));
                continue;
            }
            state.dispatch(service, now, wall);
            let wait = now.saturating_duration_since(waiter.enqueued);
            let second = state.second(now);
            let lane = &mut state.lanes[service];
            lane.wait_histogram.observe(wait.as_secs_f64());
            lane.waits.observe(second, wait);
            let permit = self.permit(state, service, now, wall, wait);
            if let Err(Ok(mut permit)) = waiter.reply.send(Ok(permit)) {
                // The waiter left between the check and the send: the call
                // was never made, so give everything back here, under the
                // lock we hold.
                permit.armed = false;
                state.undispatch(service);
            }
        }
        let wake_at = state.next_wake(now);
        if wake_at != state.wake_at {
            state.wake_at = wake_at;
            self.timer.notify_one();
        }
        self.publish(state);
    }

    fn expire_deadlines(&self, state: &mut State, now: Instant) {
        for (service, waiter) in state.queue.expire(now) {
            let (start, _) = state.estimate_start(service, now, false);
            let _ = waiter.reply.send(Err(AdmissionError::DeadlineExpired {
                max_wait: waiter.deadline.saturating_duration_since(waiter.enqueued),
                retry_after: start.saturating_duration_since(now).max(Duration::from_secs(1)),
            }));
        }
    }

    fn publish(&self, state: &mut State) {
        let now = Instant::now();
        let metrics = &self.metrics;
        metrics.inflight.set(i64::from(state.in_flight));
        metrics.window_used.set(i64::from(state.window.used(now)));
        metrics
            .daily_remaining
            .set(i64::try_from(state.quota.remaining()).unwrap_or(i64::MAX));
        metrics
            .daily_foreign
            .set(i64::try_from(state.quota.foreign()).unwrap_or(i64::MAX));
        for (index, lane) in state.lanes.iter().enumerate() {
            lane.depth_gauge
                .set(i64::try_from(state.queue.lane_len(index)).unwrap_or(i64::MAX));
            lane.used_gauge
                .set(i64::try_from(state.quota.used_by(index)).unwrap_or(i64::MAX));
        }
    }

    /// When the day's quota runs out at the rate of the last
    /// [`RATE_HORIZON`]; `None` when it will not before the reset.
    fn exhaustion_eta(&self, state: &mut State, now: Instant) -> Option<Duration> {
        let second = now.saturating_duration_since(state.started).as_secs();
        state.prune_rate_history(second);
        let remaining = state.quota.remaining();
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        let observed = now.saturating_duration_since(state.started).min(RATE_HORIZON);
        let calls: u64 = state.recent.iter().map(|(_, count)| u64::from(*count)).sum();
        if calls == 0 || observed.is_zero() {
            return None;
        }
        let per_second = calls as f64 / observed.as_secs_f64();
        let eta = Duration::try_from_secs_f64(remaining as f64 / per_second).ok()?;
        let wall = self.marketo_day.now();
        let until_reset = (state.quota.next_reset(wall) - wall).to_std().unwrap_or_default();
        (eta < until_reset).then_some(eta)
    }

    /// Brings the gauges up to date (the window empties as time passes
    /// without any call to trigger an update).
    pub fn refresh_metrics(&self) {
        let mut state = self.lock();
        state.quota.roll(self.marketo_day.now());
        self.publish(&mut state);
        let eta = self.exhaustion_eta(&mut state, Instant::now());
        self.metrics
            .quota_exhaustion_eta_seconds
            .set(eta.map_or(f64::INFINITY, |eta| eta.as_secs_f64()));
    }

    /// Service names in admission order, the proxy's own last.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index the proxy's own calls are admitted under.
    pub fn internal_service(&self) -> usize {
        self.names.len() - 1
    }

    /// Marketo's day, on the clock the quota counts by: bulk admission and
    /// the shared limits count by it too.
    pub fn marketo_day(&self) -> &MarketoDay {
        &self.marketo_day
    }

    /// The quota's current day (local date in its time zone).
    pub fn day(&self) -> chrono::NaiveDate {
        let mut state = self.lock();
        state.quota.roll(self.marketo_day.now());
        state.quota.day()
    }

    /// The quota's time zone and when the day resets.
    pub fn next_reset(&self) -> DateTime<Utc> {
        let state = self.lock();
        state.quota.next_reset(self.marketo_day.now())
    }

    fn name(&self, service: usize) -> &str {
        self.names.get(service).map_or("unknown", String::as_str)
    }

    fn leave(&self, service: usize, id: u64) {
        let mut state = self.lock();
        if state.queue.leave(service, id) {
            if let Some(lane) = state.lanes.get(service) {
                lane.depth_gauge
                    .set(i64::try_from(state.queue.lane_len(service)).unwrap_or(i64::MAX));
            }
        }
    }
}

impl State {
    /// The window limit that calls the proxy cannot see leave it: what
    /// Marketo's refusals leave, and no more than its reports leave.
    fn window_left(&self, now: Instant) -> u32 {
        let reported = self.full_window - self.foreign.reserve();
        self.learned_window.limit(now).min(reported)
    }

    /// Today's tally of `service` (a new day starts them at 0).
    fn tally(&mut self, service: usize) -> &mut Tally {
        let day = self.quota.day();
        if day != self.tallies_day {
            self.tallies_day = day;
            self.tallies
                .iter_mut()
                .for_each(|tally| *tally = Tally::default());
        }
        &mut self.tallies[service]
    }

    /// Whether a call of `service` arriving now would go at once: nothing
    /// ahead of it in its queue and room in every limit.
    fn can_start_now(&mut self, service: usize, now: Instant) -> bool {
        if self.paused_until.is_some_and(|until| until > now)
            || self.in_flight >= self.concurrency
            || !self.window.has_room(now)
        {
            return false;
        }
        let lane = &mut self.lanes[service];
        self.queue.lane_len(service) == 0
            && lane.in_flight < lane.concurrency
            && lane.window.as_mut().is_none_or(|window| window.has_room(now))
    }

    /// The service to serve next: of those whose head may go now (room in
    /// their own limits), the one fair queueing picks.
    fn next_lane(&mut self, now: Instant) -> Option<usize> {
        let lanes = &mut self.lanes;
        self.queue.next_lane(|index| {
            let lane = &mut lanes[index];
            lane.in_flight < lane.concurrency
                && lane.window.as_mut().is_none_or(|window| window.has_room(now))
        })
    }

    /// Whole seconds since admission started: the rate history's clock.
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs()
    }

    /// Calls sent in each of the `seconds` seconds up to `second`, oldest
    /// first, from the rate history (which holds at most its horizon).
    fn calls_per_second(&self, second: u64, seconds: usize) -> Vec<u32> {
        let mut calls = vec![0; seconds];
        for (sent, count) in self.recent.iter().rev() {
            let Some(back) = usize::try_from(second.saturating_sub(*sent))
                .ok()
                .filter(|back| *back < seconds)
            else {
                break;
            };
            calls[seconds - 1 - back] = *count;
        }
        calls
    }

    fn dispatch(&mut self, service: usize, now: Instant, wall: DateTime<Utc>) {
        let second = self.second(now);
        match self.recent.back_mut() {
            Some((last, count)) if *last == second => *count += 1,
            _ => {
                self.prune_rate_history(second);
                self.recent.push_back((second, 1));
            }
        }
        self.window.acquire();
        self.in_flight += 1;
        self.quota.consume(service, wall);
        let lane = &mut self.lanes[service];
        if let Some(window) = lane.window.as_mut() {
            window.acquire();
        }
        lane.in_flight += 1;
        self.queue.served(service);
    }

    /// Drops the per-second counts more than [`RATE_HORIZON`] older than
    /// `second`: the forecast no longer looks at them.
    fn prune_rate_history(&mut self, second: u64) {
        while self
            .recent
            .front()
            .is_some_and(|(sent, _)| second.saturating_sub(*sent) > RATE_HORIZON.as_secs())
        {
            self.recent.pop_front();
        }
    }

    /// Undoes [`dispatch`] for a call that was never sent.
    ///
    /// [`dispatch`]: Self::dispatch
    fn undispatch(&mut self, service: usize) {
        if let Some((_, count)) = self.recent.back_mut() {
            *count = count.saturating_sub(1);
        }
        self.window.release_unsent();
        self.in_flight -= 1;
        self.quota.unconsume(service);
        let lane = &mut self.lanes[service];
        if let Some(window) = lane.window.as_mut() {
            window.release_unsent();
        }
        lane.in_flight -= 1;
    }

    /// When a request of `service` joining the queue now could start, and
    /// the window that decides it.
    fn estimate_start(&mut self, service: usize, now: Instant, front: bool) -> (Instant, RateScope) {
        let own_ahead = if front { 0 } else { self.queue.lane_len(service) };
        let latency = self.latency;
        let instance = self
            .window
            .estimate_start(now, self.queue.ahead_of(service, front), latency);
        let own = self.lanes[service]
            .window
            .as_mut()
            .map(|window| window.estimate_start(now, own_ahead, latency));
        let paused = self.paused_until.unwrap_or(now);
        match own {
            Some(own) if own > instance => (own.max(paused), RateScope::Service),
            _ => (instance.max(paused), RateScope::Instance),
        }
    }

    /// The next moment something may change without a call ending.
    fn next_wake(&mut self, now: Instant) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = Some(wake.map_or(at, |current| current.min(at)));
            }
        };
        consider(self.paused_until);
        if !self.queue.is_empty() {
            consider(self.learned_window.next_rise(now));
            consider(self.learned_concurrency.next_rise(now));
        }
        consider(self.queue.next_deadline());
        if !self.queue.is_empty() {
            consider(self.window.next_free(now).filter(|at| *at > now));
            for (index, lane) in self.lanes.iter_mut().enumerate() {
                if self.queue.lane_len(index) > 0 {
                    if let Some(window) = lane.window.as_mut() {
                        consider(window.next_free(now).filter(|at| *at > now));
                    }
                }
            }
        }
        wake
    }
}

/// The right to have one call in flight. Stamp it with [`answered`] when
/// Marketo's answer arrives; drop it when the answer has been passed on
/// (its body fully sent or dropped) to free the concurrency slot.
///
/// [`answered`]: Permit::answered
pub struct Permit {
    admission: Arc<Admission>,
    service: usize,
    sent_at: Instant,
    /// When it was sent by the wall clock, epoch milliseconds.
    sent_wall: i64,
    queue_wait: Duration,
    stamped: bool,
    armed: bool,
    /// This replica's fall backs to its share when the call was admitted.
    fallbacks: u64,
    /// The proxy's calls today when this one was sent, itself included;
    /// for the proxy's own calls only.
    day_count: Option<u64>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("service", &self.service)
            .field("queue_wait", &self.queue_wait)
            .field("stamped", &self.stamped)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// The call was not made after all (the shared limits said no):
    /// everything it took is given back.
    pub fn unsent(mut self) {
        self.armed = false;
        let admission = Arc::clone(&self.admission);
        let mut state = admission.lock();
        state.undispatch(self.service);
        admission.pump(&mut state);
    }

    /// When the call was sent.
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// How long the request waited in the queue.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// Whether this replica fell back to its share of the limits since
    /// the call was admitted: admitted under other limits and counted as
    /// holding nothing by the share, it must be admitted again under it.
    pub fn admitted_before_fallback(&self) -> bool {
        self.fallbacks != self.admission.lock().fallbacks
    }

    /// Marketo's answer arrived: the window slot starts its countdown.
    pub fn answered(&mut self) {
        self.answered_by(None);
    }

    /// Marketo's answer arrived, saying its clock read `marketo` (epoch
    /// ms) when it took the call: the window slot counts from then by our
    /// clock, at the latest (see [`marketo_clock`]), or from now. Says how
    /// much earlier than now that is.
    pub fn answered_by(&mut self, marketo: Option<i64>) -> Duration {
        if self.stamped || !self.armed {
            return Duration::ZERO;
        }
        self.stamped = true;
        let now = Instant::now();
        let mut state = self.admission.lock();
        let earlier = match (marketo, state.marketo_clock.as_mut()) {
            (Some(marketo), Some(clock)) => {
                let received = self.admission.marketo_day.now().timestamp_millis();
                Self::earlier(clock.took(self.sent_wall, received, marketo, now), received)
            }
            _ => Duration::ZERO,
        };
        let at = now.checked_sub(earlier).unwrap_or(now);
        state.window.stamp(at);
        if let Some(window) = state.lanes[self.service].window.as_mut() {
            window.stamp(at);
        }
        // Smooth over roughly the last ten answers.
        let latency = now.saturating_duration_since(self.sent_at);
        state.latency = (state.latency * 9 + latency) / 10;
        self.admission.pump(&mut state);
        earlier
    }
}

impl Permit {
    /// How much earlier than `received` (epoch ms) Marketo's clock says it
    /// took the call; nothing when its time could not be used.
    fn earlier(took: Result<i64, marketo_clock::Unusable>, received: i64) -> Duration {
        match took {
            Ok(took) => Duration::from_millis(u64::try_from(received - took).unwrap_or(0)),
            Err(marketo_clock::Unusable::Outside(by)) => {
                tracing::warn!(
                    off_by_ms = by,
                    off_for_seconds = marketo_clock::OFF_FOR.as_secs(),
                    "the time in Marketo's requestId cannot be when it took the call (its clock jumped, \
                     or the field is not a clock): window slots count from the answer for a while"
                );
                Duration::ZERO
            }
            Err(marketo_clock::Unusable::Off) => Duration::ZERO,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // A call that ended without an answer may still have reached
        // Marketo: count it as answered now.
        self.answered();
        let admission = Arc::clone(&self.admission);
        let mut state = admission.lock();
        state.in_flight -= 1;
        state.lanes[self.service].in_flight -= 1;
        admission.pump(&mut state);
    }
}

/// What one call to Marketo holds while it runs: its [`Permit`] in this
/// replica's limits and, when replicas share the instance, its [`Lease`]
/// on the shared ones. Dropping it gives both back.
///
/// [`Lease`]: shared::Lease
#[derive(Debug)]
pub struct Slot {
    permit: Permit,
    lease: Option<shared::Lease>,
}

impl Slot {
    pub fn new(permit: Permit, lease: Option<shared::Lease>) -> Self {
        Self { permit, lease }
    }

    /// This replica's calls today when this one was sent, itself
    /// included: what Marketo had counted of them when it counted this
    /// one, but for calls sent at the same moment. Known for the proxy's
    /// own calls only.
    pub fn day_count(&self) -> Option<u64> {
        self.permit.day_count
    }

    /// A slot in this replica's limits only.
    pub fn local(permit: Permit) -> Self {
        Self { permit, lease: None }
    }

    /// When the call was sent.
    pub fn sent_at(&self) -> Instant {
        self.permit.sent_at()
    }

    /// Whether this call probes, for every replica, whether Marketo's day
    /// is spent after its 607.
    pub fn is_shared_probe(&self) -> bool {
        self.lease.as_ref().is_some_and(shared::Lease::is_probe)
    }

    /// Marketo's answer arrived: the window slots start their countdown.
    pub async fn answered(&mut self) {
        self.answered_by(None).await;
    }

    /// Marketo's answer arrived with its clock at `marketo` (see
    /// [`Permit::answered_by`]).
    pub async fn answered_by(&mut self, marketo: Option<i64>) {
        let earlier = self.permit.answered_by(marketo);
        if let Some(lease) = self.lease.as_mut() {
            lease.answered(earlier).await;
        }
    }

    /// The call was never sent: this replica's limits get back everything
    /// it took. (A shared window slot is not taken back: another replica
    /// may already have counted it.)
    pub fn unsent(self) {
        self.permit.unsent();
    }

    /// Keeps the slot for `grace` after a call that got no answer: Marketo
    /// may still be executing it, and its window slot counts from now.
    /// Held on `tasks` until the server stops.
    pub fn hold_for(mut self, grace: Duration, tasks: &Tasks) {
        self.permit.answered();
        tasks.until_stopped(async move {
            tokio::time::sleep(grace).await;
            drop(self);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `per_second` calls each second for `seconds`, each answered
    /// at once; returns the most seconds the rate history held meanwhile.
    async fn send_every_second(admission: &Arc<Admission>, seconds: u64, per_second: u32) -> usize {
        let mut longest = 0;
        for _ in 0..seconds {
            for _ in 0..per_second {
                let deadline = Instant::now() + Duration::from_secs(1);
                drop(admission.admit(0, deadline, false).await.unwrap());
            }
            longest = longest.max(admission.lock().recent.len());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        longest
    }

    #[tokio::test(start_paused = true)]
    async fn losing_the_shared_state_leaves_each_replica_its_part_of_what_is_left() {
        let yaml = "marketo: { base_url: 'http://127.0.0.1:1', client_id: id, client_secret: secret }\n\
                    limits: { window_calls: 100, concurrency: 10 }\n\
                    services:\n  - { name: a, api_key: key-a-0123456789abcdef }\n\
                    state: { file: ~ }\n";
        let config = Config::from_yaml_with_env(yaml, |_| None).unwrap();
        let admission = Admission::new(&config, Metrics::new());
        let deadline = || Instant::now() + Duration::from_secs(60);
        // Here: 10 calls answered, 2 in flight, 1 still waiting for the
        // shared grant (2 of the 3 hold one). The instance: 72 slots and 6
        // calls in flight.
        for _ in 0..10 {
            drop(admission.admit(0, deadline(), false).await.unwrap());
        }
        let mut running = Vec::new();
        for _ in 0..3 {
            running.push(admission.admit(0, deadline(), false).await.unwrap());
        }
        let instance = InstanceUse {
            window: 72,
            in_flight: 6,
            day_used: 5000,
        };
        admission.split_what_is_left(4, instance, 2);
        assert!(
            running.iter().all(Permit::admitted_before_fallback),
            "the one without a grant is admitted again"
        );
        let (window, concurrency) = {
            let state = admission.lock();
            (state.window.limit(), state.concurrency)
        };
        // Its 12 slots and (100 - 72) / 4 more; its 2 calls and (10 - 6) / 4.
        assert_eq!(window, 12 + 7);
        assert_eq!(concurrency, 2 + 1);
        // Once the others' calls are surely over: a plain quarter.
        admission.set_fallback_split(4);
        {
            let state = admission.lock();
            assert_eq!((state.window.limit(), state.concurrency), (25, 2));
            assert_eq!(state.quota.limit_here(), 13 + (50_000 - 5000) / 4);
        }
        drop(running);
        let admitted_since = admission.admit(0, deadline(), false).await.unwrap();
        assert!(!admitted_since.admitted_before_fallback());
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_has_calls_per_second_slots_in_flight_and_waits() {
        let yaml = "marketo: { base_url: 'http://127.0.0.1:1', client_id: id, client_secret: secret }\n\
                    limits: { concurrency: 1, max_queue_wait: 1h }\n\
                    services:\n  - { name: a, api_key: key-a-0123456789abcdef }\n\
                    state: { file: ~ }\n";
        let config = Config::from_yaml_with_env(yaml, |_| None).unwrap();
        let admission = Admission::new(&config, Metrics::new());
        let deadline = || Instant::now() + Duration::from_secs(60);
        // Second 0: two calls, the second queued 300 ms behind the first.
        let first = admission.admit(0, deadline(), false).await.unwrap();
        let queued = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit(0, deadline(), false).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(first);
        drop(queued.await.unwrap());
        // Second 2: one call, still in flight.
        tokio::time::advance(Duration::from_secs(2)).await;
        let in_flight = admission.admit(0, deadline(), false).await.unwrap();

        let status = admission.status(4);
        assert_eq!(status.calls_per_second, [0, 2, 0, 1]);
        assert_eq!((status.snapshot.window_used, status.window_in_flight), (3, 1));
        let waits = status.waits[0];
        assert_eq!(waits.total(), 3);
        // Two of three waited nothing; the slowest wait is in (0.25, 0.5].
        assert!(waits.quantile(0.5).unwrap() <= Duration::from_millis(1));
        let p99 = waits.quantile(0.99).unwrap();
        assert!(
            p99 > Duration::from_millis(250) && p99 <= Duration::from_millis(500),
            "{p99:?}"
        );
        drop(in_flight);

        // A minute later the waits are forgotten; the timeline only ever
        // covers the seconds asked for.
        tokio::time::advance(Duration::from_secs(61)).await;
        let status = admission.status(4);
        assert_eq!(status.calls_per_second, [0, 0, 0, 0]);
        assert_eq!(status.waits[0].total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_history_stays_within_the_horizon_without_scrapes() {
        let yaml = "marketo: { base_url: 'http://127.0.0.1:1', client_id: id, client_secret: secret }\n\
                    limits: { window_calls: 100000, daily_quota: 15300, max_queue_wait: 1h }\n\
                    services:\n  - { name: a, api_key: key-a-0123456789abcdef }\n\
                    state: { file: ~ }\n";
        let config = Config::from_yaml_with_env(yaml, |_| None).unwrap();
        // Noon in Chicago throughout: the reset stays twelve hours away.
        let noon: DateTime<Utc> = "2026-11-28T18:00:00Z".parse().unwrap();
        let metrics = Metrics::new();
        let admission = Admission::with_clock(&config, metrics.clone(), Arc::new(move || noon));

        // Two hours without a scrape: 105 minutes at two calls a second,
        // then 15 at one (13,500 calls, 1,800 of the quota left).
        let busy = send_every_second(&admission, 105 * 60, 2).await;
        let calm = send_every_second(&admission, 15 * 60, 1).await;

        // A count for each second of the horizon and the one it began in.
        let horizon = usize::try_from(RATE_HORIZON.as_secs()).unwrap();
        assert!(busy.max(calm) <= horizon + 1, "kept {busy} and {calm} seconds");
        assert!(admission.lock().recent.len() >= horizon);
        // The forecast still sees the last 15 minutes, and only them: one
        // call a second leaves 1,800 s.
        admission.refresh_metrics();
        let eta = metrics.quota_exhaustion_eta_seconds.get();
        assert!((eta - 1800.0).abs() < 1.0, "{eta}");
    }
}
