//! The exact sliding window: a log of the last `limit` calls.
//!
//! Marketo counts a call when it arrives, somewhere between our send and
//! our receipt of the answer. So a call holds a slot from the moment it is
//! sent ("pending"), and once answered the slot is stamped and stays taken
//! for `window + margin` after the answer. A new call may start only while
//! fewer than `limit` slots are taken. Then no `window`-long interval can
//! hold more than `limit` arrivals, wherever in its send..answer span each
//! call arrived: of any `limit + 1` such calls, the last one sent would
//! have found the others still holding their slots.
//!
//! A token bucket (or GCRA) with burst 100 refilling 5/s would admit 100
//! calls at once and ~99 more within the next 20 s: nearly 200 in one
//! window, which Marketo rejects.
//!
//! Time is passed in, so the structure is pure and property-testable.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The slots of one window: the instance's, or one service's share.
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    limit: u32,
    /// How long an answered call keeps its slot: window plus margin.
    hold: Duration,
    /// Calls sent and not yet answered.
    pending: u32,
    /// When each answered call's slot frees, in order.
    frees_at: VecDeque<Instant>,
}

impl SlidingWindow {
    pub fn new(limit: u32, window: Duration, margin: Duration) -> Self {
        Self {
            limit,
            hold: window + margin,
            pending: 0,
            frees_at: VecDeque::with_capacity((limit as usize).min(1024)),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Changes the number of slots (a replica's share while the shared
    /// state is unreachable). Slots already taken stay taken.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = limit;
    }

    /// How long each taken slot still has to run, and how many calls are
    /// in flight (their slots run until `window + margin` after an answer
    /// that has not come yet).
    pub fn taken(&mut self, now: Instant) -> (Vec<Duration>, u32) {
        self.expire(now);
        let left = self
            .frees_at
            .iter()
            .map(|free| free.saturating_duration_since(now))
            .collect();
        (left, self.pending)
    }

    /// How long an answered call holds its slot.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Calls sent and not yet answered: their slots run until `hold`
    /// after an answer still to come.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    fn expire(&mut self, now: Instant) {
        while self.frees_at.front().is_some_and(|free| *free <= now) {
            self.frees_at.pop_front();
        }
    }

    /// Slots taken at `now`: calls in flight plus calls answered less than
    /// `window + margin` ago.
    pub fn used(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.pending + self.frees_at.len() as u32
    }

    /// Slots held by answered calls at `now` (calls in flight aside).
    pub fn answered(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.frees_at.len() as u32
    }

    /// When the answered calls' slots free, those after `now`.
    pub fn frees_after(&self, now: Instant) -> impl Iterator<Item = Instant> + '_ {
        self.frees_at.iter().copied().filter(move |free| *free > now)
    }

    /// Slots that will still be taken at `at`: calls in flight, and
    /// answered calls whose slots free after it.
    pub fn held_at(&self, at: Instant) -> u32 {
        let answered = self.frees_at.len() - self.frees_at.partition_point(|free| *free <= at);
        self.pending + answered as u32
    }

    pub fn has_room(&mut self, now: Instant) -> bool {
        self.used(now) < self.limit
    }

    /// Takes a slot for a call sent now. The caller checked [`has_room`].
    ///
    /// [`has_room`]: Self::has_room
    pub fn acquire(&mut self) {
        self.pending += 1;
    }

    /// Gives back a pending slot whose call was never sent.
    pub fn release_unsent(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// The call holding a pending slot was counted by Marketo at
    /// `counted_at` at the latest: its answer, or earlier when Marketo's
    /// clock says so.
    pub fn stamp(&mut self, counted_at: Instant) {
        self.pending = self.pending.saturating_sub(1);
        // Keep the log ordered: a slow call taken early frees before the
        // quick ones answered since.
        let frees = counted_at + self.hold;
        let position = self.frees_at.partition_point(|free| *free <= frees);
        self.frees_at.insert(position, frees);
    }

    /// Takes slots that free at `frees_at`: calls a previous run of the
    /// proxy made, restored after a restart.
    pub fn restore(&mut self, frees_at: impl IntoIterator<Item = Instant>) {
        self.frees_at.extend(frees_at);
        self.frees_at.make_contiguous().sort_unstable();
    }

    /// How long until a taken slot frees: the oldest answered call's, or a
    /// whole hold for a call still in flight; `None` while none is taken.
    pub fn next_release(&mut self, now: Instant) -> Option<Duration> {
        self.expire(now);
        match self.frees_at.front() {
            Some(free) => Some(free.saturating_duration_since(now)),
            None if self.pending > 0 => Some(self.hold),
            None => None,
        }
    }

    /// When a slot will next be free: `now` if one is, the oldest answered
    /// call's expiry otherwise, or `None` while every slot is in flight
    /// (the next answer decides).
    pub fn next_free(&mut self, now: Instant) -> Option<Instant> {
        if self.has_room(now) {
            Some(now)
        } else {
            self.frees_at.front().copied()
        }
    }

    /// Estimates when the call after `ahead` others could start, if each
    /// call takes `latency` to answer. Used to refuse at once a request
    /// whose deadline cannot be met.
    pub fn estimate_start(&mut self, now: Instant, ahead: usize, latency: Duration) -> Instant {
        let used = self.used(now) as usize;
        let limit = self.limit as usize;
        if ahead < limit - used.min(limit) {
            return now;
        }
        // The order in which the slots come free: free ones now, answered
        // ones as logged, pending ones after their answer.
        let cycle = latency + self.hold;
        let mut frees: Vec<Instant> = std::iter::repeat_n(now, limit.saturating_sub(used))
            .chain(self.frees_at.iter().copied())
            .chain(std::iter::repeat_n(now + cycle, self.pending as usize))
            .collect();
        frees.sort_unstable();
        let Some(slot) = frees.get(ahead % limit.max(1)) else {
            return now + cycle;
        };
        let rounds = u32::try_from(ahead / limit.max(1)).unwrap_or(u32::MAX);
        *slot + cycle * rounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(20);
    const MARGIN: Duration = Duration::from_millis(250);

    #[test]
    fn the_101st_call_waits_for_the_first_answer_plus_the_window() {
        let start = Instant::now();
        let mut window = SlidingWindow::new(100, WINDOW, MARGIN);
        for _ in 0..100 {
            assert!(window.has_room(start));
            window.acquire();
        }
        assert!(!window.has_room(start));
        assert_eq!(window.next_free(start), None, "all in flight: no answer yet");
        let answered = start + Duration::from_millis(50);
        for _ in 0..100 {
            window.stamp(answered);
        }
        let free = answered + WINDOW + MARGIN;
        assert_eq!(window.next_free(answered), Some(free));
        assert!(!window.has_room(free - Duration::from_millis(1)));
        assert!(window.has_room(free));
        assert_eq!(window.used(free), 0);
    }

    #[test]
    fn estimate_counts_whole_windows_ahead() {
        let now = Instant::now();
        let mut window = SlidingWindow::new(10, WINDOW, Duration::ZERO);
        assert_eq!(window.estimate_start(now, 9, Duration::ZERO), now);
        assert_eq!(window.estimate_start(now, 10, Duration::ZERO), now + WINDOW);
        assert_eq!(window.estimate_start(now, 25, Duration::ZERO), now + WINDOW * 2);
        for _ in 0..10 {
            window.acquire();
            window.stamp(now);
        }
        assert_eq!(window.estimate_start(now, 0, Duration::ZERO), now + WINDOW);
    }

    #[test]
    fn restored_slots_are_taken_until_they_free() {
        let now = Instant::now();
        let mut window = SlidingWindow::new(2, WINDOW, MARGIN);
        window.acquire();
        window.stamp(now);
        window.restore([now + Duration::from_secs(3), now + Duration::from_secs(1)]);
        assert_eq!(window.used(now), 3, "more than the limit: nothing starts");
        assert_eq!(window.next_free(now), Some(now + Duration::from_secs(1)));
        assert!(window.has_room(now + Duration::from_secs(3)));
        assert_eq!(window.used(now + WINDOW + MARGIN), 0);
    }

    /// One simulated call: when it is wanted (ms after the previous one)
    /// and how long Marketo takes to answer it (ms).
    fn calls() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..400, 0u64..3_000), 1..400)
    }

    proptest! {
        /// For any arrivals and answer times, no `window`-long interval
        /// holds more than `limit` calls, counting each call at every
        /// instant between its send and its answer.
        #[test]
        fn no_window_ever_holds_more_than_the_limit(
            calls in calls(),
            limit in 1u32..12,
            window_ms in 100u64..5_000,
            margin_ms in 0u64..100,
        ) {
            let window = Duration::from_millis(window_ms);
            let mut log = SlidingWindow::new(limit, window, Duration::from_millis(margin_ms));
            let start = Instant::now();
            let mut now = start;
            let mut wanted = start;
            // (sent, answered) of each admitted call; answers come in time order.
            let mut spans: Vec<(Instant, Instant)> = Vec::new();
            let mut in_flight: Vec<Instant> = Vec::new();
            for (gap, latency) in calls {
                wanted += Duration::from_millis(gap);
                now = now.max(wanted);
                loop {
                    // Deliver every answer due by now, in time order.
                    in_flight.sort();
                    while in_flight.first().is_some_and(|answer| *answer <= now) {
                        let answer = in_flight.remove(0);
                        log.stamp(answer);
                    }
                    if log.has_room(now) {
                        break;
                    }
                    // Wait for the next slot: an expiry or an answer.
                    let next = [log.next_free(now), in_flight.first().copied()]
                        .into_iter()
                        .flatten()
                        .min()
                        .expect("a full window has a slot freeing or a call answering");
                    now = next.max(now);
                }
                log.acquire();
                let answer = now + Duration::from_millis(latency);
                in_flight.push(answer);
                spans.push((now, answer));
            }
            // Worst case for every window (t - window, t]: each call counted
            // if its send..answer span touches it. Windows ending at a send
            // instant are the tightest.
            for (t, _) in &spans {
                let touching = spans
                    .iter()
                    .filter(|(sent, answered)| sent <= t && *answered + window > *t)
                    .count();
                prop_assert!(touching <= limit as usize, "{} calls touch the window ending at {:?}", touching, *t - start);
            }
        }
    }
}
