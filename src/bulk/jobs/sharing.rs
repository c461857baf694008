//! Bulk jobs shared by replicas: with the Redis backend the jobs, the
//! places in the queues and the day's counts are the instance's
//! ([`crate::bulk::shared`]). A place is taken in Redis, what an answer
//! says is written there before the place is given back, and this
//! replica's picture is read back every [`WAITING_POLL`] while an enqueue
//! waits here (every [`REFRESH_EVERY`] otherwise, and at once when a place
//! frees here), so a place freed through another replica goes to a waiter
//! here within that.
//!
//! While Redis is unreachable the replica keeps to its part of what the
//! instance had left: of the places not held by the jobs it knew of or by
//! other replicas, `1 / fallback_replicas`; of the day's export bytes
//! left, the same. It tries Redis every second, and once it answers writes
//! what it did and saw meanwhile (places it holds, places it gave back,
//! every job that changed), which counts nothing twice, then shares again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use tokio::time::Instant;

use super::{BulkJobs, Job, JobState, Offline, Queue, Reservation, Seen, State, index, someone_waits_in};
use crate::admission::shared::{SharedError, call_id};
use crate::bulk::shared::{DayCounts, SharedBulk, Snapshot};
use crate::tasks::Tasks;

/// While an enqueue waits here, Redis is asked this often whether a place
/// freed.
pub const WAITING_POLL: Duration = Duration::from_millis(100);
/// How often the picture of the instance's bulk jobs is read from Redis.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How often an unreachable Redis is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

impl BulkJobs {
    /// With Redis and nobody waiting here: a place from Redis at once, if
    /// the queue has room.
    pub(super) async fn admit_shared(self: &Arc<Self>, queue: Queue, service: usize) -> Option<Reservation> {
        let (shared, _) = self.shared_up()?;
        if someone_waits_in(&self.lock().lines[index(queue)]) {
            return None;
        }
        let (asking, granted) = self.ask_for_place(shared, queue, service, None).await;
        let id = asking.answered();
        let mut state = self.lock();
        match granted {
            Ok(true) => Some(self.hold(&mut state, queue, id)),
            Ok(false) => None,
            Err(_) => {
                // Its answer was lost: the place may have been taken.
                self.go_offline(&mut state);
                state.to_release.push((queue, id));
                None
            }
        }
    }

    /// Asks Redis for a place in `queue` for `service` under a new id,
    /// counted as waiting there for `waits`: Redis' answer, and the asking,
    /// which gives the place back unless the caller takes its id.
    async fn ask_for_place<'a>(
        self: &'a Arc<Self>,
        shared: &SharedBulk,
        queue: Queue,
        service: usize,
        waits: Option<Duration>,
    ) -> (Asking<'a>, Result<bool, SharedError>) {
        let asking = Asking {
            jobs: self,
            queue,
            id: Some(call_id()),
        };
        let owner = (service != self.internal).then_some(service);
        let limit = self.limits[index(queue)];
        let granted = shared.admit(queue, asking.id(), limit, owner, waits).await;
        (asking, granted)
    }

    /// Gives the place `id` back in Redis (later, if Redis is unreachable).
    pub(super) fn give_back(self: &Arc<Self>, state: &mut State, queue: Queue, id: String) {
        if self.shared.is_none() {
            return;
        }
        if state.offline.is_some() || !Tasks::can_run() {
            state.to_release.push((queue, id));
            return;
        }
        let jobs = Arc::clone(self);
        self.tasks.to_the_end(async move {
            let Some(shared) = &jobs.shared else { return };
            let released = shared.places(queue, &[], std::slice::from_ref(&id)).await;
            if released.is_err_and(|error| error.is_unreachable()) {
                let mut state = jobs.lock();
                jobs.go_offline(&mut state);
                state.to_release.push((queue, id));
            }
            jobs.wake_shared.notify_one();
        });
    }

    /// Writes to Redis what an answer said and takes the counts Redis has
    /// now, or, when Redis cannot be reached, counts it here.
    pub(super) async fn write(&self, day: NaiveDate, seen: &[Seen], spent: bool) {
        let Some(shared) = &self.shared else { return };
        let written = async {
            if spent {
                shared.mark_spent(day).await?;
            }
            if seen.is_empty() {
                return Ok(DayCounts::default());
            }
            shared.observe(day, seen).await
        }
        .await;
        let mut state = self.lock();
        match written {
            Ok(counts) => {
                for seen in seen {
                    if let Some(job) = state.jobs.get_mut(&seen.id) {
                        job.counted |= seen.started;
                        job.charged |= job.state == JobState::Completed && job.file_size.is_some();
                    }
                }
                if state.day == day {
                    self.merge(&mut state, &counts);
                }
            }
            Err(_) => {
                self.go_offline(&mut state);
                self.count(&mut state, seen);
            }
        }
        self.publish(&state);
        self.wake_shared.notify_one();
    }

    /// Takes the day's counts as Redis has them. They only grow during a
    /// day, and answers may arrive out of order, so each count is the
    /// highest seen (this replica's own while Redis was unreachable are
    /// in Redis's once it has caught up).
    fn merge(&self, state: &mut State, counts: &DayCounts) {
        state.export_bytes = state.export_bytes.max(counts.export_bytes);
        state.export_spent |= counts.spent;
        for (index, (day, shared)) in state.services.iter_mut().zip(&counts.services).enumerate() {
            day.jobs = day.jobs.max(shared.jobs);
            let more = shared.export_bytes.saturating_sub(day.export_bytes);
            day.export_bytes += more;
            self.metrics
                .bulk_export_bytes
                .with_label_values(&[self.names[index].as_str()])
                .inc_by(more);
        }
    }

    /// Contacts Redis once before anything is served, so that a replica
    /// starts on the instance's bulk state when Redis is there.
    pub async fn connect(self: &Arc<Self>) {
        if self.shared.is_some() && self.reconnect().await.is_err() {
            tracing::warn!(
                "Redis is unreachable: bulk admission keeps to 1/{} of the queues and export bytes here until it answers",
                self.fallback_replicas
            );
        }
    }

    /// With Redis: reads the instance's bulk state every [`REFRESH_EVERY`]
    /// ([`WAITING_POLL`] while an enqueue waits here, or at once when woken)
    /// and hands the places Redis grants to the waiters here; while Redis
    /// is unreachable, tries it every second and writes what was done
    /// meanwhile. Runs while it is polled.
    pub fn sharing(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let jobs = Arc::clone(self);
        async move {
            let Some(shared) = jobs.shared.as_ref() else {
                return;
            };
            loop {
                let (offline, waiting) = {
                    let state = jobs.lock();
                    (state.offline.is_some(), state.lines.iter().any(someone_waits_in))
                };
                if offline {
                    tokio::time::sleep(RETRY_EVERY).await;
                    let _ = jobs.reconnect().await;
                    continue;
                }
                let every = if waiting { WAITING_POLL } else { REFRESH_EVERY };
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = jobs.wake_shared.notified() => {}
                }
                let unreachable =
                    |result: Result<(), SharedError>| result.is_err_and(|error| error.is_unreachable());
                if unreachable(jobs.refresh(shared).await) || unreachable(jobs.pump_shared(shared).await) {
                    jobs.go_offline(&mut jobs.lock());
                }
            }
        }
    }

    /// Reads the instance's bulk state into this replica's picture.
    async fn refresh(&self, shared: &SharedBulk) -> Result<(), SharedError> {
        let (day, asked_at) = {
            let mut state = self.lock();
            self.roll(&mut state);
            (state.day, Instant::now())
        };
        let snapshot = shared.snapshot(day).await?;
        let mut state = self.lock();
        if state.day == day && state.offline.is_none() {
            self.apply(&mut state, snapshot, asked_at);
            self.publish(&state);
        }
        Ok(())
    }

    /// Takes Redis's picture: its jobs (with what this replica heard since
    /// it was asked for), its day counts and the places held.
    fn apply(&self, state: &mut State, snapshot: Snapshot, asked_at: Instant) {
        let now = Instant::now();
        let mut jobs = HashMap::with_capacity(snapshot.jobs.len());
        for (id, shared) in snapshot.jobs {
            let heard = now.checked_sub(shared.quiet).unwrap_or(now);
            let job = match state.jobs.remove(&id) {
                Some(mut job) => {
                    if job.state.is_active() && !shared.state.is_active() && shared.state > job.state {
                        state.lines[index(job.kind.queue())].paused_until = None;
                    }
                    job.state = job.state.max(shared.state);
                    job.owner = job.owner.or(shared.owner);
                    job.charged |= shared.charged;
                    job.counted |= shared.counted;
                    job.heard = job.heard.max(heard);
                    job
                }
                None => Job {
                    kind: shared.kind,
                    base: shared.base,
                    state: shared.state,
                    owner: shared.owner,
                    heard,
                    charged: shared.charged,
                    counted: shared.counted,
                    file_size: None,
                    unsynced: false,
                    offline: false,
                },
            };
            jobs.insert(id, job);
        }
        // Jobs heard of here after the picture was taken are not in it yet.
        jobs.extend(
            state
                .jobs
                .drain()
                .filter(|(_, job)| job.heard >= asked_at || job.unsynced),
        );
        state.jobs = jobs;
        self.merge(state, &snapshot.day);
        state.reserved_seen = snapshot.reserved;
    }

    /// Hands places taken in Redis to the waiters here, in the order of
    /// [`Self::next_waiter`], until a queue has no room.
    async fn pump_shared(self: &Arc<Self>, shared: &SharedBulk) -> Result<(), SharedError> {
        for queue in Queue::ALL {
            loop {
                let service = {
                    let state = self.lock();
                    let line = &state.lines[index(queue)];
                    let paused = line.paused_until.is_some_and(|until| until > Instant::now());
                    match self.next_lane(&state, queue) {
                        Some(service) if state.offline.is_none() && !paused => service,
                        _ => break,
                    }
                };
                // It is asked for again while it waits; it counts as waiting
                // a little longer, so that it does in between.
                let waits = Some(WAITING_POLL * 3);
                let (asking, granted) = self.ask_for_place(shared, queue, service, waits).await;
                // Unanswered (Redis failed): the place is given back.
                let granted = granted?;
                let id = asking.answered();
                if !granted {
                    break;
                }
                let mut state = self.lock();
                loop {
                    let Some(waiter) = self.next_waiter(&mut state, queue) else {
                        // Nobody waits any more.
                        self.give_back(&mut state, queue, id);
                        break;
                    };
                    if waiter.reply.send(id.clone()).is_ok() {
                        state.lines[index(queue)].held.insert(id);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Redis is unreachable: this replica keeps to its part of what the
    /// instance had left, and hands out places itself within it.
    pub(super) fn go_offline(&self, state: &mut State) {
        if self.shared.is_none() || state.offline.is_some() {
            return;
        }
        tracing::warn!(
            replicas = self.fallback_replicas,
            "Redis is unreachable: bulk admission keeps to 1/{} of what the instance had left here until it is back",
            self.fallback_replicas
        );
        let reserved_elsewhere = Queue::ALL.map(|queue| {
            state.reserved_seen[index(queue)].saturating_sub(state.lines[index(queue)].held.len())
        });
        state.offline = Some(Offline {
            export_bytes: state.export_bytes,
            reserved_elsewhere,
        });
        for queue in Queue::ALL {
            self.pump(state, queue);
        }
    }

    /// Gets back in touch with Redis: gives back the places given up
    /// meanwhile, holds those still held, writes every job that changed
    /// (which counts nothing twice), then takes the instance's picture and
    /// shares again.
    async fn reconnect(self: &Arc<Self>) -> Result<(), SharedError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        loop {
            let (day, release, held, seen, spent) = {
                let mut state = self.lock();
                self.roll(&mut state);
                let held = Queue::ALL
                    .map(|queue| state.lines[index(queue)].held.iter().cloned().collect::<Vec<_>>());
                let seen: Vec<Seen> = state
                    .jobs
                    .iter_mut()
                    .filter(|(_, job)| job.unsynced)
                    .map(|(id, job)| {
                        job.unsynced = false;
                        Seen {
                            id: id.clone(),
                            kind: job.kind,
                            base: job.base.clone(),
                            state: job.state,
                            owner: job.owner,
                            started: job.counted,
                            file_size: job.file_size,
                        }
                    })
                    .collect();
                (
                    state.day,
                    std::mem::take(&mut state.to_release),
                    held,
                    seen,
                    state.export_spent,
                )
            };
            let written = async {
                for queue in Queue::ALL {
                    let release: Vec<String> = release
                        .iter()
                        .filter(|(given_back, _)| *given_back == queue)
                        .map(|(_, id)| id.clone())
                        .collect();
                    shared.places(queue, &held[index(queue)], &release).await?;
                }
                if spent {
                    shared.mark_spent(day).await?;
                }
                if !seen.is_empty() {
                    shared.observe(day, &seen).await?;
                }
                let asked_at = Instant::now();
                Ok((shared.snapshot(day).await?, asked_at))
            }
            .await;
            let mut state = self.lock();
            let (snapshot, asked_at) = match written {
                Ok(written) => written,
                Err(error) => {
                    state.to_release.extend(release);
                    for seen in &seen {
                        if let Some(job) = state.jobs.get_mut(&seen.id) {
                            job.unsynced = true;
                        }
                    }
                    return Err(error);
                }
            };
            // Something changed meanwhile: write it too.
            if !state.to_release.is_empty() || state.jobs.values().any(|job| job.unsynced) || state.day != day
            {
                continue;
            }
            self.apply(&mut state, snapshot, asked_at);
            state.offline = None;
            state.jobs.values_mut().for_each(|job| job.offline = false);
            self.publish(&state);
            tracing::info!(
                "Redis answers: bulk jobs, queue places and export bytes are shared with the other replicas"
            );
            self.wake_shared.notify_one();
            return Ok(());
        }
    }
}

/// A place asked of Redis: unless its answer arrives here, it is given
/// back (it may have been taken), however the asking ends.
struct Asking<'a> {
    jobs: &'a Arc<BulkJobs>,
    queue: Queue,
    id: Option<String>,
}

impl Asking<'_> {
    fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    fn answered(mut self) -> String {
        self.id.take().unwrap_or_default()
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut state = self.jobs.lock();
            self.jobs.give_back(&mut state, self.queue, id);
        }
    }
}
