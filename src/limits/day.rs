//! Marketo's day: the zone whose midnight resets the daily quota and the
//! export bytes, and the clock that says where in the day we are.
//!
//! Marketo resets its daily counts at midnight US Central time (the zone is
//! configurable). The day is a local date in that zone; the next midnight
//! is found with `chrono-tz`, so the 23- and 25-hour days of a
//! daylight-saving change are counted as they fall, and a zone that skips
//! midnight itself starts its day at the first instant that exists.
//!
//! The clock is injected: tests move it, and with Redis the day is Redis's
//! ([`MarketoDay::date_at`] of Redis's time). Everything that counts by
//! the day (the quota, bulk export bytes, the Redis day keys, the ledger)
//! asks one `MarketoDay`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// Wall-clock time. Injected so tests can move it.
pub type WallClock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The day of one Marketo instance; see the module documentation.
#[derive(Clone)]
pub struct MarketoDay {
    zone: Tz,
    clock: WallClock,
}

impl fmt::Debug for MarketoDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarketoDay")
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}

impl MarketoDay {
    /// The day in `zone`, on the system's clock.
    pub fn new(zone: Tz) -> Self {
        Self::with_clock(zone, Arc::new(Utc::now))
    }

    /// The day in `zone`, on `clock`.
    pub fn with_clock(zone: Tz, clock: WallClock) -> Self {
        Self { zone, clock }
    }

    /// The zone whose midnight starts a new day.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// Now, by the injected clock.
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Today's local date.
    pub fn today(&self) -> NaiveDate {
        self.date_at(self.now())
    }

    /// The local date at `at`.
    pub fn date_at(&self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.zone).date_naive()
    }

    /// The first instant of the local day after the one `at` falls in.
    pub fn next_reset(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        let tomorrow = self
            .date_at(at)
            .checked_add_days(Days::new(1))
            .unwrap_or(NaiveDate::MAX);
        // Where a zone skips midnight itself, the day starts at the first
        // instant that exists.
        (0..24)
            .filter_map(|hour| tomorrow.and_hms_opt(hour, 0, 0))
            .find_map(|local| self.zone.from_local_datetime(&local).earliest())
            .map_or(at + chrono::Duration::hours(24), |start| {
                start.with_timezone(&Utc)
            })
    }

    /// How long from `at` until the next reset.
    pub fn until_reset_from(&self, at: DateTime<Utc>) -> Duration {
        (self.next_reset(at) - at).to_std().unwrap_or_default()
    }

    /// How long from now until the next reset.
    pub fn until_reset(&self) -> Duration {
        self.until_reset_from(self.now())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("an RFC 3339 time")
    }

    fn date(text: &str) -> NaiveDate {
        text.parse().expect("a date")
    }

    fn chicago() -> MarketoDay {
        MarketoDay::new(chrono_tz::America::Chicago)
    }

    #[test]
    fn midnight_central_time_is_six_in_the_morning_utc_in_winter() {
        // 2026-11-28 is CST (UTC-6).
        let day = chicago();
        assert_eq!(day.date_at(at("2026-11-28T05:59:59Z")), date("2026-11-27"));
        assert_eq!(day.date_at(at("2026-11-28T06:00:00Z")), date("2026-11-28"));
        assert_eq!(
            day.next_reset(at("2026-11-28T05:00:00Z")),
            at("2026-11-28T06:00:00Z")
        );
        assert_eq!(
            day.until_reset_from(at("2026-11-28T05:00:00Z")),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn the_days_of_a_daylight_saving_change_last_23_and_25_hours() {
        let day = chicago();
        // DST starts 2026-03-08 at 02:00 CST: the 8th starts at 06:00 UTC
        // and the 9th at 05:00 UTC.
        let start = at("2026-03-08T06:00:00Z");
        assert_eq!(day.next_reset(start), at("2026-03-09T05:00:00Z"));
        assert_eq!(day.until_reset_from(start), Duration::from_secs(23 * 3600));
        // DST ends 2026-11-01 at 02:00 CDT: the 1st starts at 05:00 UTC and
        // the 2nd at 06:00 UTC.
        let start = at("2026-11-01T05:00:00Z");
        assert_eq!(day.next_reset(start), at("2026-11-02T06:00:00Z"));
        assert_eq!(day.until_reset_from(start), Duration::from_secs(25 * 3600));
    }

    #[test]
    fn a_zone_without_midnight_starts_the_day_at_its_first_instant() {
        // America/Havana skipped 00:00-01:00 on 2026-03-08 (DST at midnight).
        let day = MarketoDay::new(chrono_tz::America::Havana);
        let reset = day.next_reset(at("2026-03-07T12:00:00Z"));
        assert_eq!(day.date_at(reset), date("2026-03-08"));
        assert_eq!(
            reset,
            at("2026-03-08T05:00:00Z"),
            "01:00 CDT, the day's first instant"
        );
    }

    #[test]
    fn the_injected_clock_moves_today_and_the_time_to_the_reset() {
        let millis = Arc::new(AtomicI64::new(at("2026-03-08T04:00:00Z").timestamp_millis()));
        let clock: WallClock = {
            let millis = Arc::clone(&millis);
            Arc::new(move || {
                DateTime::from_timestamp_millis(millis.load(Ordering::Relaxed)).unwrap_or_default()
            })
        };
        let day = MarketoDay::with_clock(chrono_tz::America::Chicago, clock);
        assert_eq!(day.today(), date("2026-03-07"));
        assert_eq!(day.until_reset(), Duration::from_secs(2 * 3600));
        millis.store(at("2026-03-08T06:00:00Z").timestamp_millis(), Ordering::Relaxed);
        assert_eq!(day.today(), date("2026-03-08"));
        assert_eq!(day.until_reset(), Duration::from_secs(23 * 3600));
    }
}
