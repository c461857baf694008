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

use crate::admission::foreign::Reading;
use crate::admission::shared::{SharedLimits, call_id};
use crate::admission::{Admission, Slot};
use crate::auth::Caller;
use crate::error::ProxyError;
use crate::limits::redis::scripts::{self, millis};
use crate::marketo::{MarketoUsage, code};
use crate::proxy::Forward;
use crate::proxy::call::Call;
use crate::proxy::caller::Deadline;
use crate::target;
use crate::upstream::UpstreamError;

/// Where Marketo reports today's usage.
const USAGE_PATH: &str = "/rest/v1/stats/usage.json";
/// Where Marketo reports today's errors, by code.
const ERRORS_PATH: &str = "/rest/v1/stats/errors.json";
/// The refusals of its window and concurrency limits.
const REFUSALS: [&str; 2] = [code::RATE_LIMITED, code::CONCURRENCY_LIMITED];

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
    /// With replicas: whether this one reads the reports for all of them.
    election: Election,
}

/// The replicas' election of the one that reads Marketo's reports for all
/// of them: a lock in the shared state with an expiry, which its holder
/// keeps by taking it again within it, and another replica takes once it
/// lapses.
pub struct Election {
    replica: String,
}

impl Election {
    pub fn new() -> Self {
        Self { replica: call_id() }
    }

    /// Whether this replica reads the reports for every replica: it holds
    /// the lock (for `hold` more), or just took it from nobody. `None`
    /// while the shared state cannot say.
    pub async fn lead(&self, limits: &SharedLimits, hold: Duration) -> Option<bool> {
        let args = scripts::Lead {
            replica: &self.replica,
            hold_ms: millis(hold),
        };
        let led = limits
            .run(&[limits.key("reconciler").as_str()], &args)
            .await
            .ok()?;
        Some(led == 1)
    }
}

impl Default for Election {
    fn default() -> Self {
        Self::new()
    }
}

/// Marketo's usage report as the reader read it, for the others, kept for
/// `keep`.
async fn publish_usage(limits: &SharedLimits, usage: &MarketoUsage, keep: Duration) {
    let Ok(text) = serde_json::to_string(usage) else {
        return;
    };
    let args = scripts::Publish {
        text: &text,
        keep_ms: millis(keep),
    };
    let _ = limits.run(&[limits.key("usage").as_str()], &args).await;
}

/// The usage report the reader last published, if any.
async fn published_usage(limits: &SharedLimits) -> Option<MarketoUsage> {
    let text = limits
        .run(&[limits.key("usage").as_str()], &scripts::Published {})
        .await
        .ok()??;
    serde_json::from_str(&text).ok()
}

/// One of Marketo's reports: days, today's first.
#[derive(Deserialize)]
struct Report<Day> {
    success: bool,
    #[serde(default = "Vec::new")]
    result: Vec<Day>,
}

impl<Day: serde::de::DeserializeOwned> Report<Day> {
    /// The report's days, if Marketo answered with one.
    fn days(body: &[u8]) -> Result<Vec<Day>, SyncError> {
        match serde_json::from_slice::<Self>(body) {
            Ok(report) if report.success => Ok(report.result),
            _ => Err(SyncError::Unexpected),
        }
    }
}

#[derive(Deserialize)]
struct UsageDay {
    date: String,
    total: u64,
}

#[derive(Deserialize)]
struct ErrorsDay {
    date: String,
    #[serde(default)]
    errors: Vec<ErrorCount>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorCount {
    /// A string in Marketo's examples; a number is taken too.
    error_code: serde_json::Value,
    count: u64,
}

impl ErrorCount {
    fn is_refusal(&self) -> bool {
        match &self.error_code {
            serde_json::Value::String(code) => REFUSALS.contains(&code.as_str()),
            other => REFUSALS.contains(&other.to_string().as_str()),
        }
    }
}

/// Marketo's count of `date`'s refusals for its window and concurrency.
fn refusals(body: &[u8], date: NaiveDate) -> Result<u64, SyncError> {
    // No errors yet today: no entry for today, or none at all.
    let Some(today) = Report::<ErrorsDay>::days(body)?.into_iter().next() else {
        return Ok(0);
    };
    if report_date(&today.date) != Some(date) {
        return Err(SyncError::Unexpected);
    }
    Ok(today
        .errors
        .iter()
        .filter(|error| error.is_refusal())
        .map(|error| error.count)
        .sum())
}

/// The date a report gives, sometimes with a time after it.
fn report_date(date: &str) -> Option<NaiveDate> {
    date.get(..10).and_then(|date| date.parse().ok())
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
            election: Election::new(),
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
        match self.election.lead(limits, interval + interval / 2).await {
            Some(false) => {
                let Some(usage) = published_usage(limits).await else {
                    return Ok(None);
                };
                self.apply_here(&usage);
                Ok(Some(usage))
            }
            Some(true) | None => {
                let usage = self.reconcile().await?;
                publish_usage(limits, &usage, interval * 2).await;
                Ok(Some(usage))
            }
        }
    }

    /// Reads Marketo's counts for today and applies them.
    pub async fn reconcile(&self) -> Result<MarketoUsage, SyncError> {
        let (body, own) = self.get(USAGE_PATH).await.map_err(SyncError::Call)?;
        let days = Report::<UsageDay>::days(&body)?;
        let today = days.first().ok_or(SyncError::Unexpected)?;
        let date = report_date(&today.date).ok_or(SyncError::Unexpected)?;
        let read_at = Utc::now();
        // Taken at once, while the proxy's own count is the one Marketo's
        // total was counted against.
        let counts = self.take_total(date, today.total, own).await;
        // After the usage report, so that a day Marketo counts as spent
        // does not spend a call on it.
        let errors = self.get(ERRORS_PATH).await.map_err(SyncError::Call);
        let refused = match errors.and_then(|(body, _)| refusals(&body, date)) {
            Ok(refused) => Some(refused),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot read Marketo's error report: calls from outside the proxy that Marketo \
                     refused go uncounted"
                );
                None
            }
        };
        let foreign = counts.map(|(executed, own_refusals)| {
            executed + refused.map_or(0, |refused| refused.saturating_sub(own_refusals))
        });
        let usage = MarketoUsage {
            date,
            total: today.total,
            refused,
            foreign,
            read_at,
        };
        self.observe(&usage);
        Ok(usage)
    }

    /// Takes Marketo's count of today's calls into the quota, here and in
    /// the state shared with the other replicas. Answers, for today, the
    /// calls from outside the proxy it shows and the proxy's calls Marketo
    /// refused (every replica's, with Redis). `own` is the proxy's count
    /// when the report was asked for.
    async fn take_total(&self, date: NaiveDate, total: u64, own: Option<u64>) -> Option<(u64, u64)> {
        if self.admission.day() != date {
            return None;
        }
        let here = self.admission.reconcile(total, own);
        let shared = match &self.limits {
            Some(limits) => limits.reconcile(date, total).await,
            None => None,
        };
        Some(shared.unwrap_or(here))
    }

    /// Takes the usage another replica read and published.
    fn apply_here(&self, usage: &MarketoUsage) {
        if self.admission.day() == usage.date {
            self.admission.reconcile(usage.total, None);
        }
        self.observe(usage);
    }

    /// Keeps the part of the window that others' calls take free (see
    /// [`crate::admission::foreign`]), and the report for `/usage`.
    fn observe(&self, usage: &MarketoUsage) {
        if let (true, Some(foreign)) = (self.admission.day() == usage.date, usage.foreign) {
            self.admission.observe_foreign(Reading {
                date: usage.date,
                at: usage.read_at,
                foreign,
            });
        }
        self.reported.set(usage.clone());
    }

    /// One GET as the proxy itself: admitted, counted and replayed like
    /// any call. Returns the answer's body, and this replica's calls today
    /// when it was sent, itself included (unless it was not sent).
    async fn get(&self, path: &str) -> Result<(Bytes, Option<u64>), ProxyError> {
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
        let own = admitted.slot.as_ref().and_then(Slot::day_count);
        let body = admitted
            .answer
            .body
            .into_body()
            .collect()
            .await
            .map_err(|error| ProxyError::Upstream(UpstreamError::Stream(error)))?
            .to_bytes();
        Ok((body, own))
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
            // A whole interval from now: a reading that waited for a slot
            // is not followed by another at once.
            ticks.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_report_counts_606_and_615_written_as_strings_or_numbers() {
        let date = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        let body = br#"{"success":true,"result":[{"date":"2026-12-02","total":19,"errors":[
            {"errorCode":"606","count":5},{"errorCode":615,"count":3},
            {"errorCode":"601","count":10},{"errorCode":607,"count":1}]}]}"#;
        assert_eq!(refusals(body, date).unwrap(), 8);
        let none = br#"{"success":true,"result":[]}"#;
        assert_eq!(refusals(none, date).unwrap(), 0);
        let yesterday = br#"{"success":true,"result":[{"date":"2026-12-01","errors":[]}]}"#;
        assert!(refusals(yesterday, date).is_err());
    }
}
