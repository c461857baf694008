//! End-to-end: `limits.mode: observe` lets every call through at once and
//! counts what `enforce` would have held back; the same load in both
//! modes is accounted the same, service by service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::time::Duration;

use marketo_proxy::config::LimitsMode;
use marketo_proxy::sim::SimConfig;
use serde_json::Value;
use support::{CRM_KEY, Stack, WAREHOUSE_KEY, metric};

/// A proxy allowing 2 calls in flight, in `mode`, in front of a simulator
/// that takes 300 ms per call (so calls sent together overlap).
async fn stack(mode: LimitsMode) -> Stack {
    let sim = SimConfig {
        latency: Duration::from_millis(300),
        ..support::sim_config()
    };
    let stack = Stack::start_configured(sim, |url| {
        let mut config = support::proxy_config_with(
            url,
            "",
            "{ concurrency: 2 }",
            "{ file: ~, usage_sync_interval: 0s }",
        );
        config.limits.mode = mode;
        config.validate().expect("valid config")
    })
    .await;
    support::wait_ready(&stack.proxy).await;
    stack
}

/// crm-sync sends 5 distinct reads at once, then warehouse 3: with 2 calls
/// in flight allowed, 3 and 1 of them find no room when they arrive.
async fn load(stack: &Stack) {
    for (key, count) in [(CRM_KEY, 5), (WAREHOUSE_KEY, 3)] {
        let requests = (1..=count).map(|id| async move {
            let answer = stack.get(key, &format!("/rest/v1/lead/{id}.json")).await;
            assert_eq!(answer.status(), 200);
            let body: Value = answer.json().await.unwrap();
            assert_eq!(body["success"], true, "{body}");
        });
        futures_util::future::join_all(requests).await;
    }
}

/// The per-service accounting series: requests by outcome, calls by code,
/// today's use.
fn accounting(metrics: &str) -> BTreeMap<String, String> {
    metrics
        .lines()
        .filter(|line| {
            [
                "marketo_proxy_requests_total{",
                "marketo_proxy_upstream_calls_total{",
                "marketo_proxy_daily_used{",
            ]
            .iter()
            .any(|family| line.starts_with(family))
        })
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(series, value)| (series.to_owned(), value.to_owned()))
        .collect()
}

fn counter(metrics: &str, series: &str) -> f64 {
    metric(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test]
async fn the_same_load_is_counted_alike_and_observe_counts_what_enforce_queued() {
    let enforcing = stack(LimitsMode::Enforce).await;
    load(&enforcing).await;
    let observing = stack(LimitsMode::Observe).await;
    load(&observing).await;

    let (enforced, observed) = (enforcing.metrics().await, observing.metrics().await);
    let counted = accounting(&enforced);
    assert!(counted.len() >= 6, "{counted:?}");
    assert_eq!(counted, accounting(&observed));
    assert_eq!(enforcing.sim.stats().ok, 8);
    assert_eq!(observing.sim.stats().ok, 8);

    for (service, waited) in [("crm-sync", 3.0), ("warehouse", 1.0)] {
        let queued = format!(r#"marketo_proxy_queued_total{{service="{service}"}}"#);
        let would_wait =
            format!(r#"marketo_proxy_observed_total{{service="{service}",verdict="would_wait"}}"#);
        assert_eq!(counter(&enforced, &queued), waited, "enforce queued, {service}");
        assert_eq!(
            counter(&observed, &would_wait),
            waited,
            "observe would have, {service}"
        );
        assert_eq!(
            counter(&observed, &queued),
            0.0,
            "observe queues nothing, {service}"
        );
        assert_eq!(counter(&enforced, &would_wait), 0.0, "{service}");
    }
    // Observe mode let more than 2 calls be in flight at once; enforce not.
    assert!(observing.sim.stats().max_in_flight > 2);
    assert!(enforcing.sim.stats().max_in_flight <= 2);

    let usage = support::usage(&observing.proxy.admin_url()).await;
    assert_eq!(usage["mode"], "observe", "{usage}");
    assert_eq!(usage["services"][0]["held_back"]["would_wait"], 3, "{usage}");
    assert_eq!(usage["services"][0]["used"], 5, "{usage}");
    let usage = support::usage(&enforcing.proxy.admin_url()).await;
    assert_eq!(usage["mode"], "enforce", "{usage}");
    assert_eq!(usage["services"][0]["held_back"]["queued"], 3, "{usage}");
}

#[tokio::test]
async fn observe_mode_forwards_what_enforce_would_refuse_and_counts_it() {
    let stack = Stack::start_configured(support::sim_config(), |url| {
        let mut config = support::proxy_config(url, "");
        config.limits.mode = LimitsMode::Observe;
        config.services[1].daily_quota = NonZeroU64::new(3);
        config.validate().expect("valid config")
    })
    .await;
    for id in 1..=5 {
        let answer = stack
            .get(WAREHOUSE_KEY, &format!("/rest/v1/lead/{id}.json"))
            .await;
        // The day's "remaining" says 0 after the third; the call still goes.
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["success"], true, "call {id}: {body}");
    }
    assert_eq!(stack.sim.stats().ok, 5, "nothing answered locally");
    let metrics = stack.metrics().await;
    assert_eq!(
        counter(
            &metrics,
            r#"marketo_proxy_observed_total{service="warehouse",verdict="would_refuse"}"#
        ),
        2.0
    );
    assert_eq!(
        counter(&metrics, r#"marketo_proxy_daily_used{service="warehouse"}"#),
        5.0
    );
    let usage = support::usage(&stack.proxy.admin_url()).await;
    assert_eq!(usage["services"][1]["held_back"]["would_refuse"], 2, "{usage}");
    assert_eq!(usage["services"][1]["used"], 5, "{usage}");
}
