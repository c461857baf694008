//! The bulk state of one Marketo instance, shared by replicas through
//! Redis (`state.backend: redis`), so that they keep to its queues and its
//! export bytes as one proxy would.
//!
//! Under the configured key prefix, changed only by Lua scripts that read
//! Redis `TIME`:
//! - `bulk:jobs`, a hash of every job seen, by id: kind, state, owner,
//!   whether its start and its export bytes were counted, when a replica
//!   last heard of it, and the day it ended (a job that ended before
//!   today goes with the next snapshot);
//! - `bulk:queue:{extract,import}`, the jobs in each queue (id → owner);
//! - `bulk:reserved:{queue}`, places taken for enqueues not yet answered,
//!   a sorted set of ids scored by when they lapse (a replica that dies
//!   holding one loses it after the longest an enqueue can take);
//!   `bulk:released`, ids given back, so that a place taken late (its
//!   answer lost to a timeout) takes nothing;
//! - `bulk:waiting:{queue}`, the services with an enqueue waiting on some
//!   replica, each for a moment after its replica last asked, so that a
//!   place goes to the service with the fewest jobs in the queue whichever
//!   replica it waits on;
//! - `bulk:paused:{queue}`, set for `bulk.pause` after Marketo said the
//!   queue was full, cleared when a job leaves it;
//! - `bulk:day:{date}`, the day's export bytes, whether Marketo said they
//!   are spent, and per service the jobs started and export bytes, on
//!   Redis's day in the quota's zone; it lapses three days later.
//!
//! Writing what a job did is idempotent (states only move forward, a job's
//! start and its bytes are counted once, by the flags on its entry), so a
//! replica that lost Redis writes again everything it saw meanwhile and
//! nothing is counted twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;

use super::endpoint::{JobState, Kind, Queue};
use crate::admission::shared::{SharedError, SharedLimits};
use crate::config::Config;
use crate::limits::redis::scripts::{self, millis};
use serde::{Deserialize, Serialize};

/// Day hashes, the jobs and the queues outlive their last write by this.
const KEEP: Duration = Duration::from_secs(3 * 24 * 3600);
/// A job created and never enqueued is forgotten after this.
const STALE_CREATED: Duration = Duration::from_secs(24 * 3600);

/// What one service did today.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDay {
    /// Jobs it enqueued (exports) or started (imports).
    pub jobs: u64,
    /// `fileSize` of its exports that completed.
    pub export_bytes: u64,
}

/// What one answer (or a catch-up) says of one job.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub kind: Kind,
    pub base: String,
    pub state: JobState,
    /// Its owner, or the service that called.
    pub owner: Option<usize>,
    /// The call put it in its queue.
    pub started: bool,
    pub file_size: Option<u64>,
}

/// A job as Redis holds it.
#[derive(Debug, Clone)]
pub struct SharedJob {
    pub kind: Kind,
    pub base: String,
    pub state: JobState,
    pub owner: Option<usize>,
    /// Its export bytes are counted.
    pub charged: bool,
    /// Its start is counted.
    pub counted: bool,
    /// Since a replica last heard of it.
    pub quiet: Duration,
}

/// The day's counts (after a write, those it changed; the others are 0).
#[derive(Debug, Clone, Default)]
pub struct DayCounts {
    pub export_bytes: u64,
    pub spent: bool,
    /// Per service, in the order of the configured names.
    pub services: Vec<ServiceDay>,
}

/// Everything the replicas share, as of one moment.
pub struct Snapshot {
    pub jobs: Vec<(String, SharedJob)>,
    pub day: DayCounts,
    /// Places taken in each queue, by every replica.
    pub reserved: [usize; 2],
}

/// The bulk keys and scripts of one instance; see the module documentation.
pub struct SharedBulk {
    redis: Arc<SharedLimits>,
    names: Vec<String>,
    /// How long a place is held before its enqueue has surely been
    /// answered: the longest wait and two request timeouts.
    hold: Duration,
}

impl SharedBulk {
    pub fn new(config: &Config, redis: Arc<SharedLimits>) -> Self {
        let longest_wait = config
            .services
            .iter()
            .map(|service| service.effective_max_queue_wait(&config.limits))
            .fold(config.limits.max_queue_wait, Duration::max);
        Self {
            redis,
            names: config.counted_names(),
            hold: longest_wait + config.marketo.request_timeout * 2,
        }
    }

    /// Today by Redis's clock, in the quota's zone.
    pub fn day(&self) -> NaiveDate {
        self.redis.day()
    }

    fn key(&self, name: &str) -> String {
        self.redis.key(&format!("bulk:{name}"))
    }

    fn queue_key(&self, name: &str, queue: Queue) -> String {
        self.key(&format!("{name}:{}", queue.label()))
    }

    fn day_key(&self, day: NaiveDate) -> String {
        self.key(&format!("day:{day}"))
    }

    /// How long a given-back place's id is remembered: longer than a place
    /// taken late can be on its way.
    fn tombstone(&self) -> Duration {
        (self.hold * 2).max(Duration::from_secs(60))
    }

    /// Takes a place in `queue` (`limit` jobs) under `id` for `service`, if
    /// it has room and no service waiting has fewer jobs in it. `waits`:
    /// the service waits, and counts as waiting for that long.
    pub async fn admit(
        &self,
        queue: Queue,
        id: &str,
        limit: usize,
        service: Option<usize>,
        waits: Option<Duration>,
    ) -> Result<bool, SharedError> {
        let keys = [
            self.queue_key("queue", queue),
            self.queue_key("reserved", queue),
            self.queue_key("paused", queue),
            self.key("released"),
            self.queue_key("waiting", queue),
        ];
        let args = scripts::BulkAdmit {
            id,
            limit,
            hold_ms: millis(self.hold),
            service: self.name(service),
            waits_ms: waits.map_or(0, millis),
        };
        let granted = self
            .redis
            .run(&keys.each_ref().map(String::as_str), &args)
            .await?;
        Ok(granted == 1)
    }

    /// Holds the places `hold` (taken while Redis was unreachable) and
    /// gives back `release`.
    pub async fn places(&self, queue: Queue, hold: &[String], release: &[String]) -> Result<(), SharedError> {
        let keys = [self.queue_key("reserved", queue), self.key("released")];
        let args = scripts::BulkPlaces {
            hold_ms: millis(self.hold),
            tombstone_ms: millis(self.tombstone()),
            hold,
            release,
        };
        self.redis
            .run(&keys.each_ref().map(String::as_str), &args)
            .await
            .map(drop)
    }

    /// Writes what was seen of `jobs` on `day`; answers the day's counts
    /// that changed.
    pub async fn observe(&self, day: NaiveDate, jobs: &[Seen]) -> Result<DayCounts, SharedError> {
        let keys = [
            self.key("jobs"),
            self.queue_key("queue", Queue::Extract),
            self.queue_key("queue", Queue::Import),
            self.day_key(day),
            self.queue_key("paused", Queue::Extract),
            self.queue_key("paused", Queue::Import),
        ];
        let args = scripts::BulkObserve {
            today: day.to_string(),
            keep_ms: millis(KEEP),
            jobs: jobs
                .iter()
                .map(|job| scripts::SeenJob {
                    id: &job.id,
                    kind: job.kind.label(),
                    queue: job.kind.queue().label(),
                    base: &job.base,
                    state: job.state.label(),
                    owner: self.name(job.owner),
                    started: job.started,
                    file_size: job.file_size,
                })
                .collect(),
        };
        let changed = self
            .redis
            .run(&keys.each_ref().map(String::as_str), &args)
            .await?;
        Ok(self.day_counts(&changed))
    }

    /// Every job, the day's counts and the places taken.
    pub async fn snapshot(&self, day: NaiveDate) -> Result<Snapshot, SharedError> {
        let keys = [
            self.key("jobs"),
            self.day_key(day),
            self.queue_key("reserved", Queue::Extract),
            self.queue_key("reserved", Queue::Import),
        ];
        let args = scripts::BulkSnapshot {
            today: day.to_string(),
            stale_created_ms: millis(STALE_CREATED),
        };
        let (jobs, counts, extract, import) = self
            .redis
            .run(&keys.each_ref().map(String::as_str), &args)
            .await?;
        let jobs = jobs
            .chunks_exact(8)
            .filter_map(|job| {
                let [id, kind, base, state, owner, charged, counted, quiet] = job else {
                    return None;
                };
                let quiet = quiet.parse::<f64>().ok()?.max(0.0);
                Some((
                    id.clone(),
                    SharedJob {
                        kind: Kind::from_label(kind)?,
                        base: base.clone(),
                        state: JobState::from_label(state)?,
                        owner: self.names.iter().position(|name| name == owner),
                        charged: charged == "1",
                        counted: counted == "1",
                        quiet: Duration::from_secs_f64(quiet / 1000.0),
                    },
                ))
            })
            .collect();
        Ok(Snapshot {
            jobs,
            day: self.day_counts(&counts),
            reserved: [extract, import],
        })
    }

    /// The day's export bytes and whether Marketo said they are spent.
    pub async fn export_day(&self, day: NaiveDate) -> Result<(u64, bool), SharedError> {
        let args = scripts::BulkExportDay {};
        let (bytes, spent) = self.redis.run(&[self.day_key(day).as_str()], &args).await?;
        Ok((bytes, spent == 1))
    }

    /// Marketo said the day's export bytes are spent.
    pub async fn mark_spent(&self, day: NaiveDate) -> Result<(), SharedError> {
        let args = scripts::BulkSpent {
            keep_ms: millis(KEEP),
        };
        self.redis
            .run(&[self.day_key(day).as_str()], &args)
            .await
            .map(drop)
    }

    /// Marketo said `queue` is full: no replica enqueues there for `pause`,
    /// unless a job leaves it.
    pub async fn pause(&self, queue: Queue, pause: Duration) -> Result<(), SharedError> {
        let args = scripts::BulkPause {
            pause_ms: millis(pause).max(1),
        };
        self.redis
            .run(&[self.queue_key("paused", queue).as_str()], &args)
            .await
            .map(drop)
    }

    fn name(&self, service: Option<usize>) -> &str {
        service
            .and_then(|service| self.names.get(service))
            .map_or("", String::as_str)
    }

    /// Reads a day hash's fields (`bytes`, `spent`, `jobs:NAME`,
    /// `bytes:NAME`, as pairs); fields of services no longer configured
    /// are left out.
    fn day_counts(&self, fields: &[String]) -> DayCounts {
        let mut counts = DayCounts {
            services: vec![ServiceDay::default(); self.names.len()],
            ..DayCounts::default()
        };
        for pair in fields.chunks_exact(2) {
            let amount = pair[1].parse::<u64>().unwrap_or(0);
            let (what, name) = pair[0].split_once(':').unwrap_or((pair[0].as_str(), ""));
            let service = self.names.iter().position(|known| known == name);
            match (what, service) {
                ("bytes", _) if name.is_empty() => counts.export_bytes += amount,
                ("spent", _) => counts.spent = true,
                ("jobs", Some(service)) => counts.services[service].jobs += amount,
                ("bytes", Some(service)) => counts.services[service].export_bytes += amount,
                _ => {}
            }
        }
        counts
    }
}
