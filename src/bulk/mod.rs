//! Bulk jobs: Marketo's extract and import queues, shared by every
//! integration, and the proxy's admission to them.
//!
//! Marketo runs 2 jobs of each queue at once and holds 10 in it (the
//! running ones included); it meters 500 MB of export files a day. Past
//! them it answers 1029 (1016 for imports), and an integration that meets
//! one because another filled the queue fails its night's work. The proxy
//! keeps every enqueue within the queue instead:
//!
//! - [`endpoint`] reads which bulk call a request is;
//! - [`jobs`] tracks the jobs seen and holds enqueues until there is room,
//!   fairly between services and within each request's deadline;
//! - `proxy::bulk` is the tower layer around each call to Marketo that
//!   asks for a place, takes what the answer says, and absorbs Marketo's
//!   own "queue full" (jobs started elsewhere) by pausing and trying again;
//! - `bulk_status` reads the status of jobs nobody has asked about for a
//!   while, at a steady pace, under the proxy's own name;
//! - [`shared`] keeps the jobs, the places and the day's counts in Redis
//!   when replicas share an instance.

pub mod endpoint;
pub mod jobs;
pub mod shared;

use std::time::Duration;

pub use endpoint::{JobState, Kind, Queue};
pub use jobs::{BulkJobs, BulkUsage};
pub use shared::ServiceDay;

/// Why a bulk call was answered by the proxy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BulkError {
    #[error("Too many jobs in queue: the {} queue had no room before this request's deadline", .queue.label())]
    QueueFull { queue: Queue, retry_after: Duration },
    #[error("Export daily quota exceeded: today's export bytes are spent until the reset")]
    ExportQuota { retry_after: Duration },
}

impl BulkError {
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::QueueFull { retry_after, .. } | Self::ExportQuota { retry_after } => *retry_after,
        }
    }
}
