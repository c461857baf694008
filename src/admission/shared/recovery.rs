//! Losing Redis and getting it back: the fallback to this replica's split
//! of what the instance had left, the attempts to get back in touch, the
//! catch-up that writes what was done meanwhile (by id, in batches Redis
//! counts once), the hold a Redis that lost its data keeps while every
//! replica writes its slots again, and the renewal of leases meanwhile.

use super::*;

impl SharedLimits {
    /// Redis is gone: enforce this replica's part of what the instance
    /// had left alone.
    pub(super) fn fall_back(&self, admission: &Arc<Admission>) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.fell_back.store(true, Ordering::Release);
            tracing::warn!(
                replicas = self.fallback_replicas,
                "Redis is unreachable: enforcing 1/{} of what the instance has left here until it is back",
                self.fallback_replicas
            );
            self.metrics.backend_up.set(0);
            *lock(&self.lost_at) = Some(Instant::now());
            let granted = u32::try_from(self.leases_mut().synced.len()).unwrap_or(u32::MAX);
            let seen = lock(&self.seen).clone();
            let unseen = seen.unseen_by(Instant::now());
            admission.split_what_is_left(
                self.fallback_replicas,
                seen.instance,
                seen.frees,
                self.pending,
                unseen,
                granted,
            );
        }
    }

    /// Once every call the others had made before Redis was lost has
    /// surely freed its slot and lease, this replica's share is a plain
    /// `1 / fallback_replicas` of the limits.
    pub(super) fn settle_share(&self, admission: &Arc<Admission>) {
        let mut lost_at = lock(&self.lost_at);
        if lost_at.is_some_and(|at| at.elapsed() >= self.pending) {
            *lost_at = None;
            admission.set_fallback_split(self.fallback_replicas);
        }
    }

    /// Renews this replica's leases and, while Redis is unreachable, tries
    /// it again; back in touch, writes what was done meanwhile and returns
    /// to the shared limits. Runs while it is polled.
    pub fn maintenance(
        self: &Arc<Self>,
        admission: Arc<Admission>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(self);
        async move {
            let mut since_renewal = Duration::ZERO;
            let tick = RETRY_EVERY.min(shared.lease / 3);
            loop {
                if !shared.is_up() {
                    shared.recover(&admission).await;
                    if !shared.is_up() {
                        shared.settle_share(&admission);
                    }
                    tokio::time::sleep(RETRY_EVERY).await;
                    continue;
                }
                tokio::time::sleep(tick).await;
                match shared.same_data(&admission).await {
                    // A failing script is counted and logged where it ran;
                    // Redis itself still answers.
                    Err(error) if !error.is_unreachable() => {}
                    Err(_) => {
                        shared.reconnect_now(&admission).await;
                        continue;
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            "Redis lost the shared counts (restarted empty?): writing this replica's window slots and leases again"
                        );
                        shared.reconnect_now(&admission).await;
                        since_renewal = shared.lease;
                    }
                }
                since_renewal += tick;
                if since_renewal >= shared.lease / 3 {
                    since_renewal = Duration::ZERO;
                    if shared
                        .renew_leases()
                        .await
                        .is_err_and(|error| error.is_unreachable())
                    {
                        shared.fall_back(&admission);
                    }
                }
            }
        }
    }

    /// Makes Redis grant nothing for [`SETTLE`], unless it already holds
    /// acquisitions.
    pub(super) async fn hold_acquisitions(&self) -> Result<(), SharedError> {
        let args = scripts::Hold {
            hold_ms: millis(SETTLE),
        };
        self.run(&[self.key("settling").as_str()], &args).await.map(drop)
    }

    /// Whether Redis still holds the data this replica saw there (`true`
    /// the first time it looks). Takes what other replicas learned since
    /// the last look.
    pub(super) async fn same_data(&self, admission: &Arc<Admission>) -> Result<bool, SharedError> {
        let keys = [self.key("epoch"), self.key("settling"), self.key("learned")];
        let args = scripts::Epoch {
            new_mark: &call_id(),
            settle_ms: millis(SETTLE),
        };
        let (epoch, learned) = self.run(&keys.each_ref().map(String::as_str), &args).await?;
        self.learned_changed(learned, admission).await;
        let mut known = lock(&self.epoch);
        let same = known.as_ref().is_none_or(|known| *known == epoch);
        *known = Some(epoch);
        Ok(same)
    }

    pub(super) async fn renew_leases(&self) -> Result<(), SharedError> {
        let leases: Vec<(usize, String)> = self
            .leases_mut()
            .synced
            .iter()
            .filter(|(_, synced)| **synced)
            .map(|(lease, _)| lease.clone())
            .collect();
        for (service, id) in leases {
            let keys = [
                self.key("inflight"),
                self.service_key("inflight", service),
                self.key("done"),
            ];
            let args = scripts::Renew {
                id: &id,
                lease_ms: millis(self.lease),
            };
            self.run(&keys.each_ref().map(String::as_str), &args).await?;
        }
        Ok(())
    }

    /// Contacts Redis once, before the first request is served, so that a
    /// replica starts on the shared limits when Redis is there.
    pub async fn connect(&self, admission: &Arc<Admission>) {
        self.try_recover(admission).await;
        if !self.is_up() {
            tracing::warn!(
                "Redis is unreachable: enforcing 1/{} of the instance's limits here until it answers",
                self.fallback_replicas
            );
        }
    }

    /// Redis failed just now, or lost its data: one attempt at once to
    /// get back in touch, during which no call starts on this replica's
    /// own share (what it knows of the others may be out of date); if it
    /// fails, the share holds until Redis answers.
    pub(super) async fn reconnect_now(&self, admission: &Arc<Admission>) {
        self.reconnecting.store(true, Ordering::Release);
        self.fall_back(admission);
        self.recover(admission).await;
        self.reconnecting.store(false, Ordering::Release);
    }

    /// Gets back in touch with Redis, one attempt at a time; callers that
    /// waited for another's attempt take its result.
    pub(super) async fn recover(&self, admission: &Arc<Admission>) {
        let seen = self.recoveries.load(Ordering::Acquire);
        let _attempt = self.recovering.lock().await;
        if self.is_up() || self.recoveries.load(Ordering::Acquire) != seen {
            return;
        }
        self.try_recover(admission).await;
        self.recoveries.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) async fn try_recover(&self, admission: &Arc<Admission>) {
        // A new connection, not the one that failed, and an answer to PING
        // before anything waits on the catch-up.
        if self.backend.ping().await.is_err() {
            return;
        }
        // The mark of the data this replica now writes into: a later change
        // means Redis lost it.
        *lock(&self.epoch) = None;
        if self.same_data(admission).await.is_err() {
            return;
        }
        // Back after an outage that outlasted the attempt made at once: the
        // others are likely back on their shares too, with calls Redis
        // does not know until their next attempt. Nothing is granted
        // before they had time to write them.
        if self.fell_back.load(Ordering::Acquire)
            && !self.reconnecting.load(Ordering::Acquire)
            && self.hold_acquisitions().await.is_err()
        {
            return;
        }
        // Acquisitions whose answers were lost while it was going: give
        // back what they took before anything else.
        let to_release = std::mem::take(&mut *lock(&self.to_release));
        for (index, (service, day, id)) in to_release.iter().enumerate() {
            if self.undo_acquisition(*service, *day, id).await.is_err() {
                lock(&self.to_release).extend_from_slice(&to_release[index..]);
                return;
            }
        }
        // This replica's answered calls whose slots still run, and its calls
        // in flight, by id: Redis may have come back empty, or not have
        // seen them.
        let now = Instant::now();
        let slots: Vec<(String, Duration)> = lock(&self.recent_slots)
            .iter()
            .filter(|(_, frees_at)| *frees_at > now)
            .map(|(id, frees_at)| (id.clone(), *frees_at - now))
            .collect();
        let live: Vec<(usize, String)> = {
            let mut leases = self.leases_mut();
            leases.catching_up = true;
            leases.synced.keys().cloned().collect()
        };
        // The calls made meanwhile, in batches Redis counts once, each to
        // the day it was made on (an outage may cross midnight).
        let batches = {
            let counts = std::mem::take(&mut *lock(&self.unsynced));
            let mut batches = lock(&self.batches);
            for (day, counts) in counts {
                if counts.iter().any(|calls| *calls > 0) {
                    batches.push((call_id(), day, counts));
                }
            }
            batches.clone()
        };
        let mut days: Vec<NaiveDate> = batches.iter().map(|(_, day, _)| *day).collect();
        days.sort_unstable();
        days.dedup();
        let args = scripts::CatchUp {
            pending_ms: millis(self.pending),
            lease_ms: millis(self.lease),
            day_ttl_s: DAY_TTL.as_secs(),
            slots: slots
                .iter()
                .map(|(id, left)| (id.as_str(), millis(*left)))
                .collect(),
            live: live.iter().map(|(_, id)| id.as_str()).collect(),
            batches: batches
                .iter()
                .map(|(batch, day, counts)| scripts::Batch {
                    id: batch,
                    day: days.binary_search(day).unwrap_or_default(),
                    calls: self
                        .services
                        .iter()
                        .zip(counts)
                        .filter(|(_, calls)| **calls > 0)
                        .map(|(limits, calls)| (limits.field.as_str(), *calls))
                        .collect(),
                })
                .collect(),
        };
        let mut keys = vec![
            self.key("window"),
            self.key("inflight"),
            self.key("batches"),
            self.key("done"),
        ];
        keys.extend(days.iter().map(|day| self.day_key(*day)));
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        if self.run(&keys, &args).await.is_err() {
            self.leases_mut().catching_up = false;
            return;
        }
        lock(&self.batches).retain(|(batch, _, _)| !batches.iter().any(|(sent, _, _)| sent == batch));
        self.up.store(true, Ordering::Release);
        let mut over = Vec::new();
        {
            let mut leases = self.leases_mut();
            for lease in &live {
                match leases.synced.get_mut(lease) {
                    Some(synced) => *synced = true,
                    None => over.push(lease),
                }
            }
            leases.catching_up = false;
        }
        // Calls answered or over while the catch-up was on its way were
        // written as still running: their slots start their countdown now
        // and the leases of those over go.
        let answered: Vec<&(usize, String)> = {
            let recent = lock(&self.recent_slots);
            live.iter()
                .filter(|(_, id)| {
                    recent.iter().any(|(answered, _)| answered == id)
                        && !slots.iter().any(|(written, _)| written == id)
                })
                .collect()
        };
        *lock(&self.lost_at) = None;
        self.fell_back.store(false, Ordering::Release);
        self.metrics.backend_up.set(1);
        admission.set_fallback_split(1);
        tracing::info!("Redis answers: the instance's limits are shared with the other replicas");
        for (service, id) in answered {
            self.stamp(*service, id, Duration::ZERO).await;
        }
        for (service, id) in over {
            self.release(*service, id).await;
        }
    }
}
