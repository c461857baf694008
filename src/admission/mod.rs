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

mod error;
pub mod fallback;
pub mod foreign;
pub mod learn;
pub mod marketo_clock;
mod permit;
mod queue;
pub mod quota;
pub mod shared;
mod status;
pub mod window;

pub use error::{AdmissionError, RateScope};
pub use permit::{Permit, Slot};
pub use status::{PolicyStanding, Saved, ServiceSnapshot, Snapshot, Standing, Status, Tally};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Config, INTERNAL_SERVICE, LimitsMode};
use crate::limits::day::MarketoDay;
use crate::limits::fair_queue::{FairQueue, Waiting};
use crate::metrics::Metrics;
use crate::recent::{LastMinuteWaits, WaitCounts};
use crate::tasks::Tasks;
use fallback::FallbackShare;
use foreign::ForeignRate;
use learn::{Episode, Learned};
use marketo_clock::MarketoClock;
use prometheus::{Histogram, IntCounter, IntGauge};
use quota::{DailyQuota, QuotaScope, ServiceQuota};
use window::SlidingWindow;

pub use crate::limits::day::WallClock;

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
    /// While the shared state is lost: how the window split grows as the
    /// slots the instance held then free (see [`fallback`]).
    fallback_share: Option<FallbackShare>,
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
            for code in crate::marketo::UNCOUNTED {
                metrics.uncounted.with_label_values(&[name, code]);
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
            fallback_share: None,
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

    /// Whether the limits are only observed (`limits.mode: observe`).
    pub fn observes(&self) -> bool {
        self.observe
    }

    /// Enforces `1 / replicas` of the instance's limits here (the shared
    /// state that spans replicas is unreachable, and what the others hold
    /// is unknown), or all of them again with 1. A day already split
    /// stays split as it was.
    pub fn set_fallback_split(self: &Arc<Self>, replicas: u32) {
        let replicas = replicas.max(1);
        let mut state = self.lock();
        state.fallback_share = None;
        state.window_split = (state.full_window / replicas).max(1);
        state.concurrency_split = (state.full_concurrency / replicas).max(1);
        let used = state.quota.used_total();
        state.quota.set_fallback_split(u64::from(replicas), used);
        self.metrics.window_limit.set(i64::from(state.window_split));
        self.pump(&mut state);
    }

    /// The shared state was lost just now: enforce here this replica's
    /// part of what the instance had left, as last seen there. Its window
    /// split grows as the slots the instance held then free
    /// (`instance_frees`; a call in flight frees within `pending`, and the
    /// others may have made `unseen` calls since; see [`fallback`]); its
    /// concurrency split is its
    /// own calls in flight and a part of what the others left, until
    /// [`set_fallback_split`] once their calls are surely over.
    ///
    /// [`set_fallback_split`]: Self::set_fallback_split
    /// `granted` of the calls admitted here hold a grant of the shared
    /// state. The others were still waiting for one (asking, or between
    /// two asks): they hold nothing there and are admitted again (see
    /// [`Permit::admitted_before_fallback`]).
    pub fn split_what_is_left(
        self: &Arc<Self>,
        replicas: u32,
        instance: InstanceUse,
        instance_frees: Vec<Instant>,
        pending: Duration,
        unseen: u32,
        granted: u32,
    ) {
        let replicas = replicas.max(1);
        let mut state = self.lock();
        state.fallbacks += 1;
        let unsent = state.in_flight.saturating_sub(granted);
        let now = Instant::now();
        let (own_answered, _) = state.window.taken(now);
        let share = FallbackShare::after_loss(
            replicas,
            state.full_window,
            instance_frees,
            own_answered.into_iter().map(|left| now + left).collect(),
            now,
            pending,
            unseen,
        );
        let window = share.split_at(state.full_window, now);
        state.fallback_share = Some(share);
        let own_in_flight = state.in_flight.saturating_sub(unsent);
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
        if let Some(share) = &state.fallback_share {
            let split = share.split_at(state.full_window, now);
            if split != state.window_split {
                state.window_split = split;
                self.metrics.window_limit.set(i64::from(split));
            }
            if share.is_settled(now) {
                state.fallback_share = None;
            }
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
}

impl State {
    /// The window limit that calls the proxy cannot see leave it: what
    /// Marketo's refusals leave, and no more than its reports leave.
    fn window_left(&self, now: Instant) -> u32 {
        let reported = self.full_window - self.foreign.reserve();
        self.learned_window.limit(now).min(reported)
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
        // Its own 10 answered slots free after the hold; 56 of the others'
        // in 5 s, and the 6 calls in flight after their pending hold.
        let now = Instant::now();
        let hold = admission.lock().window.hold();
        let frees = [
            vec![now + hold; 10],
            vec![now + Duration::from_secs(5); 56],
            vec![now + Duration::from_secs(80); 6],
        ]
        .concat();
        admission.split_what_is_left(4, instance, frees, Duration::from_secs(80), 4, 2);
        assert!(
            running.iter().all(Permit::admitted_before_fallback),
            "the one without a grant is admitted again"
        );
        let limits = || {
            let mut state = admission.lock();
            admission.apply_limits(&mut state, Instant::now());
            (state.window.limit(), state.concurrency)
        };
        // Its 10 answered slots and a quarter of the window left by the 72
        // and 4 calls the others may have made since; its 2 calls and
        // (10 - 6) / 4.
        assert_eq!(limits(), (10 + 6, 2 + 1));
        // The others' answered slots free: a quarter of those 56 more.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(limits().0, 10 + 20);
        // One hold on, its own are free too: a quarter of what the calls
        // that may be in flight leave.
        tokio::time::advance(hold).await;
        assert_eq!(limits().0, (100 - 6 - 4) / 4);
        tokio::time::advance(Duration::from_secs(80)).await;
        assert_eq!(limits().0, 25);
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
