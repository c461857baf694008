//! What one call holds of the shared limits: an acquisition on its way
//! ([`Asked`], released by id if its answer is lost) and a granted call's
//! [`Lease`] (its window slot stamped when the answer arrives, its
//! concurrency lease released when it is dropped).

use super::*;

/// The keys of one acquisition, in the order the acquire script names
/// them.
pub(super) struct AcquisitionKeys(pub(super) [String; 9]);

impl AcquisitionKeys {
    pub(super) fn each(&self) -> [&str; 9] {
        self.0.each_ref().map(String::as_str)
    }
}

/// An acquisition on its way: unless its answer arrives, what it may have
/// taken is released in the background, however the asking ends.
pub(super) struct Asked {
    pub(super) shared: Arc<SharedLimits>,
    pub(super) service: usize,
    pub(super) day: NaiveDate,
    pub(super) id: String,
    pub(super) answered: bool,
}

impl Drop for Asked {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let (service, day, id) = (self.service, self.day, std::mem::take(&mut self.id));
        if Tasks::can_run() {
            let tasks = shared.tasks.clone();
            tasks.to_the_end(async move { shared.release_unanswered(service, day, id).await });
        } else {
            lock(&shared.to_release).push((service, day, id));
        }
    }
}

/// A call's hold on the shared limits: its window slot is stamped when
/// the answer arrives, its concurrency lease released when it is dropped.
pub struct Lease {
    pub(super) shared: Arc<SharedLimits>,
    pub(super) service: usize,
    /// The day its unit was counted to.
    pub(super) day: NaiveDate,
    pub(super) id: String,
    pub(super) stamped: bool,
    /// The call that probes, for every replica, whether Marketo's day is
    /// spent after its 607.
    pub(super) probe: bool,
}

impl Lease {
    /// Whether this call probes Marketo's day for every replica.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Marketo did not count the call: its shared window slots and its
    /// unit of the day go back (in Redis, or from the calls Redis is still
    /// to hear of); its concurrency lease stays until it is dropped.
    pub async fn uncounted(&mut self) {
        if self.stamped {
            return;
        }
        self.stamped = true;
        if self.shared.is_synced(self.service, &self.id) {
            self.shared.uncount(self.service, self.day, &self.id).await;
        } else {
            self.shared.uncount_unsynced(self.service, self.day);
        }
    }

    /// Marketo answered: the shared window slot starts its countdown (in
    /// Redis, or here until Redis hears of it).
    /// `earlier` than now, Marketo took the call at the latest.
    pub async fn answered(&mut self, earlier: Duration) {
        if !self.stamped {
            self.stamped = true;
            self.shared.hold_recent_slot(&self.id, earlier);
            if self.shared.is_synced(self.service, &self.id) {
                self.shared.stamp(self.service, &self.id, earlier).await;
            }
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("service", &self.service)
            .field("stamped", &self.stamped)
            .finish_non_exhaustive()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let shared = Arc::clone(&self.shared);
        let (service, id, stamped) = (self.service, std::mem::take(&mut self.id), self.stamped);
        let synced = shared.leases_mut().synced.remove(&(service, id.clone()));
        if !stamped {
            shared.hold_recent_slot(&id, Duration::ZERO);
        }
        if synced == Some(false) {
            // Redis never saw this call: its slot is written with the
            // catch-up, its lease needs no release.
            return;
        }
        if !shared.is_up() {
            // The lease lapses on its own, and the slot with it.
            return;
        }
        // Off the request path; without a runtime (shutdown) the lease
        // simply lapses.
        let tasks = shared.tasks.clone();
        tasks.to_the_end(async move {
            if !stamped {
                shared.stamp(service, &id, Duration::ZERO).await;
            }
            shared.release(service, &id).await;
        });
    }
}

/// The day's units of leases: counted here while Redis is away, given
/// back when Marketo did not count the call.
impl SharedLimits {
    /// A call of `service` counted to `day` while Redis is unreachable.
    pub(super) fn count_unsynced(&self, service: usize, day: NaiveDate) {
        let services = self.services.len();
        let mut unsynced = lock(&self.unsynced);
        if let Some(count) = unsynced
            .entry(day)
            .or_insert_with(|| vec![0; services])
            .get_mut(service)
        {
            *count += 1;
        }
    }

    /// A call Redis is still to hear of was not counted by Marketo: the
    /// catch-up counts one call less to its service's `day`.
    pub(super) fn uncount_unsynced(&self, service: usize, day: NaiveDate) {
        if let Some(count) = lock(&self.unsynced)
            .get_mut(&day)
            .and_then(|counts| counts.get_mut(service))
        {
            *count = count.saturating_sub(1);
        }
    }

    /// Marketo did not count a call Redis holds: its window slots and its
    /// unit of `day` go back.
    pub(super) async fn uncount(&self, service: usize, day: NaiveDate, id: &str) {
        let mut keys = vec![self.day_key(day)];
        keys.extend(self.window_keys(service));
        let args = scripts::Uncount {
            id,
            field: self.field(service),
        };
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let _ = self.run(&keys, &args).await;
    }
}
