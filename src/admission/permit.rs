//! The right to have one call in flight ([`Permit`]), and a call's slot in
//! this replica's limits and the shared ones ([`Slot`]): what they took
//! goes back when they are dropped.

use super::*;

/// The right to have one call in flight. Stamp it with [`answered`] when
/// Marketo's answer arrives; drop it when the answer has been passed on
/// (its body fully sent or dropped) to free the concurrency slot.
///
/// [`answered`]: Permit::answered
pub struct Permit {
    pub(super) admission: Arc<Admission>,
    pub(super) service: usize,
    pub(super) sent_at: Instant,
    /// When it was sent by the wall clock, epoch milliseconds.
    pub(super) sent_wall: i64,
    pub(super) queue_wait: Duration,
    pub(super) stamped: bool,
    pub(super) armed: bool,
    /// This replica's fall backs to its share when the call was admitted.
    pub(super) fallbacks: u64,
    /// The day its unit of the quota was counted to.
    pub(super) day: NaiveDate,
    /// The proxy's calls today when this one was sent, itself included;
    /// for the proxy's own calls only.
    pub(super) day_count: Option<u64>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("service", &self.service)
            .field("queue_wait", &self.queue_wait)
            .field("stamped", &self.stamped)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// The call was not made after all (the shared limits said no):
    /// everything it took is given back.
    pub fn unsent(mut self) {
        self.armed = false;
        let admission = Arc::clone(&self.admission);
        let mut state = admission.lock();
        state.undispatch(self.service, self.day);
        admission.pump(&mut state);
    }

    /// When the call was sent.
    pub fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// How long the request waited in the queue.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// Whether this replica fell back to its share of the limits since
    /// the call was admitted: admitted under other limits and counted as
    /// holding nothing by the share, it must be admitted again under it.
    pub fn admitted_before_fallback(&self) -> bool {
        self.fallbacks != self.admission.lock().fallbacks
    }

    /// Marketo's answer arrived: the window slot starts its countdown.
    pub fn answered(&mut self) {
        self.answered_by(None);
    }

    /// Marketo's answer arrived, saying its clock read `marketo` (epoch
    /// ms) when it took the call: the window slot counts from then by our
    /// clock, at the latest (see [`marketo_clock`]), or from now. Says how
    /// much earlier than now that is.
    pub fn answered_by(&mut self, marketo: Option<i64>) -> Duration {
        if self.stamped || !self.armed {
            return Duration::ZERO;
        }
        self.stamped = true;
        let now = Instant::now();
        let mut state = self.admission.lock();
        let earlier = match (marketo, state.marketo_clock.as_mut()) {
            (Some(marketo), Some(clock)) => {
                let received = self.admission.marketo_day.now().timestamp_millis();
                Self::earlier(clock.took(self.sent_wall, received, marketo, now), received)
            }
            _ => Duration::ZERO,
        };
        let at = now.checked_sub(earlier).unwrap_or(now);
        state.window.stamp(at);
        if let Some(window) = state.lanes[self.service].window.as_mut() {
            window.stamp(at);
        }
        // Smooth over roughly the last ten answers.
        let latency = now.saturating_duration_since(self.sent_at);
        state.latency = (state.latency * 9 + latency) / 10;
        self.admission.pump(&mut state);
        earlier
    }
}

impl Permit {
    /// Marketo answered with `code`, one it does not count (see
    /// [`marketo::is_uncounted`]): the window slot and the day's unit go
    /// back at once; the concurrency slot is held until the permit drops.
    ///
    /// [`marketo::is_uncounted`]: crate::marketo::is_uncounted
    pub fn uncounted(&mut self, code: &str) {
        if self.stamped || !self.armed {
            return;
        }
        self.stamped = true;
        let admission = Arc::clone(&self.admission);
        admission
            .metrics
            .uncounted
            .with_label_values(&[admission.name(self.service), crate::marketo::code_label(code)])
            .inc();
        let mut state = admission.lock();
        state.uncount(self.service, self.day);
        admission.pump(&mut state);
    }

    /// How much earlier than `received` (epoch ms) Marketo's clock says it
    /// took the call; nothing when its time could not be used.
    pub(super) fn earlier(took: Result<i64, marketo_clock::Unusable>, received: i64) -> Duration {
        match took {
            Ok(took) => Duration::from_millis(u64::try_from(received - took).unwrap_or(0)),
            Err(marketo_clock::Unusable::Outside(by)) => {
                tracing::warn!(
                    off_by_ms = by,
                    off_for_seconds = marketo_clock::OFF_FOR.as_secs(),
                    "the time in Marketo's requestId cannot be when it took the call (its clock jumped, \
                     or the field is not a clock): window slots count from the answer for a while"
                );
                Duration::ZERO
            }
            Err(marketo_clock::Unusable::Off) => Duration::ZERO,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // A call that ended without an answer may still have reached
        // Marketo: count it as answered now.
        self.answered();
        let admission = Arc::clone(&self.admission);
        let mut state = admission.lock();
        state.in_flight -= 1;
        state.lanes[self.service].in_flight -= 1;
        admission.pump(&mut state);
    }
}

/// What one call to Marketo holds while it runs: its [`Permit`] in this
/// replica's limits and, when replicas share the instance, its [`Lease`]
/// on the shared ones. Dropping it gives both back.
///
/// [`Lease`]: shared::Lease
#[derive(Debug)]
pub struct Slot {
    pub(super) permit: Permit,
    pub(super) lease: Option<shared::Lease>,
}

impl Slot {
    pub fn new(permit: Permit, lease: Option<shared::Lease>) -> Self {
        Self { permit, lease }
    }

    /// This replica's calls today when this one was sent, itself
    /// included: what Marketo had counted of them when it counted this
    /// one, but for calls sent at the same moment. Known for the proxy's
    /// own calls only.
    pub fn day_count(&self) -> Option<u64> {
        self.permit.day_count
    }

    /// A slot in this replica's limits only.
    pub fn local(permit: Permit) -> Self {
        Self { permit, lease: None }
    }

    /// When the call was sent.
    pub fn sent_at(&self) -> Instant {
        self.permit.sent_at()
    }

    /// Whether this call probes, for every replica, whether Marketo's day
    /// is spent after its 607.
    pub fn is_shared_probe(&self) -> bool {
        self.lease.as_ref().is_some_and(shared::Lease::is_probe)
    }

    /// Marketo's answer arrived: the window slots start their countdown.
    pub async fn answered(&mut self) {
        self.answered_by(None).await;
    }

    /// Marketo's answer arrived with its clock at `marketo` (see
    /// [`Permit::answered_by`]).
    pub async fn answered_by(&mut self, marketo: Option<i64>) {
        let earlier = self.permit.answered_by(marketo);
        if let Some(lease) = self.lease.as_mut() {
            lease.answered(earlier).await;
        }
    }

    /// Marketo answered with `code`, one it does not count: the window
    /// slots and the day's unit go back, here and in the shared limits;
    /// the concurrency slots are held until the slot drops.
    pub async fn uncounted(&mut self, code: &str) {
        self.permit.uncounted(code);
        if let Some(lease) = self.lease.as_mut() {
            lease.uncounted().await;
        }
    }

    /// The call was never sent: this replica's limits get back everything
    /// it took. (A shared window slot is not taken back: another replica
    /// may already have counted it.)
    pub fn unsent(self) {
        self.permit.unsent();
    }

    /// Keeps the slot for `grace` after a call that got no answer: Marketo
    /// may still be executing it, and its window slot counts from now.
    /// Held on `tasks` until the server stops.
    pub fn hold_for(mut self, grace: Duration, tasks: &Tasks) {
        self.permit.answered();
        tasks.until_stopped(async move {
            tokio::time::sleep(grace).await;
            drop(self);
        });
    }
}
