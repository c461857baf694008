//! What happened lately, for the status page: queue waits over the last
//! minute, local refusals and replays over the last hour.
//!
//! Everything here sits in fixed rings of time buckets (one per second for
//! the minute, one per minute for the hour), so memory is set by the
//! number of services, and reading a figure costs the same however much
//! traffic there was. A bucket is reused when its period comes round
//! again; one that was not written for a whole turn reads as empty.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::BUCKETS;

/// A ring of `N` buckets, one per period (a second, a minute), keyed by
/// the period's number since some start.
#[derive(Debug, Clone)]
pub struct BucketRing<T, const N: usize> {
    slots: [(u64, T); N],
}

impl<T: Default + Copy, const N: usize> Default for BucketRing<T, N> {
    fn default() -> Self {
        Self {
            slots: [(0, T::default()); N],
        }
    }
}

impl<T: Default + Copy, const N: usize> BucketRing<T, N> {
    /// The bucket of `period`, emptied first if it last held an older one.
    pub fn at(&mut self, period: u64) -> &mut T {
        let slot = &mut self.slots[(period % N as u64) as usize];
        if slot.0 != period {
            *slot = (period, T::default());
        }
        &mut slot.1
    }

    /// The buckets of the last `N` periods up to `period`, in no order.
    pub fn recent(&self, period: u64) -> impl Iterator<Item = &T> {
        self.slots
            .iter()
            .filter(move |(at, _)| *at <= period && period - *at < N as u64)
            .map(|(_, value)| value)
    }
}

/// Counts of queue waits per histogram bucket: the `le` bounds of
/// `marketo_proxy_queue_wait_seconds`, then one for longer waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitCounts([u32; BUCKETS.len() + 1]);

impl Default for WaitCounts {
    fn default() -> Self {
        Self([0; BUCKETS.len() + 1])
    }
}

impl WaitCounts {
    fn observe(&mut self, wait: Duration) {
        let seconds = wait.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.0[bucket] = self.0[bucket].saturating_add(1);
    }

    fn add(&mut self, other: &Self) {
        for (count, more) in self.0.iter_mut().zip(other.0) {
            *count = count.saturating_add(more);
        }
    }

    /// How many waits were counted.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|count| u64::from(*count)).sum()
    }

    /// The `q` quantile, estimated as Prometheus' `histogram_quantile`
    /// does (linear within a bucket; the highest finite bound for waits
    /// beyond it), so it agrees with a dashboard reading the histogram.
    /// `None` without waits.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0.0;
        for (index, count) in self.0.iter().enumerate() {
            let count = f64::from(*count);
            if below + count >= rank && count > 0.0 {
                let Some(upper) = BUCKETS.get(index) else {
                    return Some(Duration::from_secs_f64(BUCKETS[BUCKETS.len() - 1]));
                };
                let lower = if index == 0 { 0.0 } else { BUCKETS[index - 1] };
                let seconds = lower + (upper - lower) * (rank - below) / count;
                return Some(Duration::from_secs_f64(seconds));
            }
            below += count;
        }
        Some(Duration::from_secs_f64(BUCKETS[BUCKETS.len() - 1]))
    }
}

/// One service's queue waits over the last minute, a bucket a second.
#[derive(Debug, Clone, Default)]
pub struct LastMinuteWaits {
    ring: BucketRing<WaitCounts, 60>,
}

impl LastMinuteWaits {
    /// Counts a wait that ended in `second`.
    pub fn observe(&mut self, second: u64, wait: Duration) {
        self.ring.at(second).observe(wait);
    }

    /// Every wait of the minute up to `second`, merged.
    pub fn merged(&self, second: u64) -> WaitCounts {
        let mut merged = WaitCounts::default();
        for counts in self.ring.recent(second) {
            merged.add(counts);
        }
        merged
    }
}

/// Which local refusal a request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Marketo's 606: not admitted within the queue wait, or queue full.
    Rate,
    /// Marketo's 607: the day's quota (the instance's, the service's cap,
    /// or what others' reserves leave) is spent.
    Quota,
}

/// What one service had in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HourCounts {
    /// Answered locally with 606.
    pub refused_rate: u64,
    /// Answered locally with 607.
    pub refused_quota: u64,
    /// Calls sent again (601/602, 606, 615, transient failures).
    pub replays: u64,
}

impl HourCounts {
    fn add(&mut self, other: &Self) {
        self.refused_rate += other.refused_rate;
        self.refused_quota += other.refused_quota;
        self.replays += other.replays;
    }
}

/// Local refusals and replays per service over the last hour, a bucket a
/// minute. The same events count in `marketo_proxy_requests_total`
/// (`rejected_rate`, `rejected_queue`, `rejected_quota`) and
/// `marketo_proxy_replays_total`.
pub struct LastHour {
    started: Instant,
    services: Mutex<Vec<BucketRing<HourCounts, 60>>>,
}

impl LastHour {
    /// Counts for `services` services (ids `0..services`).
    pub fn new(services: usize) -> Self {
        Self {
            started: Instant::now(),
            services: Mutex::new(vec![BucketRing::default(); services]),
        }
    }

    fn minute(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / 60
    }

    fn record(&self, service: usize, count: impl FnOnce(&mut HourCounts)) {
        let minute = self.minute(Instant::now());
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ring) = services.get_mut(service) {
            count(ring.at(minute));
        }
    }

    /// `service` got a local refusal.
    pub fn refused(&self, service: usize, refusal: Refusal) {
        self.record(service, |counts| match refusal {
            Refusal::Rate => counts.refused_rate += 1,
            Refusal::Quota => counts.refused_quota += 1,
        });
    }

    /// A call of `service` was sent again.
    pub fn replayed(&self, service: usize) {
        self.record(service, |counts| counts.replays += 1);
    }

    /// Each service's counts over the last hour, by id.
    pub fn counts(&self) -> Vec<HourCounts> {
        let minute = self.minute(Instant::now());
        let services = self
            .services
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        services
            .iter()
            .map(|ring| {
                let mut sum = HourCounts::default();
                for counts in ring.recent(minute) {
                    sum.add(counts);
                }
                sum
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_forgets_what_is_older_than_its_length() {
        let mut ring: BucketRing<u32, 3> = BucketRing::default();
        *ring.at(10) += 1;
        *ring.at(11) += 2;
        *ring.at(12) += 4;
        assert_eq!(ring.recent(12).sum::<u32>(), 7);
        // Period 13 reuses 10's bucket; 10 is out of reach anyway.
        assert_eq!(ring.recent(13).sum::<u32>(), 6);
        *ring.at(13) += 8;
        assert_eq!(ring.recent(13).sum::<u32>(), 14);
        // Long after, nothing is left, whatever the buckets still hold.
        assert_eq!(ring.recent(100).sum::<u32>(), 0);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket_as_prometheus_does() {
        let mut counts = WaitCounts::default();
        assert_eq!(counts.quantile(0.5), None);
        // 10 waits in (0.1, 0.25]: the median is halfway through it.
        for _ in 0..10 {
            counts.observe(Duration::from_millis(200));
        }
        let median = counts.quantile(0.5).unwrap().as_secs_f64();
        assert!((median - 0.175).abs() < 1e-9, "{median}");
        // One wait beyond the last bound: p99 of 11 lands on it and reads
        // as the highest finite bound.
        counts.observe(Duration::from_secs(600));
        assert_eq!(counts.quantile(0.99), Some(Duration::from_secs(60)));
        assert_eq!(counts.total(), 11);
    }

    #[test]
    fn waits_count_for_a_minute() {
        let mut waits = LastMinuteWaits::default();
        waits.observe(5, Duration::from_millis(1));
        waits.observe(30, Duration::from_secs(2));
        assert_eq!(waits.merged(30).total(), 2);
        assert_eq!(
            waits.merged(64).total(),
            2,
            "second 5 is within the minute up to 64"
        );
        assert_eq!(waits.merged(65).total(), 1, "second 5 is more than a minute old");
        assert_eq!(waits.merged(90).total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_hour_counts_per_service_and_forgets_older_minutes() {
        let hour = LastHour::new(2);
        hour.refused(0, Refusal::Rate);
        hour.refused(0, Refusal::Quota);
        hour.replayed(1);
        hour.replayed(7); // not a service: ignored
        tokio::time::advance(Duration::from_secs(30 * 60)).await;
        hour.replayed(1);
        let counts = hour.counts();
        assert_eq!(
            counts[0],
            HourCounts {
                refused_rate: 1,
                refused_quota: 1,
                replays: 0
            }
        );
        assert_eq!(counts[1].replays, 2);
        tokio::time::advance(Duration::from_secs(31 * 60)).await;
        let counts = hour.counts();
        assert_eq!(counts[0], HourCounts::default());
        assert_eq!(counts[1].replays, 1);
    }
}
