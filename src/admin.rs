//! The admin listener, on its own port so it can stay private:
//! `/healthz` (the process answers), `/readyz` (a Marketo token can be
//! had), `/metrics` (Prometheus text), `/usage` (today's usage as JSON),
//! and `/` with `/status.json`, the live status page (see [`crate::status`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;
use tokio::time::Instant;

use crate::admission::Admission;
use crate::metrics::Metrics;
use crate::status::{self, Sources, StatusPage};
use crate::token::TokenCaches;
use crate::usage_sync::ReportedUsage;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    pub admission: Arc<Admission>,
    pub tokens: Arc<TokenCaches>,
    pub reported: Arc<ReportedUsage>,
    pub metrics: Metrics,
    pub status: Arc<StatusPage>,
    pub bulk: Arc<crate::bulk::BulkJobs>,
}

impl Admin {
    /// Answers one admin request.
    pub fn handle<B>(&self, request: &Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use GET\n".into(),
            ));
        }
        Ok(match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => self.readiness(),
            "/metrics" => {
                self.refresh_metrics();
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            "/usage" => text(StatusCode::OK, "application/json", self.usage().to_string()),
            "/" => page(),
            "/status.json" => self.status_json(),
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        })
    }

    /// Brings time-dependent gauges up to date before a scrape.
    fn refresh_metrics(&self) {
        self.admission.refresh_metrics();
        let left = self
            .tokens
            .all()
            .first()
            .and_then(|cache| cache.cached())
            .map_or(0.0, |token| {
                token
                    .expires_at
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
            });
        self.metrics.token_expiry_seconds.set(left);
    }

    /// Ready once every upstream credential has a token; otherwise says why
    /// (the error names no secret).
    fn readiness(&self) -> Response<Full<Bytes>> {
        let problems: Vec<String> = self
            .tokens
            .all()
            .iter()
            .filter(|cache| !cache.is_ready())
            .map(|cache| match cache.last_error() {
                Some(error) => error.to_string(),
                None => "no access token yet".to_owned(),
            })
            .collect();
        if problems.is_empty() {
            text(
                StatusCode::OK,
                "application/json",
                json!({"ready": true}).to_string(),
            )
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                json!({"ready": false, "reasons": problems}).to_string(),
            )
        }
    }
}

impl Admin {
    /// Today's usage: the quota, what the proxy and Marketo counted, each
    /// service's share, and the window and concurrency in use.
    fn usage(&self) -> serde_json::Value {
        let admission = &self.admission;
        let snapshot = admission.snapshot();
        let services: Vec<serde_json::Value> = snapshot
            .services
            .iter()
            .map(|service| {
                json!({
                    "name": service.name,
                    "used": service.daily_used,
                    "reserved": service.reserved_daily,
                    "cap": service.daily_cap,
                    "window": {"used": service.window_used, "limit": service.window_limit},
                    "in_flight": service.in_flight,
                    "concurrency": service.concurrency,
                    "queued": service.queued,
                    // Today: answered without a call of their own, not
                    // charged to the quota.
                    "saved": {"coalesced": service.tally.coalesced, "cached": service.tally.cached},
                    // Today: waited in the queue (enforce), or went at once
                    // where enforce would have held them back (observe).
                    "held_back": {
                        "queued": service.tally.queued,
                        "would_wait": service.tally.would_wait,
                        "would_refuse": service.tally.would_refuse,
                    },
                })
            })
            .collect();
        let proxy_used = snapshot.daily_used - snapshot.daily_foreign;
        json!({
            "day": snapshot.day,
            "mode": snapshot.mode,
            "resets_at": admission.next_reset(),
            "quota": snapshot.daily_quota,
            "used": snapshot.daily_used,
            "remaining": snapshot.daily_remaining,
            "proxy_used": proxy_used,
            "marketo_reported": self.reported.get(),
            "outside_proxy": snapshot.daily_foreign,
            // The limits in force, and the configured ones they fall below
            // while Marketo's refusals show calls from outside the proxy.
            "window": {
                "used": snapshot.window_used,
                "limit": snapshot.window_limit,
                "configured": snapshot.configured_window,
                "outside_proxy": snapshot.foreign_in_window,
                "kept_free": snapshot.kept_free,
            },
            "concurrency": {
                "in_flight": snapshot.in_flight,
                "limit": snapshot.concurrency,
                "configured": snapshot.configured_concurrency,
            },
            "queued": snapshot.queued,
            "services": services,
            "bulk": self.bulk_usage(),
        })
    }

    /// Today's bulk jobs and export bytes, per service.
    fn bulk_usage(&self) -> serde_json::Value {
        let usage = self.bulk.usage();
        let services: serde_json::Map<String, serde_json::Value> = usage
            .services
            .iter()
            .map(|(name, day)| {
                (
                    name.clone(),
                    json!({"jobs": day.jobs, "export_bytes": day.export_bytes}),
                )
            })
            .collect();
        json!({
            "export_bytes": usage.export_bytes,
            "export_bytes_limit": usage.export_bytes_limit,
            "export_bytes_remaining": usage.export_bytes_remaining,
            "extract_in_queue": usage.extract_in_queue,
            "import_in_queue": usage.import_in_queue,
            "services": services,
        })
    }
}

impl Admin {
    /// The status page's figures; never cached, since they change every
    /// second.
    fn status_json(&self) -> Response<Full<Bytes>> {
        let json = self.status.json(&Sources {
            admission: &self.admission,
            tokens: &self.tokens,
            reported: &self.reported,
            backend_up: self.metrics.backend_up.get() == 1,
        });
        let mut response = text(StatusCode::OK, "application/json", json.to_string());
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The status page. Its policy lets it load nothing but itself and its
/// JSON, and no other site frame it.
fn page() -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::OK,
        "text/html; charset=utf-8",
        status::PAGE.to_owned(),
    );
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
