//! Where admission stands, for `/usage`, the status page, the metrics and
//! each service's `RateLimit` fields; read under the one lock so the
//! figures agree.

use super::*;

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

    pub(super) fn snapshot_of(&self, state: &mut State, now: Instant) -> Snapshot {
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

    pub(super) fn publish(&self, state: &mut State) {
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
    pub(super) fn exhaustion_eta(&self, state: &mut State, now: Instant) -> Option<Duration> {
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
}

impl State {
    /// Today's tally of `service` (a new day starts them at 0).
    pub(super) fn tally(&mut self, service: usize) -> &mut Tally {
        let day = self.quota.day();
        if day != self.tallies_day {
            self.tallies_day = day;
            self.tallies
                .iter_mut()
                .for_each(|tally| *tally = Tally::default());
        }
        &mut self.tallies[service]
    }

    /// Whole seconds since admission started: the rate history's clock.
    pub(super) fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs()
    }

    /// Calls sent in each of the `seconds` seconds up to `second`, oldest
    /// first, from the rate history (which holds at most its horizon).
    pub(super) fn calls_per_second(&self, second: u64, seconds: usize) -> Vec<u32> {
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

    /// Drops the per-second counts more than [`RATE_HORIZON`] older than
    /// `second`: the forecast no longer looks at them.
    pub(super) fn prune_rate_history(&mut self, second: u64) {
        while self
            .recent
            .front()
            .is_some_and(|(sent, _)| second.saturating_sub(*sent) > RATE_HORIZON.as_secs())
        {
            self.recent.pop_front();
        }
    }
}
