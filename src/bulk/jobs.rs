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
//! One mutex, never held across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use chrono::{NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::BulkError;
use super::endpoint::{
    EXPORT_QUOTA_MESSAGE, Endpoint, JobState, Kind, Op, Queue, TOO_MANY_IMPORTS, list_path, status_path,
};
use crate::config::Config;
use crate::marketo::code;
use crate::metrics::Metrics;

/// What one service did today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDay {
    /// Jobs it enqueued (exports) or started (imports).
    pub jobs: u64,
    /// `fileSize` of its exports that completed.
    pub export_bytes: u64,
}

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
}

struct Waiter {
    since: Instant,
    reply: oneshot::Sender<()>,
}

struct Line {
    /// Enqueues sent and not yet answered.
    reserved: usize,
    /// After Marketo said the queue was full.
    paused_until: Option<Instant>,
    /// One line per service.
    waiting: Vec<VecDeque<Waiter>>,
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
    timezone: chrono_tz::Tz,
    metrics: Metrics,
    /// Wakes the status poller early.
    wake_poller: Notify,
}

fn index(queue: Queue) -> usize {
    match queue {
        Queue::Extract => 0,
        Queue::Import => 1,
    }
}

impl BulkJobs {
    pub fn new(config: &Config, metrics: Metrics) -> Arc<Self> {
        let names = config.counted_names();
        let bulk = &config.bulk;
        let line = || Line {
            reserved: 0,
            paused_until: None,
            waiting: (0..names.len()).map(|_| VecDeque::new()).collect(),
        };
        let jobs = Arc::new(Self {
            state: Mutex::new(State {
                jobs: HashMap::new(),
                lines: [line(), line()],
                day: today(config.limits.timezone),
                export_bytes: 0,
                export_spent: false,
                services: vec![ServiceDay::default(); names.len()],
                reread: false,
                list_cursor: 0,
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
            timezone: config.limits.timezone,
            metrics,
            wake_poller: Notify::new(),
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
        let today = today(self.timezone);
        if state.day != today {
            state.day = today;
            state.export_bytes = 0;
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
        let now = Utc::now().with_timezone(&self.timezone);
        let tomorrow = now
            .date_naive()
            .succ_opt()
            .and_then(|day| day.and_hms_opt(0, 0, 0));
        tomorrow
            .and_then(|midnight| midnight.and_local_timezone(self.timezone).earliest())
            .and_then(|midnight| (midnight - now).to_std().ok())
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_secs(1))
    }

    /// Refuses a create or enqueue of an export once today's bytes are
    /// spent.
    pub fn check_export_bytes(&self) -> Result<(), BulkError> {
        let mut state = self.lock();
        self.roll(&mut state);
        if state.export_spent || state.export_bytes >= self.export_daily_bytes {
            return Err(BulkError::ExportQuota {
                retry_after: self.until_reset(),
            });
        }
        Ok(())
    }

    /// Waits for a place in `queue` for an enqueue of `service`, until
    /// `deadline`.
    pub async fn admit(
        self: &Arc<Self>,
        queue: Queue,
        service: usize,
        deadline: Instant,
    ) -> Result<Reservation, BulkError> {
        let receiver = {
            let mut state = self.lock();
            self.roll(&mut state);
            let now = Instant::now();
            let line = &state.lines[index(queue)];
            let nobody_waits = line.waiting.iter().all(VecDeque::is_empty);
            if nobody_waits && self.has_room(&state, queue, now) {
                state.lines[index(queue)].reserved += 1;
                return Ok(self.reservation(queue));
            }
            if deadline <= now {
                return Err(self.queue_full(queue));
            }
            let (reply, receiver) = oneshot::channel();
            let lane = service.min(self.internal);
            state.lines[index(queue)].waiting[lane].push_back(Waiter { since: now, reply });
            // The poller reads the queue's jobs more often while someone waits.
            self.wake_poller.notify_one();
            Waiting {
                jobs: self,
                queue,
                receiver: Some(receiver),
            }
        };
        let mut waiting = receiver;
        let granted = tokio::time::timeout_at(deadline, waiting.receiver.as_mut().expect("set above")).await;
        match granted {
            Ok(Ok(())) => {
                waiting.receiver = None;
                Ok(self.reservation(queue))
            }
            // Refused: dropping `waiting` leaves the line, or hands back a
            // place granted meanwhile.
            _ => Err(self.queue_full(queue)),
        }
    }

    fn reservation(self: &Arc<Self>, queue: Queue) -> Reservation {
        Reservation {
            jobs: Arc::downgrade(self),
            queue,
        }
    }

    fn queue_full(&self, queue: Queue) -> BulkError {
        BulkError::QueueFull {
            queue,
            retry_after: self.pause.max(Duration::from_secs(1)),
        }
    }

    fn has_room(&self, state: &State, queue: Queue, now: Instant) -> bool {
        let line = &state.lines[index(queue)];
        if line.paused_until.is_some_and(|until| until > now) {
            return false;
        }
        self.in_queue(state, queue) + line.reserved < self.limits[index(queue)]
    }

    fn in_queue(&self, state: &State, queue: Queue) -> usize {
        state
            .jobs
            .values()
            .filter(|job| job.kind.queue() == queue && job.state.is_active())
            .count()
    }

    /// Hands free places to waiters: the service with the fewest jobs in
    /// the queue first, the longest waiting among equals.
    fn pump(&self, state: &mut State, queue: Queue) {
        let now = Instant::now();
        while self.has_room(state, queue, now) {
            let owned = |service: usize| {
                state
                    .jobs
                    .values()
                    .filter(|job| {
                        job.kind.queue() == queue && job.state.is_active() && job.owner == Some(service)
                    })
                    .count()
            };
            let line = &state.lines[index(queue)];
            let next = line
                .waiting
                .iter()
                .enumerate()
                .filter_map(|(service, waiting)| {
                    waiting.front().map(|head| (owned(service), head.since, service))
                })
                .min();
            let Some((_, _, service)) = next else { break };
            let line = &mut state.lines[index(queue)];
            let Some(waiter) = line.waiting[service].pop_front() else {
                break;
            };
            if waiter.reply.send(()).is_ok() {
                line.reserved += 1;
            }
        }
    }

    /// Marketo said `queue` is full: jobs the proxy has not seen hold it.
    /// Nothing more goes there until a job leaves or the pause ends, and
    /// the poller lists the jobs and reads their status again.
    pub fn marketo_says_full(self: &Arc<Self>, queue: Queue) {
        {
            let mut state = self.lock();
            state.lines[index(queue)].paused_until = Some(Instant::now() + self.pause);
            state.reread = true;
        }
        tracing::info!(
            queue = queue.label(),
            "Marketo says the bulk queue is full: pausing it and reading its jobs again"
        );
        self.wake_poller.notify_one();
        let jobs = Arc::downgrade(self);
        let pause = self.pause;
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            if let Some(jobs) = jobs.upgrade() {
                let mut state = jobs.lock();
                jobs.pump(&mut state, queue);
            }
        });
    }

    /// Takes what a bulk call's answer says about its jobs. `body` is the
    /// answer when it was read whole (file downloads are not).
    pub fn observe(&self, endpoint: &Endpoint, service: usize, body: Option<&Bytes>) {
        let Some(answer) = body.and_then(|body| serde_json::from_slice::<Value>(body).ok()) else {
            return;
        };
        let mut state = self.lock();
        self.roll(&mut state);
        let now = Instant::now();
        let owner = (service != self.internal).then_some(service);
        if answer["success"] != Value::Bool(true) {
            let error = &answer["errors"][0];
            let quota = error["code"] == code::TOO_MANY_JOBS
                && error["message"]
                    .as_str()
                    .is_some_and(|message| message.contains(EXPORT_QUOTA_MESSAGE));
            if quota && matches!(endpoint.op, Op::Create | Op::Enqueue) {
                tracing::info!("Marketo says today's export bytes are spent");
                state.export_spent = true;
                self.publish(&state);
            }
            return;
        }
        let results = answer["result"].as_array().cloned().unwrap_or_default();
        let mut left = false;
        for result in &results {
            let id = endpoint.job.clone().or_else(|| job_id(result));
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
            let job = state.jobs.entry(id).or_insert_with(|| Job {
                kind,
                base: endpoint.base.clone(),
                state: new_state,
                owner,
                heard: now,
                charged: false,
            });
            job.heard = now;
            // An answer may be older than one already taken (two polls
            // crossing); states only move forward.
            if new_state >= was || (was == JobState::Created && new_state.is_final()) {
                job.state = new_state;
            }
            left |= was.is_active() && !job.state.is_active();
            let started = matches!(endpoint.op, Op::Enqueue | Op::Import) && !was.is_active();
            let size = result["fileSize"].as_u64();
            let charge = (job.state == JobState::Completed && kind.queue() == Queue::Extract && !job.charged)
                .then_some(size)
                .flatten();
            let job_owner = job.owner;
            if let Some(size) = charge {
                job.charged = true;
                state.export_bytes += size;
                if let Some(owner) = job_owner {
                    state.services[owner].export_bytes += size;
                    self.metrics
                        .bulk_export_bytes
                        .with_label_values(&[self.names[owner].as_str()])
                        .inc_by(size);
                }
            }
            if started {
                if let Some(owner) = job_owner.or(owner) {
                    state.services[owner].jobs += 1;
                }
            }
        }
        if left {
            let queue = endpoint.kind.queue();
            state.lines[index(queue)].paused_until = None;
            self.pump(&mut state, queue);
        }
        self.publish(&state);
    }

    /// The next status or list call the proxy should make of its own, if
    /// any: a job in a queue not heard about for `poll_after` (for
    /// `poll_pace` while someone waits for a place), or, after Marketo said
    /// a queue was full, the lists of export jobs.
    pub fn next_poll(&self) -> Option<String> {
        let mut state = self.lock();
        self.roll(&mut state);
        let now = Instant::now();
        if state.reread {
            let kinds = [Kind::Leads, Kind::Activities, Kind::ProgramMembers];
            let kind = kinds[state.list_cursor % kinds.len()];
            state.list_cursor += 1;
            if state.list_cursor % kinds.len() == 0 {
                state.reread = false;
            }
            return list_path(kind).map(|path| format!("{path}?status=Queued,Processing"));
        }
        let someone_waits = state
            .lines
            .iter()
            .any(|line| line.waiting.iter().any(|waiting| !waiting.is_empty()));
        let quiet_for = if someone_waits {
            self.poll_pace
        } else {
            self.poll_after
        };
        let (id, job) = state
            .jobs
            .iter_mut()
            .filter(|(_, job)| job.state.is_active() && now.saturating_duration_since(job.heard) >= quiet_for)
            .min_by_key(|(_, job)| job.heard)?;
        job.heard = now;
        Some(status_path(job.kind, &job.base, id))
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

/// A place in a queue for one enqueue until Marketo has answered it. The
/// job it starts holds the place from then on.
pub struct Reservation {
    jobs: Weak<BulkJobs>,
    queue: Queue,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(jobs) = self.jobs.upgrade() {
            let mut state = jobs.lock();
            let line = &mut state.lines[index(self.queue)];
            line.reserved = line.reserved.saturating_sub(1);
            jobs.pump(&mut state, self.queue);
        }
    }
}

/// A waiter in a line. Dropped before its place was taken, it leaves the
/// line, or gives back a place granted in the meantime.
struct Waiting<'a> {
    jobs: &'a Arc<BulkJobs>,
    queue: Queue,
    receiver: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        if receiver.try_recv().is_ok() {
            drop(self.jobs.reservation(self.queue));
        }
        // A waiter not granted has a closed reply now; `pump` passes over it.
        receiver.close();
        let mut state = self.jobs.lock();
        for waiting in &mut state.lines[index(self.queue)].waiting {
            waiting.retain(|waiter| !waiter.reply.is_closed());
        }
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

fn today(timezone: chrono_tz::Tz) -> NaiveDate {
    Utc::now().with_timezone(&timezone).date_naive()
}
