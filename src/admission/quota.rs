//! The daily quota: calls per day for the instance and each service, with
//! reserves, in the instance's time zone.
//!
//! Marketo resets the quota at midnight US Central time: the day and its
//! reset are [`MarketoDay`]'s. Wall-clock time is passed in, so the counts
//! here are a pure function of it.
//!
//! Marketo's own word that the day is spent (607) holds only until a probe
//! time: its reset may come a little after ours (clock skew, or a
//! "midnight" that does not follow daylight saving), so a 607 just after
//! midnight must not refuse every service for the whole new day. When the
//! probe time comes, one call goes through; until its answer is known the
//! others still wait.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::limits::day::MarketoDay;

/// Retry-After for a refusal until the reset is spread over this long
/// after it, so that every client does not come back at the same instant.
pub const RESET_JITTER: Duration = Duration::from_secs(5 * 60);

pub use crate::limits::rules::QuotaScope;
use crate::limits::rules::{held_for_others, one_more_call};

/// One service's daily limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServiceQuota {
    pub cap: u64,
    pub reserved: u64,
}

/// Today's counts.
#[derive(Debug, Clone)]
pub struct DailyQuota {
    marketo_day: MarketoDay,
    limit: u64,
    services: Vec<ServiceQuota>,
    day: NaiveDate,
    used: Vec<u64>,
    /// Calls Marketo counted today that did not go through this proxy.
    foreign: u64,
    /// Calls of this proxy Marketo refused today for its window or
    /// concurrency (606, 615): its error report counts them too.
    refused: u64,
    /// Marketo answered 607: no call before this instant, whatever the
    /// counts say; then one probe, which moves it on again until its
    /// answer clears it.
    spent_until: Option<DateTime<Utc>>,
    /// How long a 607 holds before a probe.
    probe_after: Duration,
    /// Set while replicas that cannot see each other's counts (shared
    /// state unreachable) split what was left of the day.
    split: Option<Split>,
}

/// This replica's part of what the day had left when the replicas lost
/// sight of each other's counts.
#[derive(Debug, Clone, Copy)]
struct Split {
    replicas: u64,
    /// Calls counted here when the split began.
    base: u64,
    /// Calls this replica may make after that.
    allowance: u64,
}

impl DailyQuota {
    pub fn new(
        marketo_day: MarketoDay,
        limit: u64,
        services: Vec<ServiceQuota>,
        probe_after: Duration,
        now: DateTime<Utc>,
    ) -> Self {
        let used = vec![0; services.len()];
        Self {
            day: marketo_day.date_at(now),
            marketo_day,
            limit,
            services,
            used,
            foreign: 0,
            refused: 0,
            spent_until: None,
            probe_after,
            split: None,
        }
    }

    /// Splits what is left of the day between `replicas` that cannot see
    /// each other's counts, the whole instance having used `instance_used`
    /// as far as this replica knows; 1 is the whole quota again.
    pub fn set_fallback_split(&mut self, replicas: u64, instance_used: u64) {
        if replicas <= 1 {
            self.split = None;
            return;
        }
        if self.split.is_some_and(|split| split.replicas == replicas) {
            return;
        }
        let base = self.used_total();
        let left = self.limit.saturating_sub(base.max(instance_used));
        self.split = Some(Split {
            replicas,
            base,
            allowance: left / replicas,
        });
    }

    /// Starts a new day when local midnight has passed.
    pub fn roll(&mut self, now: DateTime<Utc>) {
        let today = self.marketo_day.date_at(now);
        if today != self.day {
            self.day = today;
            self.used.iter_mut().for_each(|used| *used = 0);
            self.foreign = 0;
            self.refused = 0;
            self.spent_until = None;
        }
    }

    pub fn day(&self) -> NaiveDate {
        self.day
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// How many replicas the quota is split between (1: not split).
    pub fn split(&self) -> u64 {
        self.split.map_or(1, |split| split.replicas)
    }

    /// The most calls this replica may count today: the quota, or while it
    /// is split, what was counted then and this replica's part of the rest.
    pub fn limit_here(&self) -> u64 {
        self.split
            .map_or(self.limit, |split| split.base + split.allowance)
    }

    /// The zone whose midnight starts a new day.
    pub fn timezone(&self) -> Tz {
        self.marketo_day.zone()
    }

    /// Calls counted today: this proxy's and, after reconciliation, others'.
    pub fn used_total(&self) -> u64 {
        self.used.iter().sum::<u64>() + self.foreign
    }

    pub fn used_by(&self, service: usize) -> u64 {
        self.used.get(service).copied().unwrap_or(0)
    }

    /// Calls left today; none while Marketo's 607 holds.
    pub fn remaining(&self) -> u64 {
        if self.spent_until.is_some() {
            0
        } else {
            self.counted_remaining()
        }
    }

    /// Calls left today by the counts alone.
    fn counted_remaining(&self) -> u64 {
        self.limit_here().saturating_sub(self.used_total())
    }

    /// Whether `service` may make one more call today, at `now`.
    pub fn check(&self, service: usize, now: DateTime<Utc>) -> Result<(), QuotaScope> {
        if self.spent_until.is_some_and(|until| now < until) {
            return Err(QuotaScope::Instance);
        }
        let own = self.services.get(service).copied().unwrap_or_default();
        one_more_call(
            self.counted_remaining(),
            self.used_by(service),
            own.cap,
            self.held_for_others(service),
        )
    }

    /// What other services' reserves still hold back from `service`.
    fn held_for_others(&self, service: usize) -> u64 {
        held_for_others(
            self.services
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != service)
                .map(|(other, quota)| (quota.reserved, self.used_by(other))),
        )
    }

    /// The calls `service` may make in a day: its cap, within this
    /// replica's share of the instance's quota.
    pub fn quota_of(&self, service: usize) -> u64 {
        self.service(service).cap.min(self.limit_here())
    }

    /// The calls `service` may still make today at `now`, as [`check`]
    /// counts them: its cap, the instance's share and the others' reserves.
    ///
    /// [`check`]: Self::check
    pub fn available(&self, service: usize, now: DateTime<Utc>) -> u64 {
        if self.spent_until.is_some_and(|until| now < until) {
            return 0;
        }
        let cap_left = self.service(service).cap.saturating_sub(self.used_by(service));
        let instance_left = self
            .counted_remaining()
            .saturating_sub(self.held_for_others(service));
        cap_left.min(instance_left)
    }

    /// How long a call refused for `scope` at `now` should wait: until the
    /// probe time after a 607, else until the reset, spread over
    /// [`RESET_JITTER`] after it.
    pub fn retry_after(&self, scope: QuotaScope, now: DateTime<Utc>) -> Duration {
        if let (QuotaScope::Instance, Some(until)) = (scope, self.spent_until) {
            if now < until {
                return (until - now).to_std().unwrap_or_default();
            }
        }
        let until_reset = self.marketo_day.until_reset_from(now);
        let jitter = RESET_JITTER.mul_f64(rand::random::<f64>());
        until_reset + jitter
    }

    /// Counts one call sent by `service` at `now`. After a 607 this call is
    /// the probe: the others wait for its answer.
    pub fn consume(&mut self, service: usize, now: DateTime<Utc>) {
        if let Some(used) = self.used.get_mut(service) {
            *used += 1;
        }
        if self.spent_until.is_some() {
            self.spent_until = Some(now + self.probe_after);
        }
    }

    /// Gives back the unit of a call that was never sent (or that Marketo
    /// did not count), counted to `day`: a day already over keeps it.
    pub fn unconsume(&mut self, service: usize, day: NaiveDate) {
        if day != self.day {
            return;
        }
        if let Some(used) = self.used.get_mut(service) {
            *used = used.saturating_sub(1);
        }
    }

    /// The limits of one service.
    pub fn service(&self, service: usize) -> ServiceQuota {
        self.services.get(service).copied().unwrap_or_default()
    }

    /// Marketo answered 607 at `now`: nothing more until the probe time.
    pub fn mark_spent(&mut self, now: DateTime<Utc>) {
        self.spent_until = Some(now + self.probe_after);
    }

    /// A call went through after a 607: Marketo's day is not spent after
    /// all. Says whether it was marked spent.
    pub fn confirm_available(&mut self) -> bool {
        self.spent_until.take().is_some()
    }

    /// Sets today's count of calls Marketo saw from outside this proxy,
    /// from its usage report (`total` for the day).
    /// `own` is the proxy's count when Marketo took its total, if known.
    pub fn reconcile(&mut self, marketo_total: u64, own: Option<u64>) {
        let ours = own.unwrap_or_else(|| self.own_total());
        self.foreign = marketo_total.saturating_sub(ours);
    }

    /// The calls this proxy made today.
    pub fn own_total(&self) -> u64 {
        self.used.iter().sum()
    }

    /// Restores counts saved earlier today (after a restart).
    pub fn restore(&mut self, day: NaiveDate, used: &[u64], foreign: u64) {
        if day == self.day {
            for (slot, saved) in self.used.iter_mut().zip(used) {
                *slot = (*slot).max(*saved);
            }
            self.foreign = self.foreign.max(foreign);
        }
    }

    pub fn foreign(&self) -> u64 {
        self.foreign
    }

    /// Marketo refused one of today's calls for its window or concurrency.
    pub fn count_refusal(&mut self) {
        self.refused += 1;
    }

    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The next local midnight, as an instant.
    pub fn next_reset(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.marketo_day.next_reset(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// Any instant, for checks that do not depend on Marketo's 607.
    fn whenever() -> DateTime<Utc> {
        at("2026-11-28T12:00:00Z")
    }

    const PROBE_AFTER: Duration = Duration::from_secs(300);

    fn quota(limit: u64, services: &[(u64, u64)], now: DateTime<Utc>) -> DailyQuota {
        let services = services
            .iter()
            .map(|(cap, reserved)| ServiceQuota {
                cap: *cap,
                reserved: *reserved,
            })
            .collect();
        DailyQuota::new(
            MarketoDay::new(chrono_tz::America::Chicago),
            limit,
            services,
            PROBE_AFTER,
            now,
        )
    }

    #[test]
    fn resets_at_midnight_central_time() {
        // 2026-11-28 is CST (UTC-6): local midnight is 06:00 UTC.
        let mut quota = quota(2, &[(2, 0)], at("2026-11-28T05:00:00Z"));
        quota.consume(0, whenever());
        quota.consume(0, whenever());
        assert_eq!(quota.check(0, whenever()), Err(QuotaScope::Instance));
        assert_eq!(
            quota.next_reset(at("2026-11-28T05:00:00Z")),
            at("2026-11-28T06:00:00Z")
        );
        quota.roll(at("2026-11-28T05:59:59Z"));
        assert_eq!(quota.check(0, whenever()), Err(QuotaScope::Instance));
        quota.roll(at("2026-11-28T06:00:00Z"));
        assert_eq!(quota.check(0, whenever()), Ok(()));
        assert_eq!(quota.used_total(), 0);
    }

    #[test]
    fn a_unit_given_back_after_midnight_goes_to_the_day_it_was_taken_from() {
        let mut quota = quota(5, &[(5, 0)], at("2026-11-28T05:59:00Z"));
        quota.consume(0, whenever());
        let taken_on = quota.day();
        quota.roll(at("2026-11-28T06:00:01Z"));
        quota.consume(0, whenever());
        // The call of the day before was never sent: the new day keeps its
        // own call.
        quota.unconsume(0, taken_on);
        assert_eq!(quota.used_total(), 1);
        quota.unconsume(0, quota.day());
        assert_eq!(quota.used_total(), 0);
    }

    #[test]
    fn resets_at_local_midnight_across_daylight_saving_changes() {
        // DST starts 2026-03-08 at 02:00 CST: the 8th starts at 06:00 UTC
        // (UTC-6) and the 9th at 05:00 UTC (UTC-5), a 23-hour day (the
        // day's own tests are in `limits::day`).
        let mut quota = quota(1, &[(1, 0)], at("2026-03-08T06:00:00Z"));
        assert_eq!(
            quota.next_reset(at("2026-03-08T12:00:00Z")),
            at("2026-03-09T05:00:00Z")
        );
        quota.consume(0, whenever());
        quota.roll(at("2026-03-09T04:59:59Z"));
        assert_eq!(
            quota.check(0, whenever()),
            Err(QuotaScope::Instance),
            "still the 8th, local time"
        );
        quota.roll(at("2026-03-09T05:00:00Z"));
        assert_eq!(
            quota.check(0, whenever()),
            Ok(()),
            "the 9th begins at 05:00 UTC in CDT"
        );
    }

    #[test]
    fn reserved_calls_are_kept_for_their_service() {
        let now = at("2026-11-28T12:00:00Z");
        // Instance 100 a day; service 1 keeps 20 for itself.
        let mut quota = quota(100, &[(100, 0), (100, 20)], now);
        let mut service_0 = 0;
        while quota.check(0, whenever()).is_ok() {
            quota.consume(0, whenever());
            service_0 += 1;
        }
        assert_eq!(service_0, 80);
        assert_eq!(quota.check(0, whenever()), Err(QuotaScope::Reserved));
        let mut service_1 = 0;
        while quota.check(1, whenever()).is_ok() {
            quota.consume(1, whenever());
            service_1 += 1;
        }
        assert_eq!(service_1, 20);
        assert_eq!(quota.check(1, whenever()), Err(QuotaScope::Instance));
    }

    #[test]
    fn a_used_reserve_frees_the_shared_pool() {
        let now = at("2026-11-28T12:00:00Z");
        let mut quota = quota(10, &[(10, 0), (10, 4)], now);
        for _ in 0..4 {
            quota.consume(1, whenever());
        }
        let mut service_0 = 0;
        while quota.check(0, whenever()).is_ok() {
            quota.consume(0, whenever());
            service_0 += 1;
        }
        assert_eq!(service_0, 6);
    }

    #[test]
    fn replicas_that_lose_each_other_split_what_is_left_of_the_day() {
        let mut quota = quota(1000, &[(1000, 0)], at("2026-11-28T12:00:00Z"));
        for _ in 0..200 {
            quota.consume(0, whenever());
        }
        // Half the day used by the whole instance, 200 of it here: each of
        // two replicas may make half of the 500 left, not 1000 / 2 - 500.
        quota.set_fallback_split(2, 500);
        assert_eq!(quota.remaining(), 250);
        assert_eq!(quota.limit_here(), 450);
        for _ in 0..250 {
            assert_eq!(quota.check(0, whenever()), Ok(()));
            quota.consume(0, whenever());
        }
        assert_eq!(quota.check(0, whenever()), Err(QuotaScope::Instance));
        // Asked again with the same split (its calls are long over), the
        // part stays what it was; together again, the whole day is back.
        quota.set_fallback_split(2, 0);
        assert_eq!(quota.remaining(), 0);
        quota.set_fallback_split(1, 0);
        assert_eq!(quota.remaining(), 550);
    }

    #[test]
    fn service_cap_applies_before_the_instance_quota() {
        let mut quota = quota(100, &[(3, 0)], at("2026-11-28T12:00:00Z"));
        for _ in 0..3 {
            quota.consume(0, whenever());
        }
        assert_eq!(quota.check(0, whenever()), Err(QuotaScope::ServiceCap));
    }

    #[test]
    fn reconciliation_shrinks_the_day() {
        let now = at("2026-11-28T12:00:00Z");
        let mut quota = quota(100, &[(100, 0)], now);
        quota.consume(0, now);
        quota.reconcile(91, None);
        assert_eq!(quota.foreign(), 90);
        assert_eq!(quota.remaining(), 9);
    }

    #[test]
    fn a_607_holds_until_the_probe_time_then_one_call_probes() {
        let now = at("2026-11-28T12:00:00Z");
        let seconds = |n: i64| now + chrono::Duration::seconds(n);
        let mut quota = quota(100, &[(100, 0)], now);
        quota.mark_spent(now);
        assert_eq!(quota.remaining(), 0);
        assert_eq!(quota.check(0, seconds(299)), Err(QuotaScope::Instance));
        let wait = quota.retry_after(QuotaScope::Instance, seconds(200));
        assert_eq!(
            wait,
            Duration::from_secs(100),
            "told to come back at the probe time"
        );
        // The probe time: one call goes, the others wait for its answer.
        assert_eq!(quota.check(0, seconds(300)), Ok(()));
        quota.consume(0, seconds(300));
        assert_eq!(quota.check(0, seconds(301)), Err(QuotaScope::Instance));
        // Marketo answers it: the day was not spent after all.
        assert!(quota.confirm_available());
        assert_eq!(quota.check(0, seconds(302)), Ok(()));
        assert_eq!(quota.remaining(), 99);
        assert!(!quota.confirm_available(), "nothing to confirm any more");
    }

    #[test]
    fn a_607_again_on_the_probe_holds_for_another_interval() {
        let now = at("2026-11-28T12:00:00Z");
        let seconds = |n: i64| now + chrono::Duration::seconds(n);
        let mut quota = quota(100, &[(100, 0)], now);
        quota.mark_spent(now);
        quota.consume(0, seconds(300));
        quota.mark_spent(seconds(301));
        assert_eq!(quota.check(0, seconds(600)), Err(QuotaScope::Instance));
        assert_eq!(quota.check(0, seconds(601)), Ok(()));
    }

    #[test]
    fn a_607_just_after_midnight_does_not_spend_the_new_day() {
        // Marketo resets a little after us: its 607 at 00:00:30 local time.
        let after_reset = at("2026-11-28T06:00:30Z");
        let mut quota = quota(100, &[(100, 0)], at("2026-11-28T05:00:00Z"));
        quota.roll(after_reset);
        quota.mark_spent(after_reset);
        let later = after_reset + chrono::Duration::seconds(301);
        assert_eq!(quota.check(0, later), Ok(()), "a probe five minutes later");
    }

    #[test]
    fn a_refusal_until_the_reset_is_spread_over_minutes_after_it() {
        let now = at("2026-11-28T05:00:00Z");
        let mut quota = quota(1, &[(1, 0)], now);
        quota.consume(0, now);
        let waits: Vec<Duration> = (0..50)
            .map(|_| quota.retry_after(QuotaScope::Instance, now))
            .collect();
        let hour = Duration::from_secs(3600);
        assert!(
            waits
                .iter()
                .all(|wait| *wait >= hour && *wait <= hour + RESET_JITTER)
        );
        let distinct: std::collections::BTreeSet<_> = waits.iter().map(Duration::as_secs).collect();
        assert!(distinct.len() > 10, "not spread: {distinct:?}");
    }
}
