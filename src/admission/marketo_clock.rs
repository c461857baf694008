//! When Marketo took a call, from its own clock.
//!
//! Marketo counts a call in its window when the call arrives, somewhere
//! between our send and our receipt of the answer; the proxy has to assume
//! the latest, the answer, and with slow calls that wastes the window. Its
//! answers carry its clock: the part of `requestId` after `#` reads as hex
//! epoch milliseconds (`"e42b#14272d07d78"`). Undocumented, so it is taken
//! only for what it must be if it is a clock: a moment between our send
//! and our receipt of the answer, on a clock `offset` ahead of ours. Each
//! call bounds the offset: `m - received <= offset <= m - sent`; the
//! recent calls together bound it tighter (their intervals intersect, as
//! NTP's do). Marketo took a call at `m - offset`, so by our clock no
//! later than `m - lowest_offset`: the slot is stamped there, never later
//! than the answer. Whether Marketo reads its clock at arrival or at
//! completion, that is safe; when it reads it at arrival, it gains.
//!
//! Self-check: a time that cannot lie in the learned bounds (the clock
//! jumped, or the field is not a clock after all) turns the refinement off
//! for a while, and the log says why. Old calls stop counting after a
//! minute, and the bounds widen with age by more than any clock drifts.
//!
//! Times are passed in, so the structure is pure and testable.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Calls that bound the offset.
const SAMPLES: usize = 64;
/// A call stops bounding the offset after this long.
const SAMPLE_LIFE: Duration = Duration::from_secs(60);
/// How far clocks may drift apart, in milliseconds per millisecond: 200
/// ppm, ten times what a quartz clock does.
const DRIFT: f64 = 200e-6;
/// How long the refinement stays off after a time that could not be.
pub const OFF_FOR: Duration = Duration::from_secs(300);

/// One call's bounds on Marketo's clock minus ours, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    lowest: i64,
    highest: i64,
    at: Instant,
}

/// What the calls so far say about Marketo's clock.
#[derive(Debug, Default)]
pub struct MarketoClock {
    samples: VecDeque<Sample>,
    off_until: Option<Instant>,
}

/// Why a call's time was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// The refinement is off after an earlier time that could not be.
    Off,
    /// This time could not be: it falls outside what the recent calls allow
    /// (by so many milliseconds). The refinement is off from now.
    Outside(i64),
}

impl MarketoClock {
    /// A call sent at `sent` and answered at `received` (our wall clock,
    /// epoch milliseconds) carried Marketo's time `marketo`. Says when, by
    /// our wall clock, Marketo took it at the latest.
    pub fn took(&mut self, sent: i64, received: i64, marketo: i64, now: Instant) -> Result<i64, Unusable> {
        if self.off_until.is_some_and(|until| now < until) {
            return Err(Unusable::Off);
        }
        self.off_until = None;
        while self
            .samples
            .front()
            .is_some_and(|sample| now.saturating_duration_since(sample.at) > SAMPLE_LIFE)
        {
            self.samples.pop_front();
        }
        // A millisecond either way: both clocks round down.
        let call = Sample {
            lowest: marketo - received - 1,
            highest: marketo - sent + 1,
            at: now,
        };
        let (lowest, highest) = self.bounds(now);
        let outside = lowest
            .saturating_sub(call.highest)
            .max(call.lowest.saturating_sub(highest));
        if outside > 0 {
            self.samples.clear();
            self.off_until = Some(now + OFF_FOR);
            return Err(Unusable::Outside(outside));
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(call);
        let (lowest, _) = self.bounds(now);
        Ok((marketo - lowest).min(received))
    }

    /// The tightest bounds on the offset the recent calls give, each
    /// widened by how far the clocks may have drifted since.
    fn bounds(&self, now: Instant) -> (i64, i64) {
        let drift = |sample: &Sample| {
            (now.saturating_duration_since(sample.at).as_millis() as f64 * DRIFT).ceil() as i64
        };
        self.samples
            .iter()
            .fold((i64::MIN, i64::MAX), |(lowest, highest), sample| {
                (
                    lowest.max(sample.lowest - drift(sample)),
                    highest.min(sample.highest + drift(sample)),
                )
            })
    }
}

/// Marketo's time in an answer's `requestId` (`"e42b#14272d07d78"`), in
/// epoch milliseconds, if the start of the body has one.
///
/// The body is read as JSON, whatever its whitespace, up to the field: the
/// part after it may be cut off at the peek limit, so the parse's verdict
/// on the whole is not asked for.
pub fn in_request_id(body: &[u8]) -> Option<i64> {
    let mut id = None;
    let mut json = serde_json::Deserializer::from_slice(body);
    // Ends in an error when the body is cut short after the field, or when
    // the field was found and the rest left unread: `id` says which.
    let _ = serde::Deserializer::deserialize_map(&mut json, RequestId(&mut id));
    let id = id?;
    let millis = i64::from_str_radix(id.split_once('#')?.1, 16).ok()?;
    // 2001 to 2286: anything else is not a clock.
    (1_000_000_000_000..10_000_000_000_000)
        .contains(&millis)
        .then_some(millis)
}

/// Finds the top-level `requestId` of an object and stops there.
struct RequestId<'a>(&'a mut Option<String>);

impl<'de> serde::de::Visitor<'de> for RequestId<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a Marketo answer")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "requestId" {
                *self.0 = Some(map.next_value()?);
                return Ok(());
            }
            map.next_value::<serde::de::IgnoredAny>()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marketos_documented_request_ids_read_as_the_years_they_were_written() {
        let at = |body: &str| in_request_id(body.as_bytes()).map(|millis| millis / 1000);
        // 2013-11-20 and 2014-09-25.
        assert_eq!(
            at(r#"{"requestId":"e42b#14272d07d78","result":[]}"#),
            Some(1_384_905_735)
        );
        assert_eq!(
            at(r#"{"requestId":"6e78#148ad3b76f1","success":true}"#),
            Some(1_411_655_628)
        );
        // Whatever the whitespace, and wherever the field is at the top.
        assert_eq!(
            at("{ \"requestId\" :\n  \"e42b#14272d07d78\" , \"result\": []}"),
            Some(1_384_905_735)
        );
        assert_eq!(
            at(r#"{"success": true, "result": [{"requestId": "x#1"}], "requestId": "e42b#14272d07d78"}"#),
            Some(1_384_905_735)
        );
        // The rest of a long answer may be cut off at the peek.
        assert_eq!(
            at(r#"{"requestId": "e42b#14272d07d78", "result": [{"id": 1}, {"id"#),
            Some(1_384_905_735)
        );
        for not_a_clock in [
            r#"{"requestId":"x#1"}"#,
            r#"{"requestId":"e42b"}"#,
            r#"{"requestId":"e42b#zz"}"#,
            r#"{"result":[]}"#,
            r#"{"requestId":"e42b#14272d07d78"#,
            r#"{"result": [{"requestId": "e42b#14272d07d78"}]}"#,
            r#"{"requestId": 1384905735}"#,
            "id,name\n1,e42b#14272d07d78\n",
        ] {
            assert_eq!(at(not_a_clock), None, "{not_a_clock}");
        }
    }

    #[test]
    fn a_call_is_stamped_where_the_tightest_bound_on_the_offset_puts_it() {
        let now = Instant::now();
        let mut clock = MarketoClock::default();
        // Marketo's clock is 5 s ahead. A call sent at 1,000 that arrived
        // at 1,100 and was answered at 1,900: alone it says only that it
        // arrived by 1,900.
        assert_eq!(clock.took(1_000, 1_900, 6_100, now), Ok(1_900));
        // A quick call (sent 2,000, arrived 2,010, answered 2,020) bounds
        // the offset to 5,000 ± 11 ms.
        assert_eq!(clock.took(2_000, 2_020, 7_010, now), Ok(2_020));
        // A slow one sent at 3,000 that arrived at 3,050, answered at
        // 6,000: Marketo took it by 3,061.
        assert_eq!(clock.took(3_000, 6_000, 8_050, now), Ok(3_061));
    }

    #[test]
    fn a_time_that_cannot_be_turns_the_refinement_off_for_a_while() {
        let now = Instant::now();
        let mut clock = MarketoClock::default();
        assert_eq!(clock.took(2_000, 2_020, 7_010, now), Ok(2_020));
        // Marketo's clock jumped back a minute.
        assert_eq!(
            clock.took(3_000, 3_500, -56_950, now),
            Err(Unusable::Outside(64_938))
        );
        assert_eq!(
            clock.took(4_000, 4_020, -55_990, now + OFF_FOR / 2),
            Err(Unusable::Off)
        );
        // Back on after a while, learning afresh.
        assert_eq!(clock.took(4_000, 4_900, -55_990, now + OFF_FOR), Ok(4_900));
    }

    #[test]
    fn old_calls_bound_the_offset_less_as_they_age_and_not_at_all_after_a_minute() {
        let now = Instant::now();
        let mut clock = MarketoClock::default();
        assert_eq!(clock.took(2_000, 2_020, 7_010, now), Ok(2_020));
        // 30 s later the bound has widened by 6 ms of possible drift.
        assert_eq!(
            clock.took(32_000, 33_000, 37_050, now + Duration::from_secs(30)),
            Ok(32_067)
        );
        let later = now + Duration::from_secs(95);
        assert_eq!(clock.took(95_000, 96_000, 100_050, later), Ok(96_000));
    }
}
