//! Places in Marketo's bulk queues: an enqueue waits in its service's lane
//! of the fair queue until its queue has room (the service with the
//! fewest jobs in the queue first), then holds a [`Reservation`] until
//! Marketo has answered; Marketo's own "queue full" pauses the queue.

use super::*;

impl BulkJobs {
    /// Waits for a place in `queue` for an enqueue of `service`, until
    /// `deadline`.
    pub async fn admit(
        self: &Arc<Self>,
        queue: Queue,
        service: usize,
        deadline: Instant,
    ) -> Result<Reservation, BulkError> {
        if let Some(reservation) = self.admit_shared(queue, service).await {
            return Ok(reservation);
        }
        let waiting = {
            let mut state = self.lock();
            self.roll(&mut state);
            let now = Instant::now();
            let line = &state.lines[index(queue)];
            let nobody_waits = line.waiting.is_empty();
            if nobody_waits && self.has_room(&state, queue, now) {
                return Ok(self.hold(&mut state, queue, call_id()));
            }
            if deadline <= now {
                return Err(self.queue_full(queue));
            }
            let lane = service.min(self.internal);
            let (id, receiver) = state.lines[index(queue)].waiting.push(lane, now, deadline, false);
            // The poller reads the queue's jobs more often while someone waits.
            self.wake_poller.notify_one();
            self.wake_shared.notify_one();
            // Gone before its turn, the enqueue leaves its lane; a place
            // granted meanwhile is given back.
            Waiting::new(receiver, move |granted: Option<String>| {
                if let Some(place) = granted {
                    drop(self.reservation(queue, place));
                }
                self.lock().lines[index(queue)].waiting.leave(lane, id);
            })
        };
        let mut waiting = waiting;
        match tokio::time::timeout_at(deadline, &mut waiting).await {
            Ok(Some(place)) => Ok(self.reservation(queue, place)),
            // Refused: dropping `waiting` leaves the line, or hands back a
            // place granted meanwhile.
            _ => Err(self.queue_full(queue)),
        }
    }

    /// This replica holds the place `id` in `queue` from now on.
    pub(super) fn hold(self: &Arc<Self>, state: &mut State, queue: Queue, id: String) -> Reservation {
        state.lines[index(queue)].held.insert(id.clone());
        self.reservation(queue, id)
    }

    pub(super) fn reservation(self: &Arc<Self>, queue: Queue, id: String) -> Reservation {
        Reservation {
            jobs: Arc::downgrade(self),
            queue,
            id,
        }
    }

    pub(super) fn queue_full(&self, queue: Queue) -> BulkError {
        BulkError::QueueFull {
            queue,
            retry_after: self.pause.max(Duration::from_secs(1)),
        }
    }

    /// Whether this replica may hand out a place in `queue` on its own:
    /// without Redis, or while Redis is unreachable (then within its part
    /// of what the instance had left: the places not held by jobs it knew
    /// of or by other replicas, divided by `fallback_replicas`).
    pub(super) fn has_room(&self, state: &State, queue: Queue, now: Instant) -> bool {
        let line = &state.lines[index(queue)];
        if line.paused_until.is_some_and(|until| until > now) {
            return false;
        }
        let limit = self.limits[index(queue)];
        if self.shared.is_none() {
            return self.in_queue(state, queue) + line.held.len() < limit;
        }
        let Some(offline) = &state.offline else {
            // Redis hands out the places.
            return false;
        };
        let (mine, known) = state
            .jobs
            .values()
            .filter(|job| job.kind.queue() == queue && job.state.is_active())
            .fold((0, 0), |(mine, known), job| {
                if job.offline {
                    (mine + 1, known)
                } else {
                    (mine, known + 1)
                }
            });
        let elsewhere = known + offline.reserved_elsewhere[index(queue)];
        mine + line.held.len() < limit.saturating_sub(elsewhere) / self.fallback_replicas
    }

    pub(super) fn in_queue(&self, state: &State, queue: Queue) -> usize {
        state
            .jobs
            .values()
            .filter(|job| job.kind.queue() == queue && job.state.is_active())
            .count()
    }

    /// Hands free places to waiters (with Redis answering, wakes the task
    /// that takes them there).
    pub(super) fn pump(&self, state: &mut State, queue: Queue) {
        if self.sharing_now(state).is_some() {
            self.wake_shared.notify_one();
            return;
        }
        let now = Instant::now();
        while self.has_room(state, queue, now) {
            let Some(waiter) = self.next_waiter(state, queue) else {
                break;
            };
            let id = call_id();
            if waiter.reply.send(id.clone()).is_ok() {
                state.lines[index(queue)].held.insert(id);
            }
        }
    }

    /// The next waiter for a place: the service with the fewest jobs in
    /// the queue first, the longest waiting among equals.
    pub(super) fn next_waiter(&self, state: &mut State, queue: Queue) -> Option<fair_queue::Waiter<String>> {
        let service = self.next_lane(state, queue)?;
        state.lines[index(queue)].waiting.pop(service)
    }

    /// The line of [`Self::next_waiter`].
    pub(super) fn next_lane(&self, state: &State, queue: Queue) -> Option<usize> {
        let owned = |service: usize| {
            state
                .jobs
                .values()
                .filter(|job| {
                    job.kind.queue() == queue && job.state.is_active() && job.owner == Some(service)
                })
                .count()
        };
        state.lines[index(queue)]
            .waiting
            .next_lane_by(|service, head| Some((owned(service), head.enqueued)))
    }

    /// Marketo said `queue` is full: jobs the proxy has not seen hold it.
    /// Nothing more goes there until a job leaves or the pause ends, and
    /// the poller lists the jobs and reads their status again.
    pub fn marketo_says_full(self: &Arc<Self>, queue: Queue) {
        let shared = {
            let mut state = self.lock();
            self.roll(&mut state);
            state.lines[index(queue)].paused_until = Some(Instant::now() + self.pause);
            state.reread = true;
            self.sharing_now(&state).is_some()
        };
        tracing::info!(
            queue = queue.label(),
            "Marketo says the bulk queue is full: pausing it and reading its jobs again"
        );
        self.wake_poller.notify_one();
        let jobs = Arc::downgrade(self);
        let pause = self.pause;
        self.tasks.until_stopped(async move {
            // The other replicas hold their enqueues too.
            if let Some(jobs) = jobs.upgrade().filter(|_| shared) {
                if let Some(shared) = &jobs.shared {
                    let _ = shared.pause(queue, pause).await;
                }
            }
            tokio::time::sleep(pause).await;
            if let Some(jobs) = jobs.upgrade() {
                let mut state = jobs.lock();
                jobs.pump(&mut state, queue);
            }
        });
    }
}

/// A place in a queue for one enqueue until Marketo has answered it. The
/// job it starts holds the place from then on.
pub struct Reservation {
    jobs: Weak<BulkJobs>,
    queue: Queue,
    id: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(jobs) = self.jobs.upgrade() {
            let mut state = jobs.lock();
            state.lines[index(self.queue)].held.remove(&self.id);
            jobs.give_back(&mut state, self.queue, std::mem::take(&mut self.id));
            jobs.pump(&mut state, self.queue);
        }
    }
}
