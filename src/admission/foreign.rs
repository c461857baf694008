//! The part of Marketo's window kept free for calls from outside the
//! proxy, reckoned from Marketo's own reports.
//!
//! Refusals teach the proxy about calls it cannot see only when Marketo
//! refuses the proxy's (see [`super::learn`]). A proxy that keeps the
//! window full takes every slot as soon as it frees, so Marketo refuses
//! the others instead, and nothing the proxy receives says so. Marketo's
//! reports do: its usage report counts the day's executed calls and its
//! error report the day's refusals (606, 615). What they count beyond the
//! proxy's own calls and refusals is someone else's demand, executed or
//! not. Its growth from one reading to the next is the rate at which the
//! others call, and the proxy keeps that many calls of every window free.
//!
//! Only a rate that held over the last two intervals counts, so a burst
//! keeps nothing free once it is over (the learned limits answer bursts,
//! at once). At most half the window is kept: a foreign client that
//! retries refused calls at once looks busier than it is.
//!
//! Time is passed in, so the structure is pure and testable.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

/// Marketo's reports, read once: the day's calls from outside the proxy,
/// executed or refused, as of `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub date: NaiveDate,
    pub at: DateTime<Utc>,
    pub foreign: u64,
}

/// The rate of calls from outside the proxy, from successive readings.
#[derive(Debug, Clone)]
pub struct ForeignRate {
    window: Duration,
    /// The most kept free: half the configured window.
    most: u32,
    last: Option<Reading>,
    /// Calls a second between the last two readings.
    rate: Option<f64>,
    reserve: u32,
}

impl ForeignRate {
    pub fn new(window: Duration, window_calls: u32) -> Self {
        Self {
            window,
            most: window_calls / 2,
            last: None,
            rate: None,
            reserve: 0,
        }
    }

    /// The calls of every window kept free for others.
    pub fn reserve(&self) -> u32 {
        self.reserve
    }

    /// Takes a reading (one less than a window after the last, or older,
    /// changes nothing) and answers the calls of every window to keep free.
    pub fn observe(&mut self, reading: Reading) -> u32 {
        let Some(last) = self.last else {
            self.last = Some(reading);
            return self.reserve;
        };
        // Too close to the last to tell a rate by: each reading is off by
        // the calls in flight when Marketo counted.
        if reading.at < last.at + self.window {
            return self.reserve;
        }
        self.last = Some(reading);
        // A new day counts from zero: this reading starts its count, and
        // the rate before midnight holds until the next.
        if reading.date != last.date || reading.foreign < last.foreign {
            return self.reserve;
        }
        let seconds = (reading.at - last.at).num_milliseconds() as f64 / 1000.0;
        let rate = (reading.foreign - last.foreign) as f64 / seconds;
        let sustained = self.rate.map_or(0.0, |before| before.min(rate));
        self.rate = Some(rate);
        let per_window = (sustained * self.window.as_secs_f64()).round();
        self.reserve = (per_window as u32).min(self.most);
        self.reserve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(20);

    fn reading(seconds: i64, foreign: u64) -> Reading {
        let start = DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Reading {
            date: start.date_naive(),
            at: start + chrono::Duration::seconds(seconds),
            foreign,
        }
    }

    #[test]
    fn a_steady_rate_keeps_its_calls_per_window_free_from_the_third_reading() {
        let mut rate = ForeignRate::new(WINDOW, 100);
        assert_eq!(rate.observe(reading(0, 1000)), 0);
        assert_eq!(
            rate.observe(reading(300, 1300)),
            0,
            "one interval is not yet a steady rate"
        );
        assert_eq!(rate.observe(reading(600, 1600)), 20, "1 a second is 20 a window");
        assert_eq!(rate.observe(reading(900, 1900)), 20);
    }

    #[test]
    fn a_burst_keeps_nothing_free() {
        let mut rate = ForeignRate::new(WINDOW, 100);
        rate.observe(reading(0, 0));
        rate.observe(reading(300, 0));
        assert_eq!(rate.observe(reading(600, 60)), 0);
        assert_eq!(rate.observe(reading(900, 60)), 0);
    }

    #[test]
    fn the_lower_of_the_last_two_rates_counts() {
        let mut rate = ForeignRate::new(WINDOW, 100);
        rate.observe(reading(0, 0));
        rate.observe(reading(300, 300));
        assert_eq!(rate.observe(reading(600, 450)), 10, "half a call a second");
        assert_eq!(rate.observe(reading(900, 750)), 10);
        assert_eq!(rate.observe(reading(1200, 750)), 0, "the others stopped");
    }

    #[test]
    fn at_most_half_the_window_is_kept() {
        let mut rate = ForeignRate::new(WINDOW, 100);
        rate.observe(reading(0, 0));
        rate.observe(reading(20, 2000));
        assert_eq!(rate.observe(reading(40, 4000)), 50);
    }

    #[test]
    fn a_reading_seen_before_older_or_within_a_window_changes_nothing() {
        let mut rate = ForeignRate::new(WINDOW, 100);
        rate.observe(reading(0, 0));
        rate.observe(reading(300, 300));
        rate.observe(reading(600, 600));
        assert_eq!(rate.observe(reading(600, 600)), 20);
        assert_eq!(rate.observe(reading(450, 9000)), 20);
        assert_eq!(rate.observe(reading(610, 700)), 20);
        assert_eq!(rate.observe(reading(900, 900)), 20);
    }

    #[test]
    fn a_new_day_starts_a_count_and_keeps_the_rate_until_the_next_reading() {
        let mut rate = ForeignRate::new(WINDOW, 100);
        rate.observe(reading(0, 50_000));
        rate.observe(reading(300, 50_300));
        rate.observe(reading(600, 50_600));
        let midnight = Reading {
            date: reading(0, 0).date.succ_opt().unwrap(),
            ..reading(900, 40)
        };
        assert_eq!(rate.observe(midnight), 20);
        let next = Reading {
            at: midnight.at + chrono::Duration::seconds(300),
            foreign: 340,
            ..midnight
        };
        assert_eq!(rate.observe(next), 20);
    }
}
