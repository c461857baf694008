//! Reconciliation with Marketo's own count of today's calls
//! (`/rest/v1/stats/usage.json`). Other integrations that do not go
//! through the proxy use the same daily quota; when Marketo counts more
//! calls today than the proxy made, the difference is taken off what is
//! left. The call goes through the same replays, admission and token as
//! any other ([`crate::proxy::forward`]), under the proxy's own name.
//!
//! Replicas sharing Redis elect one reconciler with a lock that lapses:
//! it reads the report and publishes it, the others take it from Redis,
//! so the instance spends one call per interval however many replicas
//! there are. Without Redis each replica reads the report itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{NaiveDate, Utc};
use http::{HeaderValue, Method, Request, header};
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::admission::Admission;
use crate::admission::shared::SharedLimits;
use crate::auth::Caller;
use crate::error::ProxyError;
use crate::marketo::MarketoUsage;
use crate::proxy::admit::Admitted;
use crate::proxy::call::Call;
use crate::proxy::caller::Deadline;
use crate::target;
use crate::upstream::UpstreamError;

/// Where Marketo reports today's usage.
const USAGE_PATH: &str = "/rest/v1/stats/usage.json";

/// Why the usage report could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot call the usage API")]
    Call(#[source] ProxyError),
    #[error("the usage API answered something unexpected")]
    Unexpected,
}

/// Marketo's count of today's calls, when last read, for `/usage`.
#[derive(Debug, Default)]
pub struct ReportedUsage(Mutex<Option<MarketoUsage>>);

impl ReportedUsage {
    pub fn get(&self) -> Option<MarketoUsage> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set(&self, usage: MarketoUsage) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(usage);
    }
}

/// The calls a request makes to Marketo, as [`crate::proxy::forward`]
/// builds them.
pub type Forward = BoxCloneSyncService<Call, Admitted, ProxyError>;

/// Reads Marketo's usage report and applies it.
pub struct UsageSync {
    forward: Forward,
    /// The proxy's own name and queue wait.
    caller: Caller,
    max_wait: Duration,
    admission: Arc<Admission>,
    limits: Option<Arc<SharedLimits>>,
    reported: Arc<ReportedUsage>,
    /// How long Marketo's 607 holds before a call probes.
    probe_after: Duration,
}

#[derive(Deserialize)]
struct UsageAnswer {
    success: bool,
    #[serde(default)]
    result: Vec<UsageDay>,
}

#[derive(Deserialize)]
struct UsageDay {
    date: String,
    total: u64,
}

impl UsageSync {
    pub fn new(
        forward: Forward,
        caller: Caller,
        max_wait: Duration,
        admission: Arc<Admission>,
        limits: Option<Arc<SharedLimits>>,
        reported: Arc<ReportedUsage>,
        probe_after: Duration,
    ) -> Self {
        Self {
            forward,
            caller,
            max_wait,
            admission,
            limits,
            reported,
            probe_after,
        }
    }

    /// Applies Marketo's count for today: read by this replica, or by
    /// the replica that reads it for every replica. `interval` is how
    /// often this runs.
    pub async fn sync(&self, interval: Duration) -> Result<Option<MarketoUsage>, SyncError> {
        let Some(limits) = &self.limits else {
            return self.reconcile().await.map(Some);
        };
        // The lock outlives one interval, so its holder keeps it; if the
        // holder is gone, another replica takes over within half of one.
        match limits.lead_reconciliation(interval + interval / 2).await {
            Some(false) => {
                let Some(usage) = limits.published_usage().await else {
                    return Ok(None);
                };
                self.apply_here(&usage);
                Ok(Some(usage))
            }
            Some(true) | None => {
                let usage = self.reconcile().await?;
                limits.publish_usage(&usage, interval * 2).await;
                Ok(Some(usage))
            }
        }
    }

    /// Reads Marketo's count for today and applies it.
    pub async fn reconcile(&self) -> Result<MarketoUsage, SyncError> {
        let body = self.get(USAGE_PATH).await.map_err(SyncError::Call)?;
        let answer: UsageAnswer = serde_json::from_slice(&body).map_err(|_| SyncError::Unexpected)?;
        if !answer.success {
            return Err(SyncError::Unexpected);
        }
        let today = answer.result.first().ok_or(SyncError::Unexpected)?;
        // Marketo writes a date, sometimes with a time after it.
        let date: NaiveDate = today
            .date
            .get(..10)
            .and_then(|date| date.parse().ok())
            .ok_or(SyncError::Unexpected)?;
        let usage = MarketoUsage {
            date,
            total: today.total,
            read_at: Utc::now(),
        };
        self.apply(&usage).await;
        Ok(usage)
    }

    /// Takes Marketo's count of today's calls into the quota, here and in
    /// the state shared with the other replicas.
    async fn apply(&self, usage: &MarketoUsage) {
        self.apply_here(usage);
        if let Some(limits) = &self.limits {
            if self.admission.day() == usage.date {
                limits.reconcile(usage.date, usage.total).await;
            }
        }
    }

    fn apply_here(&self, usage: &MarketoUsage) {
        if self.admission.day() == usage.date {
            self.admission.reconcile(usage.total);
        }
        self.reported.set(usage.clone());
    }

    /// One GET as the proxy itself: admitted, counted and replayed like
    /// any call. Returns the answer's body.
    async fn get(&self, path: &str) -> Result<Bytes, ProxyError> {
        let mut request = Request::new(Bytes::new());
        *request.method_mut() = Method::GET;
        request
            .headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let extensions = request.extensions_mut();
        extensions.insert(target::normalise(path, None)?);
        extensions.insert(self.caller.clone());
        extensions.insert(Deadline::after(Instant::now(), self.max_wait));
        let admitted = self.forward.clone().oneshot(Call::from_request(request)?).await?;
        let body = admitted
            .answer
            .body
            .into_body()
            .collect()
            .await
            .map_err(|error| ProxyError::Upstream(UpstreamError::Stream(error)))?
            .to_bytes();
        Ok(body)
    }

    /// Reconciles at start and every `interval` after, for as long as it
    /// is polled. `first` hears whether the reconciliation at start
    /// succeeded, for a start that waits for it.
    pub async fn run(self, interval: Duration, first: oneshot::Sender<bool>) {
        let mut first = Some(first);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // On schedule, and when Marketo says the day is spent: then at
            // the probe time, as the call that probes whether it is.
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.admission.spent_reported().notified() => {
                    tokio::time::sleep(self.probe_after).await;
                }
            }
            let reconciled = match self.sync(interval).await {
                Ok(Some(usage)) => {
                    tracing::info!(date = %usage.date, total = usage.total, "reconciled with Marketo's usage report");
                    true
                }
                Ok(None) => {
                    tracing::debug!("another replica reads Marketo's usage report; none published yet");
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot reconcile with Marketo's usage report");
                    false
                }
            };
            if let Some(first) = first.take() {
                let _ = first.send(reconciled);
            }
        }
    }
}
