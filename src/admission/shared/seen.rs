//! What a replica last saw of the instance in the shared state: its use
//! and when each window slot frees, for its part of the limits should
//! Redis be lost (see [`crate::admission::fallback`]).

use super::*;

/// What a replica last saw of the instance in the shared state: its use,
/// and when each window slot frees.
#[derive(Debug, Clone, Default)]
pub(super) struct Seen {
    pub(super) instance: InstanceUse,
    pub(super) frees: Vec<Instant>,
}

impl Seen {
    pub(super) fn update(&mut self, acquired: &scripts::Acquired, now: Instant) {
        self.instance = InstanceUse {
            window: acquired.window,
            in_flight: acquired.in_flight,
            day_used: acquired.day_used,
        };
        self.frees_now(&acquired.window_frees_ms, now);
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
