//! The live status page of the admin listener: `GET /` is one HTML page
//! (its styles and script inline, nothing fetched from elsewhere, so it
//! works where the outside is unreachable) that reads `GET /status.json`
//! once a second and draws the window, the queues, the day and the
//! proxy's health.
//!
//! The JSON comes from the state `/usage` and `/metrics` read: one
//! [`Admission::status`] under admission's lock (so the figures agree with
//! each other), the token caches, Marketo's last usage report, the backend
//! gauge, and the last hour's refusals and replays. A read costs the same
//! however busy the proxy is: two windows of the per-second rate history,
//! a minute of per-second wait buckets and an hour of per-minute counts
//! per service. It names services, never a credential, and carries no
//! token.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::admission::{Admission, Status};
use crate::config::{Backend, Config};
use crate::recent::{HourCounts, LastHour};
use crate::token::TokenCaches;
use crate::usage_sync::ReportedUsage;

/// The page, served as it is.
pub const PAGE: &str = include_str!("page.html");

/// The timeline never covers more than this, whatever the window.
const MAX_TIMELINE: Duration = Duration::from_secs(600);

/// What the status JSON needs beyond the state the admin listener reads
/// anyway.
pub struct StatusPage {
    last_hour: Arc<LastHour>,
    backend: Backend,
    /// The timeline's length in seconds: two windows.
    timeline_seconds: usize,
    window: Duration,
}

/// What the status JSON is read from.
pub struct Sources<'a> {
    pub admission: &'a Admission,
    pub tokens: &'a TokenCaches,
    pub reported: &'a ReportedUsage,
    /// `marketo_proxy_backend_up`.
    pub backend_up: bool,
}

impl StatusPage {
    pub fn new(config: &Config, last_hour: Arc<LastHour>) -> Self {
        let timeline = (config.limits.window * 2).min(MAX_TIMELINE);
        Self {
            last_hour,
            backend: config.state.backend,
            timeline_seconds: usize::try_from(timeline.as_secs().max(1)).unwrap_or(1),
            window: config.limits.window,
        }
    }

    /// The figures the page shows, as JSON.
    pub fn json(&self, sources: &Sources<'_>) -> Value {
        let status = sources.admission.status(self.timeline_seconds);
        let last_hour = self.last_hour.counts();
        let snapshot = &status.snapshot;
        let services: Vec<Value> = snapshot
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| {
                let waits = status.waits.get(index).copied().unwrap_or_default();
                let hour = last_hour.get(index).copied().unwrap_or_default();
                json!({
                    "name": service.name,
                    "queued": service.queued,
                    "in_flight": service.in_flight,
                    "concurrency": service.concurrency,
                    "wait": {
                        "count": waits.total(),
                        "p50_seconds": waits.quantile(0.5).map(|wait| wait.as_secs_f64()),
                        "p99_seconds": waits.quantile(0.99).map(|wait| wait.as_secs_f64()),
                    },
                    "used": service.daily_used,
                    "cap": service.daily_cap,
                    "reserved": service.reserved_daily,
                    "window": service.window_limit.map(|limit| json!({
                        "used": service.window_used.unwrap_or(0),
                        "limit": limit,
                    })),
                    "last_hour": last_hour_json(hour),
                })
            })
            .collect();
        json!({
            "at": status.now,
            "window": {
                "used": snapshot.window_used,
                "limit": snapshot.window_limit,
                "in_flight": status.window_in_flight,
                "answered": snapshot.window_used.saturating_sub(status.window_in_flight),
                "seconds": self.window.as_secs_f64(),
                "hold_seconds": status.window_hold.as_secs_f64(),
            },
            "timeline": {"calls_per_second": status.calls_per_second},
            "concurrency": {"in_flight": snapshot.in_flight, "limit": snapshot.concurrency},
            "queued": snapshot.queued,
            "services": services,
            "day": day_json(&status, sources.reported),
            "health": self.health_json(&status, sources),
        })
    }

    fn health_json(&self, status: &Status, sources: &Sources<'_>) -> Value {
        let names = sources.admission.names();
        let now = Instant::now();
        let caches = sources.tokens.all();
        // Which services call with each credential: the page names those,
        // never the credential.
        let users = |cache: &Arc<crate::token::TokenCache>| -> Vec<&str> {
            (0..names.len())
                .filter(|service| Arc::ptr_eq(sources.tokens.for_service(*service), cache))
                .map(|service| names[service].as_str())
                .collect()
        };
        let tokens: Vec<Value> = caches
            .iter()
            .map(|cache| {
                json!({
                    "services": users(cache),
                    "expires_in_seconds": cache
                        .cached()
                        .map(|token| token.expires_at.saturating_duration_since(now).as_secs()),
                })
            })
            .collect();
        let last_error = caches
            .iter()
            .filter_map(|cache| cache.last_failure().map(|(error, at)| (cache, error, at)))
            .max_by_key(|(_, _, at)| *at)
            .map(|(cache, error, at)| {
                json!({
                    "error": error.to_string(),
                    "seconds_ago": now.saturating_duration_since(at).as_secs(),
                    "services": users(cache),
                    "current": cache.last_error().is_some(),
                })
            });
        let snapshot = &status.snapshot;
        let mut lowered = Vec::new();
        for (name, configured, effective) in [
            (
                "window",
                u64::from(snapshot.configured_window),
                u64::from(snapshot.window_limit),
            ),
            (
                "concurrency",
                u64::from(snapshot.configured_concurrency),
                u64::from(snapshot.concurrency),
            ),
            ("daily_quota", snapshot.daily_quota, status.daily_limit_here),
        ] {
            if effective < configured {
                lowered.push(json!({"limit": name, "configured": configured, "effective": effective}));
            }
        }
        json!({
            "tokens": tokens,
            "last_identity_error": last_error,
            "backend": {
                "kind": match self.backend {
                    Backend::Memory => "memory",
                    Backend::Redis => "redis",
                },
                "up": sources.backend_up,
            },
            "limits": {
                "window": snapshot.window_limit,
                "concurrency": snapshot.concurrency,
                "daily_quota": status.daily_limit_here,
            },
            "lowered": lowered,
            "paused_seconds": status.paused_for.map(|left| left.as_secs_f64()),
        })
    }
}

fn last_hour_json(hour: HourCounts) -> Value {
    json!({
        "refused_606": hour.refused_rate,
        "refused_607": hour.refused_quota,
        "replays": hour.replays,
    })
}

fn day_json(status: &Status, reported: &ReportedUsage) -> Value {
    let snapshot = &status.snapshot;
    let reserved: u64 = snapshot
        .services
        .iter()
        .map(|service| service.reserved_daily)
        .sum();
    let reserved_left: u64 = snapshot
        .services
        .iter()
        .map(|service| service.reserved_daily.saturating_sub(service.daily_used))
        .sum();
    let resets_in = (status.next_reset - status.now).to_std().unwrap_or_default();
    json!({
        "date": snapshot.day,
        "quota": snapshot.daily_quota,
        "used": snapshot.daily_used,
        "remaining": snapshot.daily_remaining,
        "proxy_used": snapshot.daily_used - snapshot.daily_foreign,
        "outside_proxy": snapshot.daily_foreign,
        "marketo_reported": reported.get().map(|usage| usage.total),
        "reserved": reserved,
        "reserved_left": reserved_left,
        "exhaustion_eta_seconds": status.exhaustion_eta.map(|eta| eta.as_secs()),
        "timezone": status.timezone.name(),
        "resets_at": status.next_reset,
        "resets_at_local": status.next_reset.with_timezone(&status.timezone).to_rfc3339(),
        "resets_in_seconds": resets_in.as_secs(),
    })
}
