//! The proxy's Prometheus metrics, registered on a registry owned by one
//! proxy instance (never the global default), so parallel tests and
//! embedded proxies do not collide.
//!
//! Labels are bounded by configuration: service names, the API group
//! (`rest`, `asset`, `bulk`, `identity`), Marketo codes and fixed outcome
//! names.
//!
//! On Linux the registry also carries the process collector's standard
//! families (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_virtual_memory_bytes`,
//! `process_threads`, `process_start_time_seconds`), read from `/proc` at
//! each scrape, so a leak of memory or descriptors shows next to the traffic
//! that caused it.

use std::fmt;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::target::Api;

/// Latency buckets from 1 ms to 60 s.
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Every metric the proxy exports. Cheap to clone: the handles are shared.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Client requests by service and outcome.
    pub requests: IntCounterVec,
    /// Calls sent to Marketo (replays included) by the code they returned.
    pub upstream_calls: IntCounterVec,
    pub queue_wait: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub inflight: IntGauge,
    pub window_used: IntGauge,
    pub window_limit: IntGauge,
    /// The window limit in force: the configured one (or this replica's
    /// share), lowered while Marketo's 606s show calls the proxy cannot see.
    pub window_effective_limit: IntGauge,
    /// The concurrency limit in force, lowered while Marketo's 615s show
    /// calls in flight that the proxy cannot see.
    pub concurrency_effective_limit: IntGauge,
    /// Calls in the window that the proxy cannot see, as its 606s show.
    pub foreign_calls_estimate: IntGauge,
    /// Today's calls from outside the proxy, from Marketo's usage report.
    pub daily_foreign: IntGauge,
    pub daily_used: IntGaugeVec,
    pub daily_quota: IntGauge,
    pub daily_remaining: IntGauge,
    pub token_refreshes: IntCounterVec,
    pub token_expiry_seconds: Gauge,
    pub replays: IntCounterVec,
    /// Calls Marketo answered with a code it does not count, whose window
    /// slot and unit of the day went back, by service and code.
    pub uncounted: IntCounterVec,
    pub backend_up: IntGauge,
    /// Redis scripts that failed (a bug, not an outage), by script.
    pub backend_script_errors: IntCounterVec,
    /// Seconds until the day's quota runs out at the current rate; +Inf
    /// when it will not before the reset.
    pub quota_exhaustion_eta_seconds: Gauge,
    /// Requests answered without a call of their own, by service and
    /// reason (`coalesced`, `cached`).
    pub calls_saved: IntCounterVec,
    /// Requests that waited in their service's queue before their call.
    pub queued: IntCounterVec,
    /// Under `limits.mode: observe`, calls that went at once but would
    /// have waited (`would_wait`) or been refused (`would_refuse`).
    pub observed: IntCounterVec,
    /// Bulk jobs seen today by kind and state.
    pub bulk_jobs: IntGaugeVec,
    /// Export file bytes of each service's completed bulk exports.
    pub bulk_export_bytes: IntCounterVec,
    /// Export file bytes left today.
    pub bulk_export_bytes_remaining: IntGauge,
    /// Bytes of Marketo's large answers held for their clients, by place
    /// (`memory`, `disk`).
    pub spool_bytes: IntGaugeVec,
    /// Large answers that streamed at their client's pace, holding their
    /// slot, because the spool's bounds were reached.
    pub spool_streamed: IntCounter,
}

impl Metrics {
    /// Builds the metrics on a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_requests_total",
                    "Client requests by service and outcome",
                ),
                &["service", "outcome"],
            )
            .expect("valid metric"),
            upstream_calls: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_upstream_calls_total",
                    "Calls sent to Marketo by service, API group and answer code",
                ),
                &["service", "api", "code"],
            )
            .expect("valid metric"),
            queue_wait: HistogramVec::new(
                HistogramOpts::new(
                    "marketo_proxy_queue_wait_seconds",
                    "Time requests waited for admission",
                )
                .buckets(BUCKETS.to_vec()),
                &["service"],
            )
            .expect("valid metric"),
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "marketo_proxy_upstream_duration_seconds",
                    "Time Marketo took to answer",
                )
                .buckets(BUCKETS.to_vec()),
                &["service", "api"],
            )
            .expect("valid metric"),
            queue_depth: IntGaugeVec::new(
                Opts::new("marketo_proxy_queue_depth", "Requests waiting for admission"),
                &["service"],
            )
            .expect("valid metric"),
            inflight: IntGauge::new("marketo_proxy_inflight", "Calls to Marketo in flight")
                .expect("valid metric"),
            window_used: IntGauge::new(
                "marketo_proxy_window_used",
                "Calls counted in the current rolling window",
            )
            .expect("valid metric"),
            window_limit: IntGauge::new("marketo_proxy_window_limit", "Calls allowed per rolling window")
                .expect("valid metric"),
            window_effective_limit: IntGauge::new(
                "marketo_proxy_window_effective_limit",
                "Calls per rolling window in force, lowered while Marketo's 606s show calls from outside the proxy",
            )
            .expect("valid metric"),
            concurrency_effective_limit: IntGauge::new(
                "marketo_proxy_concurrency_effective_limit",
                "Calls in flight allowed, lowered while Marketo's 615s show calls from outside the proxy",
            )
            .expect("valid metric"),
            foreign_calls_estimate: IntGauge::new(
                "marketo_proxy_foreign_calls_estimate",
                "Calls from outside the proxy in Marketo's rolling window, as its 606s show",
            )
            .expect("valid metric"),
            daily_foreign: IntGauge::new(
                "marketo_proxy_daily_foreign",
                "Calls made today from outside the proxy, from Marketo's usage report",
            )
            .expect("valid metric"),
            daily_used: IntGaugeVec::new(
                Opts::new("marketo_proxy_daily_used", "Calls made today by service"),
                &["service"],
            )
            .expect("valid metric"),
            daily_quota: IntGauge::new("marketo_proxy_daily_quota", "Calls allowed per day")
                .expect("valid metric"),
            daily_remaining: IntGauge::new("marketo_proxy_daily_remaining", "Calls left today")
                .expect("valid metric"),
            token_refreshes: IntCounterVec::new(
                Opts::new("marketo_proxy_token_refreshes_total", "Identity calls by result"),
                &["result"],
            )
            .expect("valid metric"),
            token_expiry_seconds: Gauge::new(
                "marketo_proxy_token_expiry_seconds",
                "Seconds left on the access token of the proxy's own Marketo API user",
            )
            .expect("valid metric"),
            replays: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_replays_total",
                    "Calls replayed to Marketo by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            uncounted: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_uncounted_calls_total",
                    "Calls answered with a code Marketo does not count (601, 602, 604, 605, 608, 611): \
                     their window slot and unit of the day were given back",
                ),
                &["service", "code"],
            )
            .expect("valid metric"),
            backend_up: IntGauge::new(
                "marketo_proxy_backend_up",
                "1 while the state backend is reachable",
            )
            .expect("valid metric"),
            backend_script_errors: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_backend_script_errors_total",
                    "Redis scripts that failed: a bug in the proxy, not an outage",
                ),
                &["script"],
            )
            .expect("valid metric"),
            quota_exhaustion_eta_seconds: Gauge::new(
                "marketo_proxy_quota_exhaustion_eta_seconds",
                "Seconds until the daily quota runs out at the current rate (+Inf: not before the reset)",
            )
            .expect("valid metric"),
            calls_saved: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_calls_saved_total",
                    "Requests answered without a call to Marketo of their own, by service and reason",
                ),
                &["service", "reason"],
            )
            .expect("valid metric"),
            queued: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_queued_total",
                    "Requests that waited in their service's queue before their call",
                ),
                &["service"],
            )
            .expect("valid metric"),
            observed: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_observed_total",
                    "Observe mode: calls sent at once that enforce mode would have held back, by verdict",
                ),
                &["service", "verdict"],
            )
            .expect("valid metric"),
            bulk_jobs: IntGaugeVec::new(
                Opts::new(
                    "marketo_proxy_bulk_jobs",
                    "Bulk jobs seen today by kind and state",
                ),
                &["kind", "state"],
            )
            .expect("valid metric"),
            bulk_export_bytes: IntCounterVec::new(
                Opts::new(
                    "marketo_proxy_bulk_export_bytes_total",
                    "Export file bytes (fileSize) of completed bulk exports by service",
                ),
                &["service"],
            )
            .expect("valid metric"),
            bulk_export_bytes_remaining: IntGauge::new(
                "marketo_proxy_bulk_export_bytes_remaining",
                "Bulk export file bytes left today",
            )
            .expect("valid metric"),
            spool_bytes: IntGaugeVec::new(
                Opts::new(
                    "marketo_proxy_spool_bytes",
                    "Bytes of Marketo's large answers held for their clients, by place",
                ),
                &["place"],
            )
            .expect("valid metric"),
            spool_streamed: IntCounter::new(
                "marketo_proxy_spool_streamed_total",
                "Large answers that streamed at their client's pace, holding their Marketo slot, because the spool was full",
            )
            .expect("valid metric"),
            registry,
        };
        metrics.register_all();
        for place in ["memory", "disk"] {
            metrics.spool_bytes.with_label_values(&[place]);
        }
        metrics.backend_up.set(1);
        metrics.quota_exhaustion_eta_seconds.set(f64::INFINITY);
        metrics
    }

    fn register_all(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 30] = [
            Box::new(self.requests.clone()),
            Box::new(self.upstream_calls.clone()),
            Box::new(self.queue_wait.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.inflight.clone()),
            Box::new(self.window_used.clone()),
            Box::new(self.window_limit.clone()),
            Box::new(self.window_effective_limit.clone()),
            Box::new(self.concurrency_effective_limit.clone()),
            Box::new(self.foreign_calls_estimate.clone()),
            Box::new(self.daily_foreign.clone()),
            Box::new(self.daily_used.clone()),
            Box::new(self.daily_quota.clone()),
            Box::new(self.daily_remaining.clone()),
            Box::new(self.token_refreshes.clone()),
            Box::new(self.token_expiry_seconds.clone()),
            Box::new(self.replays.clone()),
            Box::new(self.uncounted.clone()),
            Box::new(self.backend_up.clone()),
            Box::new(self.backend_script_errors.clone()),
            Box::new(self.quota_exhaustion_eta_seconds.clone()),
            Box::new(self.calls_saved.clone()),
            Box::new(self.queued.clone()),
            Box::new(self.observed.clone()),
            Box::new(self.bulk_jobs.clone()),
            Box::new(self.bulk_export_bytes.clone()),
            Box::new(self.bulk_export_bytes_remaining.clone()),
            Box::new(self.spool_bytes.clone()),
            Box::new(self.spool_streamed.clone()),
        ];
        for collector in collectors {
            // Names are fixed and distinct; a clash would be a programming error.
            self.registry.register(collector).expect("metric registered once");
        }
        // The standard process families, unprefixed so that the usual
        // process dashboards and alerts work on the proxy's job too.
        #[cfg(target_os = "linux")]
        self.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics registered once");
    }

    /// The Prometheus text exposition of every metric.
    /// Starts the series the alert rules watch at 0 for every service: a
    /// labelled counter that first appears at 1 is no increase to
    /// Prometheus, and the first 606 or refusal after a start would go
    /// unnoticed.
    pub fn start_series(&self, services: &[String]) {
        for service in services {
            for outcome in [
                "ok",
                "upstream_error",
                "rejected_rate",
                "rejected_queue",
                "rejected_quota",
            ] {
                self.requests.with_label_values(&[service.as_str(), outcome]);
            }
            for api in Api::CALLED {
                for code in ["606", "607", "615"] {
                    self.upstream_calls
                        .with_label_values(&[service.as_str(), api.label(), code]);
                }
            }
        }
        for result in ["ok", "rejected", "error"] {
            self.token_refreshes.with_label_values(&[result]);
        }
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The series one service's every call counts in, looked up by label once
/// instead of on each call. A call's own figures (its API, Marketo's code,
/// the outcome) pick among them; the rare ones (an error code, a refusal)
/// are still looked up by label.
pub struct ServiceSeries {
    name: Arc<str>,
    /// `marketo_proxy_requests_total{outcome="ok"}`.
    pub requests_ok: IntCounter,
    /// Per API that calls Marketo, in [`Api::CALLED`]'s order, resolved at
    /// its first call so that an API a service never uses shows no series.
    calls: [OnceLock<CallSeries>; Api::CALLED.len()],
    upstream_duration: HistogramVec,
    upstream_calls: IntCounterVec,
}

/// A service's calls to one API.
pub struct CallSeries {
    /// `marketo_proxy_upstream_duration_seconds`.
    pub duration: Histogram,
    /// `marketo_proxy_upstream_calls_total{code="ok"}`.
    pub ok: IntCounter,
}

impl ServiceSeries {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The series of this service's calls to `api`; `None` for the
    /// identity endpoint, which the proxy answers itself.
    pub fn calls(&self, api: Api) -> Option<&CallSeries> {
        let index = Api::CALLED.iter().position(|called| *called == api)?;
        Some(self.calls[index].get_or_init(|| {
            CallSeries {
                duration: self
                    .upstream_duration
                    .with_label_values(&[&self.name, api.label()]),
                ok: self
                    .upstream_calls
                    .with_label_values(&[&self.name, api.label(), "ok"]),
            }
        }))
    }
}

impl fmt::Debug for ServiceSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceSeries")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// The series of service `name`'s calls.
    pub fn service_series(&self, name: Arc<str>) -> ServiceSeries {
        ServiceSeries {
            requests_ok: self.requests.with_label_values(&[&name, "ok"]),
            calls: Default::default(),
            upstream_duration: self.upstream_duration.clone(),
            upstream_calls: self.upstream_calls.clone(),
            name,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels() {
        let metrics = Metrics::new();
        metrics.requests.with_label_values(&["crm-sync", "ok"]).inc_by(3);
        let text = metrics.render();
        assert!(
            text.contains("marketo_proxy_requests_total{outcome=\"ok\",service=\"crm-sync\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("marketo_proxy_backend_up 1\n"), "{text}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn renders_the_process_families() {
        let text = Metrics::new().render();
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("\n{family} ")), "no {family} in\n{text}");
        }
    }

    #[test]
    fn each_instance_has_its_own_registry() {
        let first = Metrics::new();
        let second = Metrics::new();
        first.inflight.set(4);
        assert!(second.render().contains("marketo_proxy_inflight 0\n"));
    }
}
