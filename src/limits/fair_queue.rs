//! A fair queue of waiters in lanes (one lane per service), generic over
//! what a waiter is handed when its turn comes.
//!
//! Within a lane waiters go first in, first out (a replay may go to the
//! front). Between lanes the default order is start-time fair queueing on
//! the lanes' weights: each lane's next waiter carries a start tag (the
//! later of the lane's last finish tag and the queue's virtual time), the
//! smallest tag goes, and its lane's finish tag moves `1 / weight` on. An
//! idle lane banks no credit and loses none, and turns a lane cannot take
//! (its own limits are full) go to the others. A caller with another
//! notion of fairness orders the lanes by a key of its own
//! ([`FairQueue::next_lane_by`]); the rest is the same.
//!
//! The queue lives inside its owner's lock and never awaits: the owner
//! pops a waiter and sends it its grant, refuses waiters whose deadline
//! passed ([`FairQueue::expire`]), and removes one whose request went away
//! ([`FairQueue::leave`], which [`Waiting`] calls when dropped).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// One waiter: when it joined, its deadline and where its grant goes.
pub struct Waiter<T> {
    pub id: u64,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<T>,
}

struct Lane<T> {
    weight: f64,
    /// Finish tag of the lane's last dispatched waiter.
    finish: f64,
    waiters: VecDeque<Waiter<T>>,
}

/// Waiters in lanes; see the module documentation.
pub struct FairQueue<T> {
    lanes: Vec<Lane<T>>,
    /// Start tag of the last dispatch.
    virtual_time: f64,
    len: usize,
    next_id: u64,
}

impl<T> FairQueue<T> {
    /// A queue of one lane per weight.
    pub fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        Self {
            lanes: weights
                .into_iter()
                .map(|weight| Lane {
                    weight,
                    finish: 0.0,
                    waiters: VecDeque::new(),
                })
                .collect(),
            virtual_time: 0.0,
            len: 0,
            next_id: 0,
        }
    }

    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Waiters in every lane.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Waiters in `lane`.
    pub fn lane_len(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |lane| lane.waiters.len())
    }

    pub fn weight(&self, lane: usize) -> f64 {
        self.lanes.get(lane).map_or(1.0, |lane| lane.weight)
    }

    /// Puts a waiter in `lane` (at its front for a replay) and says which
    /// one it is, with the end its grant arrives at.
    pub fn push(
        &mut self,
        lane: usize,
        now: Instant,
        deadline: Instant,
        front: bool,
    ) -> (u64, oneshot::Receiver<T>) {
        let (reply, receiver) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        let waiter = Waiter {
            id,
            enqueued: now,
            deadline,
            reply,
        };
        let waiters = &mut self.lanes[lane].waiters;
        if front {
            waiters.push_front(waiter);
        } else {
            waiters.push_back(waiter);
        }
        self.len += 1;
        (id, receiver)
    }

    /// Takes the first waiter of `lane`.
    pub fn pop(&mut self, lane: usize) -> Option<Waiter<T>> {
        let waiter = self.lanes.get_mut(lane)?.waiters.pop_front()?;
        self.len -= 1;
        Some(waiter)
    }

    /// Removes waiter `id` of `lane`, whose request went away; says whether
    /// it was still there.
    pub fn leave(&mut self, lane: usize, id: u64) -> bool {
        let Some(waiters) = self.lanes.get_mut(lane).map(|lane| &mut lane.waiters) else {
            return false;
        };
        let Some(position) = waiters.iter().position(|waiter| waiter.id == id) else {
            return false;
        };
        waiters.remove(position);
        self.len -= 1;
        true
    }

    /// Takes every waiter, for the owner to answer (shutting down).
    pub fn take_all(&mut self) -> Vec<Waiter<T>> {
        self.len = 0;
        self.lanes
            .iter_mut()
            .flat_map(|lane| lane.waiters.drain(..))
            .collect()
    }

    /// The lane whose head goes next by start-time fair queueing, among
    /// those with a waiter that `may_go` lets go.
    pub fn next_lane(&self, mut may_go: impl FnMut(usize) -> bool) -> Option<usize> {
        self.next_lane_by(|lane, _| may_go(lane).then(|| self.start_tag(lane)))
    }

    /// The lane whose head has the smallest `key` (`None`: it may not go
    /// now), the first such lane among equals.
    pub fn next_lane_by<K: PartialOrd>(
        &self,
        mut key: impl FnMut(usize, &Waiter<T>) -> Option<K>,
    ) -> Option<usize> {
        let mut best: Option<(usize, K)> = None;
        for (index, lane) in self.lanes.iter().enumerate() {
            let Some(head) = lane.waiters.front() else {
                continue;
            };
            let Some(key) = key(index, head) else {
                continue;
            };
            if best.as_ref().is_none_or(|(_, best)| key < *best) {
                best = Some((index, key));
            }
        }
        best.map(|(index, _)| index)
    }

    /// The start tag `lane`'s next waiter would carry.
    fn start_tag(&self, lane: usize) -> f64 {
        self.lanes[lane].finish.max(self.virtual_time)
    }

    /// `lane` was served once (from the queue or at once): its finish tag
    /// moves on by `1 / weight`.
    pub fn served(&mut self, lane: usize) {
        let start = self.start_tag(lane);
        let lane = &mut self.lanes[lane];
        lane.finish = start + 1.0 / lane.weight;
        self.virtual_time = start;
    }

    /// How many waiters go before a new one of `lane` (at its front for a
    /// replay): its own lane's, and of each other lane about `weight_o /
    /// weight` for each of its own, but never more than that lane holds.
    pub fn ahead_of(&self, lane: usize, front: bool) -> usize {
        let own = if front { 0 } else { self.lane_len(lane) };
        let weight = self.weight(lane);
        let others: usize = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != lane)
            .map(|(_, other)| {
                let share = ((own + 1) as f64 * other.weight / weight).ceil() as usize;
                other.waiters.len().min(share)
            })
            .sum();
        own + others
    }

    /// Takes the waiters at the head of each lane whose deadline is not
    /// after `now`, for the owner to refuse.
    pub fn expire(&mut self, now: Instant) -> Vec<(usize, Waiter<T>)> {
        let mut expired = Vec::new();
        for (index, lane) in self.lanes.iter_mut().enumerate() {
            while lane.waiters.front().is_some_and(|waiter| waiter.deadline <= now) {
                if let Some(waiter) = lane.waiters.pop_front() {
                    expired.push((index, waiter));
                }
            }
        }
        self.len -= expired.len();
        expired
    }

    /// The earliest deadline at the head of a lane.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|lane| lane.waiters.front().map(|waiter| waiter.deadline))
            .min()
    }
}

/// A waiter's end of the queue: resolves to its grant, or to `None` when
/// the queue went away without granting anything. Dropped before that, it
/// hands `leave` the grant sent meanwhile, if any, for the owner to take
/// the waiter out of its lane or give the grant back (under its lock).
pub struct Waiting<T, L: FnOnce(Option<T>)> {
    receiver: oneshot::Receiver<T>,
    leave: Option<L>,
}

impl<T, L: FnOnce(Option<T>)> Waiting<T, L> {
    pub fn new(receiver: oneshot::Receiver<T>, leave: L) -> Self {
        Self {
            receiver,
            leave: Some(leave),
        }
    }
}

impl<T, L: FnOnce(Option<T>) + Unpin> Future for Waiting<T, L> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let granted = std::task::ready!(Pin::new(&mut self.receiver).poll(cx));
        self.leave = None;
        Poll::Ready(granted.ok())
    }
}

impl<T, L: FnOnce(Option<T>)> Drop for Waiting<T, L> {
    fn drop(&mut self) {
        if let Some(leave) = self.leave.take() {
            // Closed first: nothing can be granted after the look below.
            self.receiver.close();
            leave(self.receiver.try_recv().ok());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    const LATER: Duration = Duration::from_secs(3600);

    /// Serves `turns` waiters one at a time, every lane always backlogged;
    /// answers the lanes served, in order.
    fn serve(queue: &mut FairQueue<()>, turns: usize) -> Vec<usize> {
        let now = Instant::now();
        for lane in 0..queue.lanes() {
            for _ in 0..turns {
                queue.push(lane, now, now + LATER, false);
            }
        }
        (0..turns)
            .map(|_| {
                let lane = queue.next_lane(|_| true).expect("every lane waits");
                queue.pop(lane).expect("its head");
                queue.served(lane);
                lane
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn backlogged_lanes_share_turns_by_weight() {
        let mut queue = FairQueue::new([3.0, 2.0, 1.0]);
        let served = serve(&mut queue, 600);
        let share = |lane| served.iter().filter(|served| **served == lane).count();
        assert_eq!((share(0), share(1), share(2)), (300, 200, 100));
        // Fair at every moment, not only in sum: within any 6 turns each
        // lane has its share, give or take one.
        for turns in served.windows(6) {
            let count = |lane| turns.iter().filter(|served| **served == lane).count();
            assert!(
                (2..=4).contains(&count(0)) && (1..=3).contains(&count(1)),
                "{turns:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_is_first_in_first_out_and_a_replay_goes_first() {
        let mut queue: FairQueue<()> = FairQueue::new([1.0]);
        let now = Instant::now();
        let (first, _a) = queue.push(0, now, now + LATER, false);
        let (second, _b) = queue.push(0, now, now + LATER, false);
        let (replay, _c) = queue.push(0, now, now + LATER, true);
        let order: Vec<u64> = std::iter::from_fn(|| queue.pop(0).map(|waiter| waiter.id)).collect();
        assert_eq!(order, [replay, first, second]);
        assert!(queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_lane_banks_no_credit() {
        let mut queue: FairQueue<()> = FairQueue::new([1.0, 1.0]);
        // Lane 0 alone for a while.
        let now = Instant::now();
        for _ in 0..50 {
            queue.push(0, now, now + LATER, false);
            let lane = queue.next_lane(|_| true).expect("lane 0 waits");
            queue.pop(lane);
            queue.served(lane);
        }
        // Lane 1 arrives: the two alternate from here on, lane 1 does not
        // get fifty turns in a row for having been idle.
        for _ in 0..10 {
            queue.push(0, now, now + LATER, false);
            queue.push(1, now, now + LATER, false);
        }
        let served: Vec<usize> = (0..10)
            .map(|_| {
                let lane = queue.next_lane(|_| true).expect("both wait");
                queue.pop(lane);
                queue.served(lane);
                lane
            })
            .collect();
        let ones = served.iter().filter(|lane| **lane == 1).count();
        assert!((4..=6).contains(&ones), "{served:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn turns_a_lane_cannot_take_go_to_the_others() {
        let mut queue: FairQueue<()> = FairQueue::new([10.0, 1.0]);
        let now = Instant::now();
        queue.push(0, now, now + LATER, false);
        queue.push(1, now, now + LATER, false);
        assert_eq!(queue.next_lane(|_| true), Some(0));
        assert_eq!(queue.next_lane(|lane| lane != 0), Some(1));
        assert_eq!(queue.next_lane(|_| false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_may_be_ordered_by_a_key_of_their_own() {
        let mut queue: FairQueue<()> = FairQueue::new([1.0, 1.0, 1.0]);
        let now = Instant::now();
        for lane in 0..3 {
            queue.push(lane, now, now + LATER, false);
        }
        // Fewest jobs first; lanes 1 and 2 tie, the first of them goes.
        let jobs = [3, 1, 1];
        assert_eq!(queue.next_lane_by(|lane, _| Some(jobs[lane])), Some(1));
        assert_eq!(
            queue.next_lane_by(|lane, _| (lane == 0).then_some(jobs[lane])),
            Some(0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_past_their_deadline_are_taken_for_refusal() {
        let mut queue: FairQueue<()> = FairQueue::new([1.0, 1.0]);
        let now = Instant::now();
        queue.push(0, now, now + Duration::from_secs(1), false);
        queue.push(0, now, now + Duration::from_secs(5), false);
        queue.push(1, now, now + Duration::from_secs(2), false);
        assert_eq!(queue.next_deadline(), Some(now + Duration::from_secs(1)));
        assert!(queue.expire(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let expired: Vec<usize> = queue
            .expire(Instant::now())
            .into_iter()
            .map(|(lane, _)| lane)
            .collect();
        assert_eq!(expired, [0, 1]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.next_deadline(), Some(now + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_waiter_expects_its_lane_and_the_others_fair_part_ahead_of_it() {
        let mut queue: FairQueue<()> = FairQueue::new([1.0, 2.0, 1.0]);
        let now = Instant::now();
        for (lane, waiting) in [(0, 3), (1, 10), (2, 1)] {
            for _ in 0..waiting {
                queue.push(lane, now, now + LATER, false);
            }
        }
        // Its own 3, then per call of its own 2 of lane 1 (8 of 10) and 1 of
        // lane 2 (all it has, 1).
        assert_eq!(queue.ahead_of(0, false), 3 + 8 + 1);
        // A replay goes first in its own lane: 1 turn's worth of the others.
        assert_eq!(queue.ahead_of(0, true), 2 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_leaves_its_lane_and_hands_back_a_grant() {
        let queue = Arc::new(Mutex::new(FairQueue::<u32>::new([1.0])));
        let left = Arc::new(Mutex::new(Vec::new()));
        let wait = |queue: &Arc<Mutex<FairQueue<u32>>>| {
            let now = Instant::now();
            let (id, receiver) = queue.lock().unwrap().push(0, now, now + LATER, false);
            let (queue, left) = (Arc::clone(queue), Arc::clone(&left));
            Waiting::new(receiver, move |granted: Option<u32>| {
                queue.lock().unwrap().leave(0, id);
                left.lock().unwrap().push(granted);
            })
        };
        // Gone before its turn: it leaves the lane.
        drop(wait(&queue));
        assert!(queue.lock().unwrap().is_empty());
        // Granted, then gone before it looked: the grant comes back.
        let waiting = wait(&queue);
        let head = queue.lock().unwrap().pop(0).expect("the waiter");
        head.reply.send(7).expect("still waiting");
        drop(waiting);
        assert_eq!(*left.lock().unwrap(), [None, Some(7)]);
        // Granted and received: nothing to leave.
        let waiting = wait(&queue);
        let head = queue.lock().unwrap().pop(0).expect("the waiter");
        head.reply.send(8).expect("still waiting");
        assert_eq!(waiting.await, Some(8));
        assert_eq!(left.lock().unwrap().len(), 2);
    }
}
