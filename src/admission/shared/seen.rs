//! What a replica last saw of the instance in the shared state: its use
//! and when each window slot frees, for its part of the limits should
//! Redis be lost (see [`crate::admission::fallback`]).

use std::collections::VecDeque;

use super::*;

/// What a replica last saw of the instance in the shared state: its use,
/// when each window slot frees, and how fast it has been calling.
#[derive(Debug, Clone, Default)]
pub(super) struct Seen {
    pub(super) instance: InstanceUse,
    pub(super) frees: Vec<Instant>,
    /// The instance's calls of the day as recent replies counted them,
    /// over the last [`RATE_SPAN`].
    counts: VecDeque<(Instant, u64)>,
}

/// How far back the instance's rate of calls is read.
const RATE_SPAN: Duration = Duration::from_secs(2);

/// The shortest span a rate of calls is read over.
const MIN_RATE_SPAN: Duration = Duration::from_millis(50);

impl Seen {
    pub(super) fn update(&mut self, acquired: &scripts::Acquired, now: Instant) {
        self.instance = InstanceUse {
            window: acquired.window,
            in_flight: acquired.in_flight,
            day_used: acquired.day_used,
        };
        self.frees_now(&acquired.window_frees_ms, now);
        self.counts.push_back((now, acquired.day_used));
        while self
            .counts
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > RATE_SPAN)
        {
            self.counts.pop_front();
        }
    }

    /// Calls the others may have made by `now` since this was seen: as
    /// many as the instance made in as long at its fastest recent rate (a
    /// burst may have been under way), and one that may be on its way at
    /// any moment. A replica that has heard nothing for [`RATE_SPAN`]
    /// knows no rate: the one call.
    pub(super) fn unseen_by(&self, now: Instant) -> u32 {
        let Some((last_at, last)) = self
            .counts
            .back()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= RATE_SPAN)
        else {
            return 1;
        };
        let rate = self
            .counts
            .iter()
            .map(|(at, count)| {
                let span = last_at.saturating_duration_since(*at).max(MIN_RATE_SPAN);
                last.saturating_sub(*count) as f64 / span.as_secs_f64()
            })
            .fold(0.0, f64::max);
        let age = now.saturating_duration_since(*last_at).as_secs_f64();
        // Saturates at u32::MAX; the window bounds it anyway.
        (rate * age).ceil() as u32 + 1
    }

    /// The window's slots free in `frees_ms` from `now` (an answer moved
    /// one of this replica's: it no longer waits for a pending hold).
    pub(super) fn frees_now(&mut self, frees_ms: &[u64], now: Instant) {
        self.frees = frees_ms
            .iter()
            .map(|ms| now + Duration::from_millis(*ms))
            .collect();
    }
}
