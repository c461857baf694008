//! Every bulk job the proxy has seen, and admission to the queues they
//! share.
//!
//! The proxy learns about jobs from the calls and answers that pass
//! through it (create, enqueue, import, status, cancel, list; see
//! [`BulkJobs::observe`]) and from its own paced status calls
//! ([`super::poll`]). A job in `Queued` or `Processing` holds a place in
//! its queue, whoever started it; jobs started outside the proxy are
//! tracked too once Marketo names them (a status or list answer).
//!
//! An enqueue (or an import, which Marketo queues at once) needs a place:
//! it waits in its service's line until the queue has room, then holds a
//! [`Reservation`] until Marketo has answered, so that two enqueues never
//! take the same place. When the queue frees, the service with the fewest
//! jobs in that queue goes first (FIFO within a service), so one
//! integration's ten exports cannot shut the others out for the night.
//! A waiter whose deadline passes is refused with a local 1029.
//!
//! Export file bytes (`fileSize` of completed exports) are counted against
//! the day's allowance; once spent, creating or enqueuing an export is
//! refused locally until the reset. Per service the proxy counts the jobs
//! it enqueued today and the export bytes of its completed jobs.
//!
//! With the Redis backend the jobs, the places and the day's counts are
//! the instance's, shared by every replica: see [`sharing`].
//!
//! One mutex, never held across an await.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use chrono::NaiveDate;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::BulkError;
use super::endpoint::{
    EXPORT_QUOTA_MESSAGE, Endpoint, JobState, Kind, Op, Queue, TOO_MANY_IMPORTS, list_path, status_path,
};
use super::shared::ServiceDay;
use super::shared::{Seen, SharedBulk};
use crate::admission::shared::{SharedLimits, call_id};
use crate::config::Config;
use crate::limits::day::MarketoDay;
use crate::limits::fair_queue::{self, FairQueue, Waiting};
use crate::marketo::code;
use crate::metrics::Metrics;
use crate::tasks::Tasks;
pub use places::Reservation;

mod places;
mod sharing;
#[cfg(test)]
mod tests;

/// The day's bulk usage, for `/usage` and the ledger.
#[derive(Debug, Clone, Serialize)]
pub struct BulkUsage {
    pub day: NaiveDate,
    pub export_bytes: u64,
    pub export_bytes_limit: u64,
    pub export_bytes_remaining: u64,
    /// Jobs now in each queue (waiting or processing), all seen.
    pub extract_in_queue: usize,
    pub import_in_queue: usize,
    /// Per service name.
    pub services: Vec<(String, ServiceDay)>,
}

struct Job {
    kind: Kind,
    base: String,
    state: JobState,
    /// The service that started it; `None` for jobs started elsewhere.
    owner: Option<usize>,
    /// When the proxy last heard of it.
    heard: Instant,
    /// Its export bytes are counted.
    charged: bool,
    /// Its start is counted.
    counted: bool,
    file_size: Option<u64>,
    /// Changed while Redis was unreachable: written there once it is back.
    unsynced: bool,
    /// Started by this replica while Redis was unreachable.
    offline: bool,
}

struct Line {
    /// Places held for enqueues sent and not yet answered, by id.
    held: HashSet<String>,
    /// After Marketo said the queue was full.
    paused_until: Option<Instant>,
    /// Enqueues waiting for a place, one lane per service; each is handed
    /// the id of the place it gets.
    waiting: FairQueue<String>,
}

struct State {
    jobs: HashMap<String, Job>,
    lines: [Line; 2],
    day: NaiveDate,
    export_bytes: u64,
    /// Marketo said the day's export bytes are spent.
    export_spent: bool,
    services: Vec<ServiceDay>,
    /// A queue was full for reasons the proxy did not see: list the jobs
    /// and read their status again.
    reread: bool,
    /// Which list the next re-read calls.
    list_cursor: usize,
    /// With Redis: `Some` while it is unreachable.
    offline: Option<Offline>,
    /// Places held in each queue by every replica, as Redis last said.
    reserved_seen: [usize; 2],
    /// Places given back while Redis was unreachable.
    to_release: Vec<(Queue, String)>,
}

/// What this replica's share is taken from while Redis is unreachable.
#[derive(Debug, Default)]
struct Offline {
    /// The day's export bytes when Redis was lost.
    export_bytes: u64,
    /// Places the other replicas held in each queue then.
    reserved_elsewhere: [usize; 2],
}

/// The bulk jobs of one Marketo instance; see the module documentation.
pub struct BulkJobs {
    state: Mutex<State>,
    names: Vec<String>,
    internal: usize,
    limits: [usize; 2],
    export_daily_bytes: u64,
    pause: Duration,
    poll_after: Duration,
    poll_pace: Duration,
    /// The day the export bytes count in (Redis's, with Redis).
    marketo_day: MarketoDay,
    /// Where pauses and places given back in Redis run.
    tasks: Tasks,
    metrics: Metrics,
    /// Wakes the status poller early.
    wake_poller: Notify,
    /// The instance's bulk state in Redis, with the Redis backend.
    shared: Option<SharedBulk>,
    fallback_replicas: usize,
    /// Wakes the task that hands out places taken in Redis.
    wake_shared: Notify,
}

fn index(queue: Queue) -> usize {
    match queue {
        Queue::Extract => 0,
        Queue::Import => 1,
    }
}

impl BulkJobs {
    /// `redis`: the limits shared through Redis, whose connection and day
    /// the bulk state shares too.
    pub fn new(
        config: &Config,
        metrics: Metrics,
        redis: Option<Arc<SharedLimits>>,
        marketo_day: MarketoDay,
        tasks: Tasks,
    ) -> Arc<Self> {
        let names = config.counted_names();
        let bulk = &config.bulk;
        let fallback_replicas = redis
            .as_ref()
            .map_or(1, |redis| redis.fallback_replicas() as usize);
        let shared = redis.map(|redis| SharedBulk::new(config, redis));
        let line = || Line {
            held: HashSet::new(),
            paused_until: None,
            waiting: FairQueue::new(names.iter().map(|_| 1.0)),
        };
        let jobs = Arc::new(Self {
            state: Mutex::new(State {
                jobs: HashMap::new(),
                lines: [line(), line()],
                day: shared
                    .as_ref()
                    .map_or_else(|| marketo_day.today(), SharedBulk::day),
                export_bytes: 0,
                export_spent: false,
                services: vec![ServiceDay::default(); names.len()],
                reread: false,
                list_cursor: 0,
                // Until Redis has answered, this replica keeps to its share.
                offline: shared.as_ref().map(|_| Offline::default()),
                reserved_seen: [0; 2],
                to_release: Vec::new(),
            }),
            internal: names.len() - 1,
            names,
            limits: [
                bulk.extract_queue.get() as usize,
                bulk.import_queue.get() as usize,
            ],
            export_daily_bytes: bulk.export_daily_bytes.get(),
            pause: bulk.pause,
            poll_after: bulk.poll_after,
            poll_pace: bulk.poll_pace,
            marketo_day,
            tasks,
            metrics,
            wake_poller: Notify::new(),
            shared,
            fallback_replicas,
            wake_shared: Notify::new(),
        });
        // Every service's series exists from the start, at 0.
        for name in &jobs.names {
            jobs.metrics.bulk_export_bytes.with_label_values(&[name.as_str()]);
        }
        jobs.publish(&jobs.lock());
        jobs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh day: the export bytes and per-service counts start again;
    /// jobs still in a queue stay.
    fn roll(&self, state: &mut State) {
        let today = self
            .shared
            .as_ref()
            .map_or_else(|| self.marketo_day.today(), SharedBulk::day);
        if state.day != today {
            state.day = today;
            state.export_bytes = 0;
            if let Some(offline) = &mut state.offline {
                offline.export_bytes = 0;
            }
            state.export_spent = false;
            state
                .services
                .iter_mut()
                .for_each(|day| *day = ServiceDay::default());
            state.jobs.retain(|_, job| !job.state.is_final());
        }
    }

    /// How long until the day's export bytes come back.
    fn until_reset(&self) -> Duration {
        self.marketo_day.until_reset().max(Duration::from_secs(1))
    }

    /// Refuses a create or enqueue of an export once today's bytes are
    /// spent (with Redis, by every replica).
    pub async fn check_export_bytes(&self) -> Result<(), BulkError> {
        if let Some((shared, day)) = self.shared_up() {
            let counted = shared.export_day(day).await;
            let mut state = self.lock();
            match counted {
                Ok((bytes, spent)) if state.day == day && state.offline.is_none() => {
                    state.export_bytes = state.export_bytes.max(bytes);
                    state.export_spent |= spent;
                    self.publish(&state);
                }
                Ok(_) => {}
                Err(_) => self.go_offline(&mut state),
            }
        }
        let mut state = self.lock();
        self.roll(&mut state);
        if state.export_spent || state.export_bytes >= self.export_allowance(&state) {
            return Err(BulkError::ExportQuota {
                retry_after: self.until_reset(),
            });
        }
        Ok(())
    }

    /// The export bytes this replica lets the day have: all of them, or
    /// while Redis is unreachable, its part of what was left.
    fn export_allowance(&self, state: &State) -> u64 {
        match &state.offline {
            None => self.export_daily_bytes,
            Some(offline) => {
                let left = self.export_daily_bytes.saturating_sub(offline.export_bytes);
                offline.export_bytes + left / self.fallback_replicas as u64
            }
        }
    }

    /// The shared state and today, while Redis answers.
    fn shared_up(&self) -> Option<(&SharedBulk, NaiveDate)> {
        let mut state = self.lock();
        self.roll(&mut state);
        Some((self.sharing_now(&state)?, state.day))
    }

    /// The shared state, unless this replica is offline from it.
    fn sharing_now(&self, state: &State) -> Option<&SharedBulk> {
        self.shared.as_ref().filter(|_| state.offline.is_none())
    }

    /// Takes what a bulk call's answer says about its jobs. `body` is the
    /// answer when it was read whole (file downloads are not). With Redis,
    /// writes it there before it returns, so a place the call held is given
    /// back only once the job holds it.
    pub async fn observe(&self, endpoint: &Endpoint, service: usize, body: Option<&Bytes>) {
        if let Some(answer) = body.and_then(|body| serde_json::from_slice::<Value>(body).ok()) {
            self.take(endpoint, service, &answer).await;
        }
    }

    /// Takes what Marketo's answer `answer` to a bulk call says.
    async fn take(&self, endpoint: &Endpoint, service: usize, answer: &Value) {
        let (day, seen, spent) = {
            let mut state = self.lock();
            self.roll(&mut state);
            let owner = (service != self.internal).then_some(service);
            let shared_up = self.sharing_now(&state).is_some();
            if answer["success"] != Value::Bool(true) {
                let error = &answer["errors"][0];
                let quota = error["code"] == code::TOO_MANY_JOBS
                    && error["message"]
                        .as_str()
                        .is_some_and(|message| message.contains(EXPORT_QUOTA_MESSAGE));
                if !(quota && matches!(endpoint.op, Op::Create | Op::Enqueue)) {
                    return;
                }
                tracing::info!("Marketo says today's export bytes are spent");
                state.export_spent = true;
                self.publish(&state);
                if !shared_up {
                    return;
                }
                (state.day, Vec::new(), true)
            } else {
                let seen = self.take_answer(&mut state, endpoint, owner, answer);
                if !shared_up {
                    self.count(&mut state, &seen);
                }
                self.publish(&state);
                if !shared_up || seen.is_empty() {
                    return;
                }
                (state.day, seen, false)
            }
        };
        self.write(day, &seen, spent).await;
    }

    /// Marketo served the file of the job `endpoint` names (a 200, or a
    /// 206 of a part): only a completed job has one. A job the proxy does
    /// not know by that id is left alone.
    pub async fn file_served(&self, endpoint: &Endpoint, service: usize) {
        let Some(id) = endpoint.job.as_deref() else {
            return;
        };
        if !self.lock().jobs.contains_key(id) {
            return;
        }
        let answer =
            serde_json::json!({"success": true, "result": [{"exportId": id, "status": "Completed"}]});
        self.take(endpoint, service, &answer).await;
    }

    /// Updates the jobs an answer names; what it said of each, for
    /// counting and for Redis.
    fn take_answer(
        &self,
        state: &mut State,
        endpoint: &Endpoint,
        owner: Option<usize>,
        answer: &Value,
    ) -> Vec<Seen> {
        let now = Instant::now();
        let results = answer["result"].as_array().cloned().unwrap_or_default();
        let mut left = false;
        let mut seen = Vec::new();
        for result in &results {
            // The id Marketo gave; the path's spelling only for a job it
            // gave that id to.
            let id = job_id(result).or_else(|| endpoint.job.clone().filter(|id| state.jobs.contains_key(id)));
            let Some(id) = id else { continue };
            let reported = result["status"].as_str().and_then(JobState::from_marketo);
            let state_now = match endpoint.op {
                Op::Enqueue | Op::Import => Some(JobState::Queued),
                Op::Cancel => Some(JobState::Cancelled),
                _ => reported,
            };
            let Some(new_state) = state_now else { continue };
            let kind = endpoint.kind;
            // A job first seen now was in no queue before (an import is
            // queued by the call that creates it).
            let was = state.jobs.get(&id).map_or(JobState::Created, |job| job.state);
            let job = state.jobs.entry(id.clone()).or_insert_with(|| Job {
                kind,
                base: endpoint.base.clone(),
                state: new_state,
                owner,
                heard: now,
                charged: false,
                counted: false,
                file_size: None,
                unsynced: false,
                offline: false,
            });
            job.heard = now;
            // An answer may be older than one already taken (two polls
            // crossing); states only move forward.
            if new_state >= was || (was == JobState::Created && new_state.is_final()) {
                job.state = new_state;
            }
            if let Some(size) = result["fileSize"].as_u64() {
                job.file_size = Some(size);
            }
            left |= was.is_active() && !job.state.is_active();
            seen.push(Seen {
                id,
                kind,
                base: job.base.clone(),
                state: job.state,
                owner: job.owner.or(owner),
                started: matches!(endpoint.op, Op::Enqueue | Op::Import) && !was.is_active(),
                file_size: job.file_size,
            });
        }
        if left {
            let queue = endpoint.kind.queue();
            state.lines[index(queue)].paused_until = None;
            self.pump(state, queue);
        }
        seen
    }

    /// Counts here the starts and export bytes of `seen`: without Redis,
    /// or while it is unreachable (then written there once it is back).
    fn count(&self, state: &mut State, seen: &[Seen]) {
        let offline = state.offline.is_some();
        for seen in seen {
            let Some(job) = state.jobs.get_mut(&seen.id) else {
                continue;
            };
            job.unsynced |= offline;
            if seen.started && !job.counted {
                job.counted = true;
                job.offline |= offline;
                if let Some(owner) = seen.owner {
                    state.services[owner].jobs += 1;
                }
            }
            let export = job.state == JobState::Completed && job.kind.queue() == Queue::Extract;
            let Some(size) = job.file_size.filter(|_| export && !job.charged) else {
                continue;
            };
            job.charged = true;
            state.export_bytes += size;
            if let Some(owner) = job.owner {
                state.services[owner].export_bytes += size;
                self.metrics
                    .bulk_export_bytes
                    .with_label_values(&[self.names[owner].as_str()])
                    .inc_by(size);
            }
        }
    }

    /// The next status or list call the proxy should make of its own, if
    /// any, and the service it is made for: a job in a queue not heard
    /// about for `poll_after` (the least recently heard first), or, after
    /// Marketo said a queue was full, the lists of export jobs. A call made
    /// while a service waits for a place in that queue is that service's
    /// (the one that would get the place first); otherwise the proxy's.
    pub fn next_poll(&self) -> Option<(String, usize)> {
        let mut state = self.lock();
        self.roll(&mut state);
        let now = Instant::now();
        let waiting_for = |state: &State, queue: Queue| {
            let waiting = &state.lines[index(queue)].waiting;
            waiting
                .next_lane(|lane| waiting.lane_len(lane) > 0)
                .unwrap_or(self.internal)
        };
        if state.reread {
            let kinds = [Kind::Leads, Kind::Activities, Kind::ProgramMembers];
            let kind = kinds[state.list_cursor % kinds.len()];
            state.list_cursor += 1;
            if state.list_cursor % kinds.len() == 0 {
                state.reread = false;
            }
            let path = list_path(kind)?;
            return Some((
                format!("{path}?status=Queued,Processing"),
                waiting_for(&state, Queue::Extract),
            ));
        }
        let poll_after = self.poll_after;
        let (id, job) = state
            .jobs
            .iter_mut()
            .filter(|(_, job)| {
                job.state.is_active() && now.saturating_duration_since(job.heard) >= poll_after
            })
            .min_by_key(|(_, job)| job.heard)?;
        job.heard = now;
        let (path, queue) = (status_path(job.kind, &job.base, id), job.kind.queue());
        Some((path, waiting_for(&state, queue)))
    }

    /// Wakes when the poller should look again before its next tick.
    pub fn poller_woken(&self) -> &Notify {
        &self.wake_poller
    }

    pub fn poll_pace(&self) -> Duration {
        self.poll_pace
    }

    /// The proxy's own lane: its calls are counted under its name.
    pub fn internal(&self) -> usize {
        self.internal
    }

    pub fn usage(&self) -> BulkUsage {
        let mut state = self.lock();
        self.roll(&mut state);
        BulkUsage {
            day: state.day,
            export_bytes: state.export_bytes,
            export_bytes_limit: self.export_daily_bytes,
            export_bytes_remaining: self.export_daily_bytes.saturating_sub(state.export_bytes),
            extract_in_queue: self.in_queue(&state, Queue::Extract),
            import_in_queue: self.in_queue(&state, Queue::Import),
            services: self
                .names
                .iter()
                .cloned()
                .zip(state.services.iter().copied())
                .collect(),
        }
    }

    /// Today's counts, for the ledger: the day, per service name, and the
    /// export bytes of every job seen.
    pub fn daily(&self) -> (NaiveDate, Vec<(String, ServiceDay)>, u64) {
        let usage = self.usage();
        (usage.day, usage.services, usage.export_bytes)
    }

    /// Takes counts saved earlier today (a restart).
    pub fn restore(&self, day: NaiveDate, services: &HashMap<String, ServiceDay>, export_bytes: u64) {
        let mut state = self.lock();
        self.roll(&mut state);
        if state.day != day {
            return;
        }
        state.export_bytes = state.export_bytes.max(export_bytes);
        for (index, name) in self.names.iter().enumerate() {
            if let Some(saved) = services.get(name) {
                let day = &mut state.services[index];
                let added = saved.export_bytes.saturating_sub(day.export_bytes);
                day.jobs = day.jobs.max(saved.jobs);
                day.export_bytes += added;
                self.metrics
                    .bulk_export_bytes
                    .with_label_values(&[name.as_str()])
                    .inc_by(added);
            }
        }
        self.publish(&state);
    }

    fn publish(&self, state: &State) {
        let mut counts: HashMap<(Kind, JobState), i64> = HashMap::new();
        for job in state.jobs.values() {
            *counts.entry((job.kind, job.state)).or_default() += 1;
        }
        for kind in Kind::ALL {
            for job_state in JobState::ALL {
                self.metrics
                    .bulk_jobs
                    .with_label_values(&[kind.label(), job_state.label()])
                    .set(counts.get(&(kind, job_state)).copied().unwrap_or(0));
            }
        }
        let remaining = if state.export_spent {
            0
        } else {
            self.export_daily_bytes.saturating_sub(state.export_bytes)
        };
        self.metrics
            .bulk_export_bytes_remaining
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }
}

/// Whether `answer` is Marketo saying `queue` is full.
pub fn says_full(queue: Queue, body: Option<&Bytes>) -> bool {
    let Some(body) = body else { return false };
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let error = &answer["errors"][0];
    match queue {
        Queue::Extract => {
            error["code"] == code::TOO_MANY_JOBS
                && !error["message"]
                    .as_str()
                    .is_some_and(|message| message.contains(EXPORT_QUOTA_MESSAGE))
        }
        Queue::Import => error["code"] == TOO_MANY_IMPORTS || error["code"] == code::TOO_MANY_JOBS,
    }
}

fn job_id(result: &Value) -> Option<String> {
    match (&result["exportId"], &result["batchId"]) {
        (Value::String(id), _) => Some(id.clone()),
        (_, Value::Number(id)) => Some(id.to_string()),
        (_, Value::String(id)) => Some(id.clone()),
        _ => None,
    }
}

fn someone_waits_in(line: &Line) -> bool {
    !line.waiting.is_empty()
}
