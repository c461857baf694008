//! A replica's part of the window while the state it shares with the
//! others is unreachable: `1 / replicas` of the slots freed since, growing
//! as the slots the instance held free.
//!
//! The shared state said, when this replica last asked it, when each of
//! the instance's window slots frees (a call still in flight: after its
//! pending hold, request timeout plus window). The others may have made
//! calls since, unseen: as many as the instance made in as long at its
//! fastest recent rate are held as calls in flight. From the loss on,
//! each replica may take `1 / replicas` of
//! the window that all of these leave, besides its own answered slots
//! still held: its split. Right after a full window it is its own slots
//! alone; as the slots free it grows, to `(window − calls that may still
//! be in flight) / replicas` one hold after the loss, and to the plain
//! `window / replicas` once every call from before is surely over. Every
//! replica's new calls stay within their part of the slots freed since
//! the loss, so all of them together stay within the instance's window,
//! as far as each replica saw it: a replica that saw nothing of a burst
//! the others made (idle, or last in touch before it) cannot count it.
//!
//! Time is passed in, so the rule is pure and property-testable.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use tokio::time::Instant;

use super::window::SlidingWindow;

/// A replica's growing split of the window after the shared state was
/// lost.
#[derive(Debug, Clone)]
pub struct FallbackShare {
    replicas: u32,
    /// When each slot the instance held frees, soonest first.
    instance: Vec<Instant>,
    /// When each of this replica's answered calls' slots frees, soonest
    /// first. Its calls still in flight are left out: counting them would
    /// let it use their slots twice once they are answered.
    own: Vec<Instant>,
}

impl FallbackShare {
    /// The split of a replica that lost the shared state at `now`, having
    /// seen there the instance's slots of a `full` window free at `seen`,
    /// its own answered ones at `own`. The others may have made up to
    /// `unseen` calls since (as fast as the instance was calling, for as
    /// long ago as this replica last asked): their slots are held as if
    /// those calls were in flight, for a `pending` hold.
    pub fn after_loss(
        replicas: u32,
        full: u32,
        mut seen: Vec<Instant>,
        own: Vec<Instant>,
        now: Instant,
        pending: Duration,
        unseen: u32,
    ) -> Self {
        seen.retain(|free| *free > now);
        let unseen = unseen.min(full.saturating_sub(count(seen.len())));
        seen.extend(std::iter::repeat_n(now + pending, unseen as usize));
        Self::new(replicas, seen, own)
    }

    pub fn new(replicas: u32, instance: Vec<Instant>, own: Vec<Instant>) -> Self {
        let sorted = |mut frees: Vec<Instant>| {
            frees.sort_unstable();
            frees
        };
        Self {
            replicas: replicas.max(1),
            instance: sorted(instance),
            own: sorted(own),
        }
    }

    /// This replica's split of a `full` window at `at`: none at all while
    /// nothing is surely free, since it grows.
    pub fn split_at(&self, full: u32, at: Instant) -> u32 {
        let held = |frees: &[Instant]| count(frees.len() - frees.partition_point(|free| *free <= at));
        held(&self.own) + full.saturating_sub(held(&self.instance)) / self.replicas
    }

    /// Whether every slot seen has freed by `now`.
    pub fn is_settled(&self, now: Instant) -> bool {
        self.instance.last().is_none_or(|last| *last <= now)
            && self.own.last().is_none_or(|last| *last <= now)
    }

    /// The moments after `now` at which the split changes, soonest first.
    pub fn changes(&self, now: Instant) -> impl Iterator<Item = Instant> {
        let mut changes: Vec<Instant> = self
            .instance
            .iter()
            .chain(&self.own)
            .copied()
            .filter(|at| *at > now)
            .collect();
        changes.sort_unstable();
        changes.dedup();
        changes.into_iter()
    }

    /// When the split next changes.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let next = |frees: &[Instant]| frees.iter().copied().find(|at| *at > now);
        [next(&self.instance), next(&self.own)]
            .into_iter()
            .flatten()
            .min()
    }

    /// When the call after `ahead` others could start in `window` (this
    /// replica's calls) under a split of `full` that grows, at most
    /// `ceiling`, each call answered `latency` after it starts: the calls
    /// ahead and this one go, in turn, at the first moments the split
    /// leaves room for them (as it grows, as slots free, theirs too).
    pub fn estimate_start(
        &self,
        window: &SlidingWindow,
        full: u32,
        ceiling: u32,
        now: Instant,
        ahead: usize,
        latency: Duration,
    ) -> Instant {
        let cycle = latency + window.hold();
        // Calls in flight free their slots a cycle from now at the latest.
        let in_flight_free = now + cycle;
        let mut moments: BinaryHeap<Reverse<Instant>> = std::iter::once(now)
            .chain(self.changes(now))
            .chain(window.frees_after(now))
            .chain(std::iter::once(in_flight_free))
            .map(Reverse)
            .collect();
        let mut started: Vec<Instant> = Vec::new();
        let mut steps = 0;
        while let Some(Reverse(at)) = moments.pop() {
            steps += 1;
            if steps > MAX_STEPS {
                break;
            }
            let in_flight = if at >= in_flight_free { 0 } else { window.pending() };
            let held = window.held_at(at) - window.pending()
                + in_flight
                + count(started.iter().filter(|frees| **frees > at).count());
            let room = self.split_at(full, at).min(ceiling).saturating_sub(held);
            for _ in 0..room {
                if started.len() == ahead {
                    return at;
                }
                started.push(at + cycle);
                moments.push(Reverse(at + cycle));
            }
        }
        // Nothing would ever free: as far off as the window can say.
        now + cycle * u32::try_from(ahead + 1).unwrap_or(u32::MAX)
    }
}

/// The most moments an estimate looks at.
const MAX_STEPS: usize = 10_000;

fn count(length: usize) -> u32 {
    u32::try_from(length).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_split_grows_as_the_slots_seen_free_and_settles_at_the_plain_share() {
        let now = Instant::now();
        // A saturated window of 100 at the loss, across 3 replicas: 90
        // slots answered over the last 20 s (free one by one over the next
        // 18 s), 10 calls in flight (free after their 80 s pending hold).
        // This replica's own: the first 30 answered.
        let answered: Vec<Instant> = (1..=90).map(|slot| now + SECOND * slot / 5).collect();
        let in_flight = vec![now + SECOND * 80; 10];
        let own = answered[..30].to_vec();
        let share = FallbackShare::new(3, [answered, in_flight].concat(), own);
        assert_eq!(share.split_at(100, now), 30, "its own slots, nothing more");
        // Ten seconds on, 50 of the answered slots have freed, its own
        // among them: a third of the 50 free.
        assert_eq!(share.split_at(100, now + SECOND * 10), 16);
        // All answered ones freed: (100 − 10 in flight) / 3.
        assert_eq!(share.split_at(100, now + SECOND * 20), 30);
        assert!(!share.is_settled(now + SECOND * 20));
        assert_eq!(share.split_at(100, now + SECOND * 80), 33);
        assert!(share.is_settled(now + SECOND * 80));
        assert_eq!(share.next_change(now + SECOND * 20), Some(now + SECOND * 80));
    }

    #[test]
    fn a_request_that_the_growing_split_can_serve_is_told_when() {
        let now = Instant::now();
        let full_then = vec![now + SECOND * 5; 100];
        let share = FallbackShare::new(2, full_then, Vec::new());
        let mut window = SlidingWindow::new(100, SECOND * 20, Duration::ZERO);
        window.set_limit(share.split_at(100, now));
        // Nothing free until the slots seen free in 5 s; then 50.
        let start = share.estimate_start(&window, 100, 100, now, 10, Duration::ZERO);
        assert_eq!(start, now + SECOND * 5);
        // 60 ahead do not fit in 50: they wait for the window to turn.
        let later = share.estimate_start(&window, 100, 100, now, 60, Duration::ZERO);
        assert_eq!(later, now + SECOND * 25);
    }

    #[test]
    fn calls_the_others_may_have_made_unseen_hold_their_slots_until_surely_over() {
        let now = Instant::now();
        let (hold, pending) = (SECOND * 20, SECOND * 80);
        // Seen: 97 slots of a full window freeing over the next 0.5 s past
        // the hold; the others may have made more since, at most 3.
        let seen: Vec<Instant> = (0..97)
            .map(|slot| now + hold - SECOND / 2 + SECOND * slot / 200)
            .collect();
        let share = FallbackShare::after_loss(3, 100, seen, Vec::new(), now, pending, 40);
        assert_eq!(share.split_at(100, now), 0, "nothing is surely free");
        assert_eq!(share.split_at(100, now + hold - SECOND / 4), 17);
        assert_eq!(share.split_at(100, now + hold), 32);
        assert_eq!(share.split_at(100, now + pending), 33);
        // A window seen nearly empty, the instance calling slowly: what it
        // may have called since holds for a pending hold, and the rest is
        // shared at once.
        let share = FallbackShare::after_loss(2, 100, vec![now + SECOND; 30], Vec::new(), now, pending, 2);
        assert_eq!(share.split_at(100, now), 34);
        assert_eq!(share.split_at(100, now + SECOND), 49);
        assert_eq!(share.split_at(100, now + pending), 50);
    }

    proptest! {
        /// However the slots seen free and whatever each replica's own,
        /// the replicas' new calls together never pass what the slots seen
        /// leave of the window: at every moment, the sum over replicas of
        /// (split − own slots held) plus the instance's slots still held
        /// stays within the window.
        #[test]
        fn the_replicas_together_stay_within_the_window(
            frees in proptest::collection::vec(0u64..100_000, 0..100),
            replicas in 1u32..5,
            owner in proptest::collection::vec(0u32..5, 100),
            at in 0u64..100_000,
        ) {
            let now = Instant::now();
            let instance: Vec<Instant> =
                frees.iter().map(|ms| now + Duration::from_millis(*ms)).collect();
            let at = now + Duration::from_millis(at);
            let mut new_calls = 0;
            for replica in 0..replicas {
                let own: Vec<Instant> = instance
                    .iter()
                    .zip(&owner)
                    .filter(|(_, owner)| **owner % replicas == replica)
                    .map(|(free, _)| *free)
                    .collect();
                let held = own.iter().filter(|free| **free > at).count() as u32;
                let share = FallbackShare::new(replicas, instance.clone(), own);
                new_calls += share.split_at(100, at).saturating_sub(held);
            }
            let held = instance.iter().filter(|free| **free > at).count() as u32;
            prop_assert!(new_calls + held <= 100, "{new_calls} new + {held} held");
        }
    }
}
