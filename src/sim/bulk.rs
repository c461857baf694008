//! The simulated bulk queues: Marketo's extract queue (leads, activities,
//! program members and custom objects share it) and its import queue.
//!
//! Each queue runs at most [`MAX_PROCESSING`] jobs at once and holds at
//! most [`MAX_IN_QUEUE`] enqueued jobs, the running ones included, as
//! Marketo documents; one more is refused with 1029 "Too many jobs in
//! queue" (extracts) or 1016 "Too many imports" (imports). Export files
//! are metered by their `fileSize` when the job completes; once the day's
//! export bytes are spent, creating or enqueuing an export is refused
//! with 1029 "Export daily quota exceeded" until the reset.
//!
//! Time moves in [`BulkQueues::advance`], called before every read or
//! change: jobs finish exactly `processing` after they started and the
//! next waiting job starts at that instant, whenever the next call comes.
//! Every change of occupancy is recorded in [`QueueStats`], so a test can
//! check the most jobs ever queued and processing.

use std::collections::{BTreeMap, VecDeque};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::{Duration, Instant};

use super::bulk_routes::BulkCall as Endpoint;
use super::leads::LeadStore;
use crate::bulk::endpoint::{EXPORT_QUOTA_MESSAGE, JobState, Kind, Op, Queue};
use crate::marketo::code;

/// Jobs a queue processes at once (Marketo: 2).
pub const MAX_PROCESSING: usize = 2;
/// Jobs a queue holds, the processing ones included (Marketo: 10).
pub const MAX_IN_QUEUE: usize = 10;
/// Occupancy samples kept per queue; the maxima are kept whatever the count.
const MAX_SAMPLES: usize = 10_000;

/// How long jobs take, and the day's export allowance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BulkTimes {
    pub export: Duration,
    pub import: Duration,
    pub export_daily_bytes: u64,
}

/// A Marketo answer: the `result` array, or the error code and message.
pub(crate) type BulkAnswer = Result<Value, (&'static str, String)>;

/// What the queues did, for `/_sim/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BulkStats {
    pub extract: QueueStats,
    pub import: QueueStats,
    /// Export bytes metered today (the `fileSize` of completed exports).
    pub export_bytes_today: u64,
}

/// One queue's occupancy over time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueStats {
    /// Most jobs ever waiting (state `Queued`).
    pub max_queued: usize,
    /// Most jobs ever processing at once.
    pub max_processing: usize,
    /// Most jobs ever in the queue, waiting and processing.
    pub max_in_queue: usize,
    pub enqueued: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Enqueues refused because the queue was full.
    pub refused_full: u64,
    /// Every change of occupancy, in order (the first [`MAX_SAMPLES`]).
    pub samples: Vec<Occupancy>,
}

/// The queue at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupancy {
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
    pub queued: usize,
    pub processing: usize,
}

struct Job {
    kind: Kind,
    base: String,
    fields: Vec<String>,
    state: JobState,
    created_at: String,
    queued_at: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    /// When processing ends.
    ends_at: Option<Instant>,
    /// Ends `Failed` (an injected fault).
    fails: bool,
    file_size: Option<u64>,
    records: Option<u64>,
}

impl Job {
    fn created(endpoint: &Endpoint, fields: Vec<String>) -> Self {
        Self {
            kind: endpoint.kind,
            base: endpoint.base.clone(),
            fields,
            state: JobState::Created,
            created_at: stamp(),
            queued_at: None,
            started_at: None,
            finished_at: None,
            ends_at: None,
            fails: false,
            file_size: None,
            records: None,
        }
    }
}

#[derive(Default)]
struct Lane {
    waiting: VecDeque<String>,
    processing: Vec<String>,
}

pub(crate) struct BulkQueues {
    jobs: BTreeMap<String, Job>,
    extract: Lane,
    import: Lane,
    next_id: u64,
    day: NaiveDate,
    pub stats: BulkStats,
    /// Jobs enqueued from now on that end `Failed`.
    pub fail_next: u32,
}

/// What [`BulkQueues::answer`] needs from the rest of the instance.
pub(crate) struct Context<'a> {
    pub leads: &'a LeadStore,
    pub times: BulkTimes,
    pub started: Instant,
    pub now: Instant,
    pub today: NaiveDate,
}

/// What a bulk call gets: JSON, or an export's file.
pub(crate) enum BulkReply {
    Json(BulkAnswer),
    File(Vec<String>),
}

impl BulkQueues {
    pub fn new(today: NaiveDate) -> Self {
        Self {
            jobs: BTreeMap::new(),
            extract: Lane::default(),
            import: Lane::default(),
            next_id: 1,
            day: today,
            stats: BulkStats::default(),
            fail_next: 0,
        }
    }

    /// Answers one bulk call.
    pub fn answer(
        &mut self,
        endpoint: &Endpoint,
        params: &BTreeMap<String, String>,
        body: &[u8],
        cx: &Context<'_>,
    ) -> BulkReply {
        self.advance(cx);
        let job = endpoint.job.as_deref().unwrap_or_default();
        let answer = match endpoint.op {
            Op::Create => self.create(endpoint, body, cx),
            Op::Enqueue => self.enqueue(endpoint.kind, job, cx),
            Op::Status => self.describe_one(endpoint.kind, job),
            Op::Cancel => self.cancel(endpoint.kind, job, cx),
            Op::List => Ok(self.list(endpoint, params)),
            Op::Import => self.import(endpoint, cx),
            Op::File => {
                return match self.file(endpoint.kind, job, cx.leads) {
                    Ok(rows) => BulkReply::File(rows),
                    Err(error) => BulkReply::Json(Err(error)),
                };
            }
        };
        BulkReply::Json(answer)
    }

    /// Finishes every job whose time is up, in order, starting the next
    /// waiting one at the instant each slot frees.
    pub fn advance(&mut self, cx: &Context<'_>) {
        if self.day != cx.today {
            self.day = cx.today;
            self.stats.export_bytes_today = 0;
        }
        loop {
            let next = self
                .jobs
                .iter()
                .filter(|(_, job)| job.state == JobState::Processing)
                .filter_map(|(id, job)| Some((job.ends_at?, id.clone())))
                .filter(|(ends_at, _)| *ends_at <= cx.now)
                .min();
            let Some((at, id)) = next else { break };
            let Some(job) = self.jobs.get_mut(&id) else { break };
            let queue = job.kind.queue();
            job.finished_at = Some(stamp());
            job.ends_at = None;
            if job.fails {
                job.state = JobState::Failed;
                self.queue_stats(queue).failed += 1;
            } else {
                job.state = JobState::Completed;
                if queue == Queue::Extract {
                    let rows = cx.leads.rows(&job.fields);
                    let size: usize = rows.iter().map(String::len).sum();
                    job.file_size = Some(size as u64);
                    job.records = Some(rows.len().saturating_sub(1) as u64);
                    self.stats.export_bytes_today += size as u64;
                } else {
                    job.records = Some(0);
                }
                self.queue_stats(queue).completed += 1;
            }
            self.lane(queue).processing.retain(|running| *running != id);
            self.start_waiting(queue, at, cx);
        }
    }

    fn start_waiting(&mut self, queue: Queue, at: Instant, cx: &Context<'_>) {
        let processing = match queue {
            Queue::Extract => cx.times.export,
            Queue::Import => cx.times.import,
        };
        while self.lane(queue).processing.len() < MAX_PROCESSING {
            let Some(id) = self.lane(queue).waiting.pop_front() else {
                break;
            };
            if let Some(job) = self.jobs.get_mut(&id) {
                job.state = JobState::Processing;
                job.started_at = Some(stamp());
                job.ends_at = Some(at + processing);
            }
            self.lane(queue).processing.push(id);
        }
        self.sample(queue, at, cx.started);
    }

    fn sample(&mut self, queue: Queue, at: Instant, started: Instant) {
        let lane = self.lane(queue);
        let (queued, processing) = (lane.waiting.len(), lane.processing.len());
        let stats = self.queue_stats(queue);
        stats.max_queued = stats.max_queued.max(queued);
        stats.max_processing = stats.max_processing.max(processing);
        stats.max_in_queue = stats.max_in_queue.max(queued + processing);
        let occupancy = Occupancy {
            at_ms: u64::try_from(at.saturating_duration_since(started).as_millis()).unwrap_or(u64::MAX),
            queued,
            processing,
        };
        if stats.samples.len() < MAX_SAMPLES && stats.samples.last() != Some(&occupancy) {
            stats.samples.push(occupancy);
        }
    }

    fn lane(&mut self, queue: Queue) -> &mut Lane {
        match queue {
            Queue::Extract => &mut self.extract,
            Queue::Import => &mut self.import,
        }
    }

    fn queue_stats(&mut self, queue: Queue) -> &mut QueueStats {
        match queue {
            Queue::Extract => &mut self.stats.extract,
            Queue::Import => &mut self.stats.import,
        }
    }

    fn export_quota_spent(&self, cx: &Context<'_>) -> bool {
        self.stats.export_bytes_today >= cx.times.export_daily_bytes
    }

    fn new_id(&mut self, queue: Queue) -> String {
        let id = self.next_id;
        self.next_id += 1;
        match queue {
            Queue::Extract => format!("{id:08x}-5151-4e0a-b0c1-{id:012x}"),
            Queue::Import => id.to_string(),
        }
    }

    fn create(&mut self, endpoint: &Endpoint, body: &[u8], cx: &Context<'_>) -> BulkAnswer {
        let body: Value =
            serde_json::from_slice(body).map_err(|_| (code::INVALID_JSON, "Invalid JSON".to_owned()))?;
        if self.export_quota_spent(cx) {
            return Err((code::TOO_MANY_JOBS, EXPORT_QUOTA_MESSAGE.to_owned()));
        }
        let fields: Vec<String> = body
            .get("fields")
            .and_then(Value::as_array)
            .map(|fields| {
                fields
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .filter(|fields: &Vec<String>| !fields.is_empty())
            .unwrap_or_else(|| {
                super::leads::DEFAULT_FIELDS
                    .iter()
                    .map(|field| (*field).to_owned())
                    .collect()
            });
        let id = self.new_id(Queue::Extract);
        self.jobs.insert(id.clone(), Job::created(endpoint, fields));
        Ok(json!([self.describe(&id)]))
    }

    /// Takes a job into its queue, or says why not.
    fn queue_job(&mut self, id: &str, cx: &Context<'_>) -> Result<(), (&'static str, String)> {
        let queue = self.jobs.get(id).map_or(Queue::Extract, |job| job.kind.queue());
        let lane = self.lane(queue);
        if lane.waiting.len() + lane.processing.len() >= MAX_IN_QUEUE {
            self.queue_stats(queue).refused_full += 1;
            return Err((queue.full_code(), queue.full_message().to_owned()));
        }
        let fails = self.fail_next > 0;
        self.fail_next = self.fail_next.saturating_sub(1);
        if let Some(job) = self.jobs.get_mut(id) {
            job.state = JobState::Queued;
            job.queued_at = Some(stamp());
            job.fails = fails;
        }
        self.lane(queue).waiting.push_back(id.to_owned());
        self.queue_stats(queue).enqueued += 1;
        self.sample(queue, cx.now, cx.started);
        self.start_waiting(queue, cx.now, cx);
        Ok(())
    }

    fn enqueue(&mut self, kind: Kind, id: &str, cx: &Context<'_>) -> BulkAnswer {
        let state = self.job_of(kind, id)?.state;
        if self.export_quota_spent(cx) {
            return Err((code::TOO_MANY_JOBS, EXPORT_QUOTA_MESSAGE.to_owned()));
        }
        if state != JobState::Created {
            return Err((
                code::INVALID_VALUE,
                format!("Job already {}", state.marketo_name(Queue::Extract)),
            ));
        }
        self.queue_job(id, cx)?;
        // Marketo answers the enqueue with the job as it was taken in.
        let mut described = self.describe(id);
        described["status"] = json!("Queued");
        Ok(json!([described]))
    }

    fn import(&mut self, endpoint: &Endpoint, cx: &Context<'_>) -> BulkAnswer {
        let id = self.new_id(Queue::Import);
        self.jobs.insert(id.clone(), Job::created(endpoint, Vec::new()));
        if let Err(error) = self.queue_job(&id, cx) {
            self.jobs.remove(&id);
            return Err(error);
        }
        let mut described = self.describe(&id);
        described["status"] = json!("Queued");
        Ok(json!([described]))
    }

    fn cancel(&mut self, kind: Kind, id: &str, cx: &Context<'_>) -> BulkAnswer {
        let job = self.job_of(kind, id)?;
        if job.state.is_final() {
            return Err((
                code::INVALID_VALUE,
                format!("Job already {}", job.state.marketo_name(Queue::Extract)),
            ));
        }
        let was_active = job.state.is_active();
        let queue = kind.queue();
        if let Some(job) = self.jobs.get_mut(id) {
            job.state = JobState::Cancelled;
            job.ends_at = None;
            job.finished_at = Some(stamp());
        }
        if was_active {
            let lane = self.lane(queue);
            lane.waiting.retain(|waiting| waiting != id);
            lane.processing.retain(|running| running != id);
            self.start_waiting(queue, cx.now, cx);
        }
        self.queue_stats(queue).cancelled += 1;
        Ok(json!([self.describe(id)]))
    }

    fn file(&self, kind: Kind, id: &str, leads: &LeadStore) -> Result<Vec<String>, (&'static str, String)> {
        let job = self.job_of(kind, id)?;
        if job.state != JobState::Completed {
            return Err((code::INVALID_VALUE, "Export not completed".to_owned()));
        }
        Ok(leads.rows(&job.fields))
    }

    fn list(&self, endpoint: &Endpoint, params: &BTreeMap<String, String>) -> Value {
        let wanted: Option<Vec<JobState>> = params.get("status").map(|states| {
            states
                .split(',')
                .filter_map(|state| JobState::from_marketo(state.trim()))
                .collect()
        });
        let jobs: Vec<Value> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.kind == endpoint.kind && job.base == endpoint.base)
            .filter(|(_, job)| wanted.as_ref().is_none_or(|wanted| wanted.contains(&job.state)))
            .map(|(id, _)| self.describe(id))
            .collect();
        Value::Array(jobs)
    }

    fn job_of(&self, kind: Kind, id: &str) -> Result<&Job, (&'static str, String)> {
        self.jobs
            .get(id)
            .filter(|job| job.kind == kind)
            .ok_or_else(|| (code::NOT_FOUND, "Job not found".to_owned()))
    }

    fn describe_one(&self, kind: Kind, id: &str) -> BulkAnswer {
        self.job_of(kind, id)?;
        Ok(json!([self.describe(id)]))
    }

    fn describe(&self, id: &str) -> Value {
        let Some(job) = self.jobs.get(id) else {
            return Value::Null;
        };
        let queue = job.kind.queue();
        let mut value = match queue {
            Queue::Extract => json!({
                "exportId": id,
                "format": "CSV",
                "status": job.state.marketo_name(queue),
                "createdAt": job.created_at,
            }),
            Queue::Import => json!({
                "batchId": id.parse::<u64>().unwrap_or_default(),
                "importId": id,
                "status": job.state.marketo_name(queue),
            }),
        };
        for (name, stamp) in [
            ("queuedAt", &job.queued_at),
            ("startedAt", &job.started_at),
            ("finishedAt", &job.finished_at),
        ] {
            if let (Queue::Extract, Some(stamp)) = (queue, stamp) {
                value[name] = json!(stamp);
            }
        }
        if let Some(size) = job.file_size {
            value["fileSize"] = json!(size);
        }
        if let Some(records) = job.records {
            match queue {
                Queue::Extract => value["numberOfRecords"] = json!(records),
                Queue::Import => {
                    value["numOfLeadsProcessed"] = json!(records);
                    value["numOfRowsFailed"] = json!(0);
                    value["numOfRowsWithWarning"] = json!(0);
                }
            }
        }
        value
    }
}

fn stamp() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
