//! Reconciliation with Marketo's own count of today's calls
//! (`/rest/v1/stats/usage.json`). Other integrations that do not go
//! through the proxy use the same daily quota; when Marketo counts more
//! calls today than the proxy made, the difference is taken off what is
//! left. The call is admitted and counted like any other, under the
//! proxy's own name.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ProxyError;
use crate::proxy::Proxy;

/// Marketo's count for one day, and when it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MarketoUsage {
    pub date: NaiveDate,
    pub total: u64,
    pub read_at: DateTime<Utc>,
}

/// Why the usage report could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot call the usage API")]
    Call(#[source] ProxyError),
    #[error("the usage API answered something unexpected")]
    Unexpected,
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

/// Reads Marketo's count for today and applies it.
pub async fn reconcile(proxy: &Proxy) -> Result<MarketoUsage, SyncError> {
    let body = proxy
        .internal_get("/rest/v1/stats/usage.json")
        .await
        .map_err(SyncError::Call)?;
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
    proxy.apply_marketo_usage(&usage).await;
    Ok(usage)
}

/// Reconciles at start and every `interval` after, until aborted.
pub fn spawn(proxy: Proxy, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match reconcile(&proxy).await {
                Ok(usage) => {
                    tracing::info!(date = %usage.date, total = usage.total, "reconciled with Marketo's usage report")
                }
                Err(error) => tracing::warn!(%error, "cannot reconcile with Marketo's usage report"),
            }
        }
    })
}
