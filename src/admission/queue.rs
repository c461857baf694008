//! The waiting: a request joins its service's lane of the fair queue (or
//! is refused at once when it could not start in time), the pump hands
//! permits out whenever every limit has room, and a timer wakes it when a
//! slot frees, a deadline passes or a pause ends.

use super::*;

/// What `enforce` would have done with a call that observe mode sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    WouldWait,
    WouldRefuse,
}

impl Admission {
    /// Waits until a call of `service` may be sent, or says why it may
    /// not. `front` puts a replay at the head of its service's queue.
    pub async fn admit(
        self: &Arc<Self>,
        service: usize,
        deadline: Instant,
        front: bool,
    ) -> Result<Permit, AdmissionError> {
        let (receiver, id) = {
            let mut state = self.lock();
            let now = Instant::now();
            let wall = self.marketo_day.now();
            state.quota.roll(wall);
            if service >= state.lanes.len() || state.closed {
                return Err(AdmissionError::Closed);
            }
            if self.observe {
                return Ok(self.observe_and_go(&mut state, service, deadline, front, now, wall));
            }
            if let Err(scope) = state.quota.check(service, wall) {
                let retry_after = state.quota.retry_after(scope, wall);
                return Err(AdmissionError::Quota { scope, retry_after });
            }
            let (start, scope) = state.estimate_start(service, now, front);
            if !front && state.queue.len() >= self.max_queue_length {
                return Err(AdmissionError::QueueFull {
                    limit: self.max_queue_length,
                    retry_after: start.saturating_duration_since(now).max(Duration::from_secs(1)),
                });
            }
            if start > deadline {
                return Err(AdmissionError::WouldWait {
                    scope,
                    max_wait: deadline.saturating_duration_since(now),
                    retry_after: start.saturating_duration_since(now),
                });
            }
            // Decided before it joins the queue, as observe mode decides it.
            let waits = !front && !state.can_start_now(service, now);
            let (id, receiver) = state.queue.push(service, now, deadline, front);
            if waits {
                state.tally(service).queued += 1;
                state.lanes[service].queued_counter.inc();
            }
            self.pump(&mut state);
            (receiver, id)
        };
        // Gone before its turn, the request leaves its lane; a permit
        // granted meanwhile gives back what it took when dropped.
        let waiting = Waiting::new(receiver, |granted| {
            drop(granted);
            self.leave(service, id);
        });
        waiting.await.unwrap_or(Err(AdmissionError::Closed))
    }

    /// Observe mode: counts the call as sent now and tallies what
    /// `enforce` would have done with it (replays are not tallied: their
    /// first attempt was).
    pub(super) fn observe_and_go(
        self: &Arc<Self>,
        state: &mut State,
        service: usize,
        deadline: Instant,
        front: bool,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Permit {
        let verdict = if state.quota.check(service, wall).is_err()
            || state.estimate_start(service, now, front).0 > deadline
        {
            Some(Verdict::WouldRefuse)
        } else if !state.can_start_now(service, now) {
            Some(Verdict::WouldWait)
        } else {
            None
        };
        if let (Some(verdict), false) = (verdict, front) {
            let tally = state.tally(service);
            let label = match verdict {
                Verdict::WouldWait => {
                    tally.would_wait += 1;
                    "would_wait"
                }
                Verdict::WouldRefuse => {
                    tally.would_refuse += 1;
                    "would_refuse"
                }
            };
            self.metrics
                .observed
                .with_label_values(&[self.name(service), label])
                .inc();
        }
        state.dispatch(service, now, wall);
        state.lanes[service].wait_histogram.observe(0.0);
        self.publish(state);
        self.permit(state, service, now, wall, Duration::ZERO)
    }

    /// The permit of a call of `service` dispatched at `now`, after
    /// `queue_wait` in its queue.
    pub(super) fn permit(
        self: &Arc<Self>,
        state: &State,
        service: usize,
        now: Instant,
        wall: DateTime<Utc>,
        queue_wait: Duration,
    ) -> Permit {
        Permit {
            admission: Arc::clone(self),
            service,
            sent_at: now,
            sent_wall: wall.timestamp_millis(),
            queue_wait,
            stamped: false,
            armed: true,
            fallbacks: state.fallbacks,
            day: state.quota.day(),
            // Only the proxy's own calls (its reading of Marketo's usage
            // report) need it.
            day_count: (service == self.internal_service()).then(|| state.quota.own_total()),
        }
    }

    /// Stops admitting: every waiting request is answered at once, and
    /// later ones too. Calls already admitted finish normally.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for waiter in state.queue.take_all() {
            let _ = waiter.reply.send(Err(AdmissionError::Closed));
        }
        self.publish(&mut state);
    }

    /// Wakes the queue whenever a window slot frees, a pause ends or a
    /// deadline passes. Runs while it is polled, or until the admission
    /// state is dropped.
    pub fn timer(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let admission: Weak<Self> = Arc::downgrade(self);
        async move {
            loop {
                let Some(this) = admission.upgrade() else { return };
                let wake_at = this.lock().wake_at;
                let timer = Arc::clone(&this.timer);
                // Register for a notification before sleeping, so a change
                // made meanwhile is not missed.
                let notified = timer.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                drop(this);
                match wake_at {
                    Some(at) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            () = &mut notified => {}
                        }
                    }
                    None => notified.await,
                }
                let Some(this) = admission.upgrade() else { return };
                let mut state = this.lock();
                this.pump(&mut state);
            }
        }
    }

    /// Sends every call that may go now, refuses waiters whose deadline
    /// passed, and sets the next wake-up. Called with the lock held after
    /// every change.
    pub(super) fn pump(self: &Arc<Self>, state: &mut State) {
        let now = Instant::now();
        let wall = self.marketo_day.now();
        state.quota.roll(wall);
        self.expire_deadlines(state, now);
        if state.paused_until.is_some_and(|until| until <= now) {
            state.paused_until = None;
        }
        self.apply_limits(state, now);
        while !state.queue.is_empty()
            && state.paused_until.is_none()
            && state.in_flight < state.concurrency
            && state.window.has_room(now)
        {
            let Some(service) = state.next_lane(now) else {
                break;
            };
            let Some(waiter) = state.queue.pop(service) else {
                break;
            };
            if waiter.reply.is_closed() {
                continue;
            }
            // Deadlines are checked at the head of each queue; one further
            // back may have passed (its request arrived earlier than those
            // ahead of it were queued).
            if waiter.deadline <= now {
                let (start, _) = state.estimate_start(service, now, false);
                let _ = waiter.reply.send(Err(AdmissionError::DeadlineExpired {
                    max_wait: waiter.deadline.saturating_duration_since(waiter.enqueued),
                    retry_after: start.saturating_duration_since(now).max(Duration::from_secs(1)),
                }));
                continue;
            }
            if let Err(scope) = state.quota.check(service, wall) {
                let retry_after = state.quota.retry_after(scope, wall);
                let _ = waiter
                    .reply
                    .send(Err(AdmissionError::Quota { scope, retry_after }));
                continue;
            }
            state.dispatch(service, now, wall);
            let wait = now.saturating_duration_since(waiter.enqueued);
            let second = state.second(now);
            let lane = &mut state.lanes[service];
            lane.wait_histogram.observe(wait.as_secs_f64());
            lane.waits.observe(second, wait);
            let permit = self.permit(state, service, now, wall, wait);
            if let Err(Ok(mut permit)) = waiter.reply.send(Ok(permit)) {
                // The waiter left between the check and the send: the call
                // was never made, so give everything back here, under the
                // lock we hold.
                permit.armed = false;
                state.undispatch(service, permit.day);
            }
        }
        let wake_at = state.next_wake(now);
        if wake_at != state.wake_at {
            state.wake_at = wake_at;
            self.timer.notify_one();
        }
        self.publish(state);
    }

    pub(super) fn expire_deadlines(&self, state: &mut State, now: Instant) {
        for (service, waiter) in state.queue.expire(now) {
            let (start, _) = state.estimate_start(service, now, false);
            let _ = waiter.reply.send(Err(AdmissionError::DeadlineExpired {
                max_wait: waiter.deadline.saturating_duration_since(waiter.enqueued),
                retry_after: start.saturating_duration_since(now).max(Duration::from_secs(1)),
            }));
        }
    }

    pub(super) fn leave(&self, service: usize, id: u64) {
        let mut state = self.lock();
        if state.queue.leave(service, id) {
            if let Some(lane) = state.lanes.get(service) {
                lane.depth_gauge
                    .set(i64::try_from(state.queue.lane_len(service)).unwrap_or(i64::MAX));
            }
        }
    }
}

impl State {
    /// Whether a call of `service` arriving now would go at once: nothing
    /// ahead of it in its queue and room in every limit.
    pub(super) fn can_start_now(&mut self, service: usize, now: Instant) -> bool {
        if self.paused_until.is_some_and(|until| until > now)
            || self.in_flight >= self.concurrency
            || !self.window.has_room(now)
        {
            return false;
        }
        let lane = &mut self.lanes[service];
        self.queue.lane_len(service) == 0
            && lane.in_flight < lane.concurrency
            && lane.window.as_mut().is_none_or(|window| window.has_room(now))
    }

    /// The service to serve next: of those whose head may go now (room in
    /// their own limits), the one fair queueing picks.
    pub(super) fn next_lane(&mut self, now: Instant) -> Option<usize> {
        let lanes = &mut self.lanes;
        self.queue.next_lane(|index| {
            let lane = &mut lanes[index];
            lane.in_flight < lane.concurrency
                && lane.window.as_mut().is_none_or(|window| window.has_room(now))
        })
    }

    pub(super) fn dispatch(&mut self, service: usize, now: Instant, wall: DateTime<Utc>) {
        let second = self.second(now);
        match self.recent.back_mut() {
            Some((last, count)) if *last == second => *count += 1,
            _ => {
                self.prune_rate_history(second);
                self.recent.push_back((second, 1));
            }
        }
        self.window.acquire();
        self.in_flight += 1;
        self.quota.consume(service, wall);
        let lane = &mut self.lanes[service];
        if let Some(window) = lane.window.as_mut() {
            window.acquire();
        }
        lane.in_flight += 1;
        self.queue.served(service);
    }

    /// Undoes [`dispatch`] for a call that was never sent.
    ///
    /// [`dispatch`]: Self::dispatch
    pub(super) fn undispatch(&mut self, service: usize, day: NaiveDate) {
        if let Some((_, count)) = self.recent.back_mut() {
            *count = count.saturating_sub(1);
        }
        self.uncount(service, day);
        self.in_flight -= 1;
        self.lanes[service].in_flight -= 1;
    }

    /// Marketo did not count a call of `service` still in flight: its
    /// window slots and its unit of `day` (the day it was counted to) go
    /// back, its concurrency slot stays until it ends.
    pub(super) fn uncount(&mut self, service: usize, day: NaiveDate) {
        self.window.release_unsent();
        self.quota.unconsume(service, day);
        if let Some(window) = self.lanes[service].window.as_mut() {
            window.release_unsent();
        }
    }

    /// When a request of `service` joining the queue now could start, and
    /// the window that decides it.
    pub(super) fn estimate_start(
        &mut self,
        service: usize,
        now: Instant,
        front: bool,
    ) -> (Instant, RateScope) {
        let own_ahead = if front { 0 } else { self.queue.lane_len(service) };
        let latency = self.latency;
        let ahead = self.queue.ahead_of(service, front);
        let instance = match &self.fallback_share {
            // The split grows: a request it can serve in time waits.
            Some(share) => share.estimate_start(
                &self.window,
                self.full_window,
                self.limits_left.0,
                now,
                ahead,
                latency,
            ),
            None => self.window.estimate_start(now, ahead, latency),
        };
        let own = self.lanes[service]
            .window
            .as_mut()
            .map(|window| window.estimate_start(now, own_ahead, latency));
        let paused = self.paused_until.unwrap_or(now);
        match own {
            Some(own) if own > instance => (own.max(paused), RateScope::Service),
            _ => (instance.max(paused), RateScope::Instance),
        }
    }

    /// The next moment something may change without a call ending.
    pub(super) fn next_wake(&mut self, now: Instant) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = Some(wake.map_or(at, |current| current.min(at)));
            }
        };
        consider(self.paused_until);
        if !self.queue.is_empty() {
            consider(self.learned_window.next_rise(now));
            consider(self.learned_concurrency.next_rise(now));
        }
        consider(self.queue.next_deadline());
        if !self.queue.is_empty() {
            consider(self.window.next_free(now).filter(|at| *at > now));
            consider(
                self.fallback_share
                    .as_ref()
                    .and_then(|share| share.next_change(now)),
            );
            for (index, lane) in self.lanes.iter_mut().enumerate() {
                if self.queue.lane_len(index) > 0 {
                    if let Some(window) = lane.window.as_mut() {
                        consider(window.next_free(now).filter(|at| *at > now));
                    }
                }
            }
        }
        wake
    }
}
