//! Limits learned from Marketo's refusals: the share of the instance that
//! calls the proxy cannot see leave to it.
//!
//! A 606 means Marketo counted a full window while the proxy counted
//! fewer calls of its own; a 615, that more calls were in flight than the
//! proxy had sent. The difference is someone else's. The limit in force
//! drops to what Marketo evidently allowed the proxy (its own calls at the
//! moment of the refusal) and holds there long enough for the calls it
//! cannot see to have left: one window for the window, since every call
//! Marketo counted then has left it by the end. Then it rises back to the
//! configured limit step by step, one call at a time, over a ramp.
//!
//! A refusal of a call sent after the drop means the others are still
//! there, or take more than they did: the limit drops again, to a tenth
//! below where it was unless the proxy's own count says lower (the others
//! may have been refused themselves while the proxy took their part, and
//! take it back now), and holds three times as long as before (up to a
//! longest hold), so a steady foreign load costs fewer and fewer refusals.
//! A refusal of a call sent before the drop only lowers the floor. Once
//! the limit has been back at the top for a whole hold, the next refusal
//! starts over from the shortest hold.
//!
//! Time is passed in, so the structure is pure and testable.

use std::time::Duration;

use tokio::time::Instant;

/// How much longer each hold is than the one before it.
const ESCALATION: u32 = 3;
/// A limit that was refused again drops at least to this part of itself.
const DECREASE: f64 = 0.9;

/// One learned limit: the window's or the concurrency's.
#[derive(Debug, Clone)]
pub struct Learned {
    /// The configured limit: the most the learned one ever allows.
    ceiling: u32,
    /// Where the limit holds after the last refusal.
    floor: u32,
    /// The last refusal that lowered the limit; `None` before any.
    lowered_at: Option<Instant>,
    /// How long the limit stays at the floor; escalates while refusals
    /// keep coming during the ramp.
    hold: Duration,
    shortest_hold: Duration,
    longest_hold: Duration,
    /// How long the limit takes from the floor back to the ceiling.
    ramp: Duration,
}

/// A lowered limit, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lowered {
    pub from: u32,
    pub to: u32,
    /// How long it holds there before it starts to rise.
    pub hold: Duration,
}

/// The last lowering of a learned limit, as replicas share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    pub floor: u32,
    pub lowered_at: Instant,
    pub hold: Duration,
}

/// Lowerings this close together are the same one, seen through clocks
/// that round to the millisecond.
const SAME_LOWERING: Duration = Duration::from_millis(5);

impl Learned {
    pub fn new(ceiling: u32, shortest_hold: Duration, longest_hold: Duration, ramp: Duration) -> Self {
        Self {
            ceiling,
            floor: ceiling,
            lowered_at: None,
            hold: shortest_hold,
            shortest_hold,
            longest_hold: longest_hold.max(shortest_hold),
            ramp,
        }
    }

    /// The limit the window's refusals leave: held one window and margin,
    /// back within half a window more, holding at most ten windows.
    pub fn window(ceiling: u32, window: Duration, margin: Duration) -> Self {
        Self::new(ceiling, window + margin, (window + margin) * 10, window / 2)
    }

    /// The limit 615s leave: calls in flight end within seconds.
    pub fn concurrency(ceiling: u32) -> Self {
        Self::new(
            ceiling,
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(2),
        )
    }

    pub fn ceiling(&self) -> u32 {
        self.ceiling
    }

    /// The limit in force at `now`.
    pub fn limit(&self, now: Instant) -> u32 {
        let Some(at) = self.lowered_at else {
            return self.ceiling;
        };
        let rising = now.saturating_duration_since(at + self.hold);
        if now < at + self.hold {
            self.floor
        } else if rising >= self.ramp {
            self.ceiling
        } else {
            let gap = u128::from(self.ceiling - self.floor);
            let steps = gap * rising.as_nanos() / self.ramp.as_nanos().max(1);
            self.floor
                + u32::try_from(steps)
                    .unwrap_or(u32::MAX)
                    .min(self.ceiling - self.floor)
        }
    }

    /// When the limit next rises by one, if it is below the ceiling.
    pub fn next_rise(&self, now: Instant) -> Option<Instant> {
        let at = self.lowered_at?;
        let limit = self.limit(now);
        if limit >= self.ceiling {
            return None;
        }
        let gap = u128::from(self.ceiling - self.floor);
        let step = u128::from(limit - self.floor + 1);
        // Rounded up: at that instant the limit has risen.
        let nanos = (self.ramp.as_nanos() * step).div_ceil(gap);
        Some(at + self.hold + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }

    /// The last lowering, if any.
    pub fn episode(&self) -> Option<Episode> {
        self.lowered_at.map(|lowered_at| Episode {
            floor: self.floor,
            lowered_at,
            hold: self.hold,
        })
    }

    /// Takes another replica's lowering when it is later than this one's;
    /// the same lowering seen twice keeps the lower floor.
    pub fn adopt(&mut self, episode: Episode) {
        let floor = episode.floor.clamp(1, self.ceiling);
        let hold = episode.hold.clamp(self.shortest_hold, self.longest_hold);
        match self.lowered_at {
            Some(at) if episode.lowered_at + SAME_LOWERING < at => {}
            Some(at) if episode.lowered_at <= at + SAME_LOWERING => {
                self.floor = self.floor.min(floor);
                self.hold = self.hold.max(hold);
            }
            _ => {
                self.floor = floor;
                self.hold = hold;
                self.lowered_at = Some(episode.lowered_at);
            }
        }
    }

    /// Marketo refused a call sent at `sent` for this limit while
    /// `evident` of the proxy's own calls counted against it. Says how the
    /// limit fell, if it did.
    pub fn refused(&mut self, now: Instant, sent: Instant, evident: u32) -> Option<Lowered> {
        let before = self.limit(now);
        let evident = evident.clamp(1, self.ceiling);
        match self.lowered_at {
            // Sent before the limit fell: the floor is no higher than what
            // it found.
            Some(at) if sent < at => self.floor = self.floor.min(evident),
            // Refused again before a calm hold at the top: the others are
            // still there.
            Some(at) if now < at + self.hold + self.ramp + self.shortest_hold => {
                self.hold = (self.hold * ESCALATION).min(self.longest_hold);
                let decreased = (f64::from(before) * DECREASE) as u32;
                self.floor = decreased.min(evident).max(1);
                self.lowered_at = Some(now);
            }
            _ => {
                self.hold = self.shortest_hold;
                self.floor = before.min(evident);
                self.lowered_at = Some(now);
            }
        }
        let after = self.limit(now);
        (after < before).then_some(Lowered {
            from: before,
            to: after,
            hold: self.hold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const MILLI: Duration = Duration::from_millis(1);

    fn window() -> Learned {
        // Marketo's window: held 20 s, back within 10 s more.
        Learned::new(100, 20 * SECOND, 200 * SECOND, 10 * SECOND)
    }

    #[test]
    fn a_refusal_holds_the_limit_at_the_proxys_own_calls_for_a_hold_then_it_rises_to_the_ceiling() {
        let start = Instant::now();
        let mut learned = window();
        assert_eq!(learned.limit(start), 100);
        assert_eq!(learned.next_rise(start), None);

        let lowered = learned.refused(start, start, 40).unwrap();
        assert_eq!(
            lowered,
            Lowered {
                from: 100,
                to: 40,
                hold: 20 * SECOND
            }
        );
        assert_eq!(learned.limit(start + 19 * SECOND), 40);
        // 60 steps over 10 s: one every 1/6 s.
        let first_step = start + 20 * SECOND + Duration::from_nanos(166_666_667);
        assert_eq!(learned.next_rise(start + 19 * SECOND), Some(first_step));
        assert_eq!(learned.limit(first_step - Duration::from_nanos(1)), 40);
        assert_eq!(learned.limit(first_step), 41);
        assert_eq!(learned.limit(start + 25 * SECOND), 70);
        assert_eq!(learned.limit(start + 30 * SECOND), 100);
        assert_eq!(learned.next_rise(start + 30 * SECOND), None);
    }

    #[test]
    fn refusals_of_calls_sent_before_the_drop_lower_the_floor_without_extending_the_hold() {
        let start = Instant::now();
        let mut learned = window();
        learned.refused(start, start, 50);
        assert_eq!(learned.refused(start + SECOND, start - 10 * MILLI, 60), None);
        assert_eq!(learned.limit(start + SECOND), 50);
        let lowered = learned
            .refused(start + 2 * SECOND, start - 5 * MILLI, 45)
            .unwrap();
        assert_eq!((lowered.from, lowered.to, lowered.hold), (50, 45, 20 * SECOND));
        assert_eq!(learned.limit(start + 20 * SECOND - MILLI), 45);
        assert_eq!(learned.limit(start + 30 * SECOND), 100);
    }

    #[test]
    fn a_call_sent_after_the_drop_and_refused_lowers_the_limit_a_tenth_and_holds_longer() {
        let start = Instant::now();
        let mut learned = window();
        learned.refused(start, start, 80);
        let lowered = learned
            .refused(start + 5 * SECOND, start + 4 * SECOND, 79)
            .unwrap();
        assert_eq!((lowered.from, lowered.to, lowered.hold), (80, 72, 60 * SECOND));
        assert_eq!(learned.limit(start + 64 * SECOND), 72);
    }

    #[test]
    fn refusals_while_it_rises_hold_three_times_longer_each_time_up_to_the_longest() {
        let start = Instant::now();
        let mut learned = window();
        learned.refused(start, start, 80);
        // Probing found the others still there.
        let at = start + 22 * SECOND;
        let lowered = learned.refused(at, at, 80).unwrap();
        assert_eq!((lowered.from, lowered.to, lowered.hold), (84, 75, 60 * SECOND));
        assert_eq!(learned.limit(at + 59 * SECOND), 75);
        let at = at + 61 * SECOND;
        assert_eq!(learned.refused(at, at, 79).unwrap().hold, 180 * SECOND);
        let at = at + 181 * SECOND;
        assert_eq!(learned.refused(at, at, 79).unwrap().hold, 200 * SECOND);
    }

    #[test]
    fn a_refusal_long_after_recovery_starts_over_from_the_shortest_hold() {
        let start = Instant::now();
        let mut learned = window();
        learned.refused(start, start, 80);
        let at = start + 22 * SECOND;
        learned.refused(at, at, 80);
        // Recovered at 22 + 60 + 10 s; calm for more than a hold after it.
        let late = start + 113 * SECOND;
        assert_eq!(learned.limit(late), 100);
        let lowered = learned.refused(late, late, 70).unwrap();
        assert_eq!((lowered.from, lowered.to, lowered.hold), (100, 70, 20 * SECOND));
    }

    #[test]
    fn a_later_lowering_from_another_replica_replaces_this_ones_and_the_same_keeps_the_lower_floor() {
        let start = Instant::now();
        let mut here = window();
        here.refused(start, start, 60);
        let mut there = window();
        there.refused(start + SECOND, start + SECOND, 50);
        here.adopt(there.episode().unwrap());
        assert_eq!(here.episode(), there.episode());
        // The same lowering, rounded to the millisecond, with a higher floor.
        here.adopt(Episode {
            floor: 55,
            lowered_at: start + SECOND + MILLI,
            hold: 20 * SECOND,
        });
        assert_eq!(here.limit(start + 2 * SECOND), 50);
        // An older one changes nothing.
        here.adopt(Episode {
            floor: 10,
            lowered_at: start,
            hold: 60 * SECOND,
        });
        assert_eq!(here.episode(), there.episode());
    }

    #[test]
    fn the_limit_never_falls_below_one_nor_rises_above_the_ceiling() {
        let start = Instant::now();
        let mut learned = window();
        assert_eq!(learned.refused(start, start, 0).unwrap().to, 1);
        assert_eq!(learned.limit(start + 25 * SECOND), 50);
        let mut fresh = window();
        assert_eq!(fresh.refused(start, start, 500), None);
        assert_eq!(fresh.limit(start), 100);
    }
}
